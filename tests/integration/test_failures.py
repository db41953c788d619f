"""vLLM's own queue limits on the real engine: RESOURCE_EXHAUSTED with RetryInfo.

One server for the module (`queue_limited`): one engine slot (`--max-num-seqs 1`)
so that requests wait in vLLM's queue in a known order, and vLLM's queue limits
`--max-num-queued-reqs 3` (requests waiting or running) and
`--max-num-queued-tokens 100` (prompt tokens of requests not yet prefilled).

vLLM checks both in its front end (AsyncLLM.check_admission) before it adds a
request: the number of requests first, then the prompt tokens waiting.

The error finish reason (`error`) has no trigger on this engine that a request
can reach (see docs/reliability.md, "Status codes"): it is proven through vLLM's
own output processor in tests/unit/test_status_table.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from llmgrpc import AsyncClient
from llmgrpc.client import generate_request

from tests import waiting
from tests.metrics_scrape import value
from tests.server_process import ServerProcess, engine_fixture, running
from tests.status_details import details

pytestmark = pytest.mark.engine

MAX_QUEUED_REQS = 3
MAX_QUEUED_TOKENS = 100
LONG = 2000  # tokens: the holder runs while the others wait behind it
LONG_PROMPT = "word " * 400  # well over MAX_QUEUED_TOKENS prompt tokens


@engine_fixture(scope="module")
def queue_limited(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    args = ["--model", "tiny-llama-gqa", "--max-num-seqs", "1",
            "--max-num-queued-reqs", str(MAX_QUEUED_REQS),
            "--max-num-queued-tokens", str(MAX_QUEUED_TOKENS)]  # fmt: skip
    with running(args, "queue-limited", request) as server:
        server.wait_serving()
        yield server


@pytest.fixture
async def client(queue_limited: ServerProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(queue_limited.target) as c:
        yield c


def _stream(client: AsyncClient, prompt: str, max_tokens: int) -> grpc.aio.UnaryStreamCall:
    req = generate_request(prompt, max_tokens=max_tokens, ignore_eos=True)
    return client.stub.GenerateStream(req, timeout=120.0)


async def _waiting_in_engine(url: str, n: int) -> bool:
    """vLLM's engine has `n` requests in its queue (so its front end counts them)."""
    return await waiting.eventually(
        lambda: value(url, "vllm:num_requests_waiting") == n, 30.0, 0.05
    )


def _assert_queue_full(e: grpc.aio.AioRpcError, flag: str) -> None:
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    assert flag in (e.details() or "")
    assert details(e, error_details_pb2.RetryInfo)
    assert details(e, error_details_pb2.ErrorInfo)


async def test_vllm_queue_limits_are_resource_exhausted_with_retry_info(
    queue_limited: ServerProcess, client: AsyncClient
) -> None:
    url = queue_limited.metrics_url
    # 1. A holder runs (its first message: it is past prefill, its prompt no
    #    longer counts); a short prompt and a long one wait behind it.
    holder = _stream(client, "Hold", LONG)
    await holder.read()
    short = _stream(client, "Wait", LONG)
    assert await _waiting_in_engine(url, 1)
    long = _stream(client, LONG_PROMPT, 1)
    assert await _waiting_in_engine(url, 2)
    # 2. A fourth request: three are in flight, vLLM's --max-num-queued-reqs.
    with pytest.raises(grpc.aio.AioRpcError) as full:
        async for _ in client.stream("Over", max_tokens=1):
            pass
    _assert_queue_full(full.value, "--max-num-queued-reqs")
    # 3. Room for a request again, but the long prompt still waits for its
    #    prefill: vLLM's --max-num-queued-tokens. Until vLLM has dropped the
    #    cancelled request, the answer is still the request limit. Had the
    #    holder finished early, the short request would have run instead and
    #    step 2 or this one would fail: no request is ever admitted here.
    short.cancel()
    rejected = 1
    deadline = time.monotonic() + 30.0
    while True:
        with pytest.raises(grpc.aio.AioRpcError) as backlog:
            await client.generate("Over", max_tokens=1)
        rejected += 1
        if "--max-num-queued-reqs" not in (backlog.value.details() or ""):
            break
        assert time.monotonic() < deadline, "vLLM never dropped the cancelled request"
        await asyncio.sleep(0.05)
    _assert_queue_full(backlog.value, "--max-num-queued-tokens")
    # 4. Counted as errors, with the reason; the server is unharmed.
    holder.cancel()
    long.cancel()
    # This module's own server: no other test's calls are counted.
    assert await waiting.eventually(lambda: (
        value(url, "grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED")
        == value(url, "llmgrpc_engine_failures_total", reason="ENGINE_QUEUE_FULL")
        == rejected), 10.0)  # fmt: skip
    assert await _waiting_in_engine(url, 0)
    answer = await client.generate("ok", max_tokens=2, ignore_eos=True)
    assert answer.usage.completion_tokens == 2
