"""Failures vLLM reports, on the real engine: its queue limits answer
RESOURCE_EXHAUSTED with RetryInfo, and a request its engine fails ends INTERNAL.

One server for the module (`queue_limited`): one engine slot (`--max-num-seqs 1`)
so that requests wait in vLLM's queue in a known order, and vLLM's queue limits
`--max-num-queued-reqs 3` (requests waiting or running) and
`--max-num-queued-tokens 100` (prompt tokens of requests not yet prefilled).

vLLM checks both in its front end (AsyncLLM.check_admission) before it adds a
request: the number of requests first, then the prompt tokens waiting.

The error finish reason (`error`): a grammar whose language is empty
(`root ::= root`) passes vLLM's front-end validation, then the engine core's
grammar rejects every token and vLLM ends the request with `error` ("grammar
rejected tokens"). Found by tests/integration/test_fuzz.py; before the status
table change it ended OK with FINISH_REASON_STOP. Runs on the shared `llama`.
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
from tests.metrics_scrape import at_rest, value
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


EMPTY_GRAMMAR = "root ::= root"


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
async def test_a_request_the_engine_fails_ends_internal_never_ok(
    llama: ServerProcess, method: str
) -> None:
    url = llama.metrics_url
    failures = {"grpc_method": method, "reason": "ENGINE_ERROR"}
    handled = {"grpc_method": method, "grpc_code": "INTERNAL"}
    def counts() -> tuple[float, float]:
        return (value(url, "llmgrpc_engine_failures_total", **failures),
                value(url, "grpc_server_handled_total", **handled))  # fmt: skip

    assert await waiting.eventually(lambda: at_rest(url), 60.0)
    before = counts()
    req = generate_request("hi", max_tokens=4, grammar=EMPTY_GRAMMAR)
    async with AsyncClient(llama.target) as client:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            if method == "Generate":
                await client.stub.Generate(req, timeout=60.0)
            else:
                _ = [m async for m in client.stub.GenerateStream(req, timeout=60.0)]
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert e.value.details() == "the engine failed this request; the server log has the details"
        assert [i.reason for i in details(e.value, error_details_pb2.ErrorInfo)] == ["ENGINE_ERROR"]
        # The server goes on serving.
        assert (await client.generate("hi", max_tokens=2, ignore_eos=True)).usage.completion_tokens == 2
    # /metrics renders at most every 0.1 s: wait for this call's counts (the
    # wait fails on a count past them too).
    expected = (before[0] + 1, before[1] + 1)
    assert await waiting.eventually(lambda: counts() == expected, 30.0), (counts(), expected)


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
