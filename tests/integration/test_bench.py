"""`llmgrpc bench --backend grpc` against the real server: a smoke test, not a benchmark."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from llmgrpc import AsyncClient
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.server_process import SLOW_READER, ServerProcess

pytestmark = pytest.mark.engine
LLMGRPC = Path(sys.executable).parent / "llmgrpc"


def _bench(llama: ServerProcess, *args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [str(LLMGRPC), "bench", "--backend", "grpc", "--target", llama.target, "--json",
         "--num-requests", "6", "--max-tokens", "16", "--prompt-len", "24", "--warmup", "1",
         *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_closed_loop_reports_every_token(llama: ServerProcess) -> None:
    s = _bench(llama, "--concurrency", "3")
    assert s["failures"] == {} and s["successful"] == s["requests"] == 6
    assert s["output_tokens"] == 6 * 16 and s["output_tokens_per_request"] == [16]
    assert 12 <= s["mean_prompt_tokens"] <= 36  # about --prompt-len, with the model's tokenizer
    assert s["output_tokens_per_s"] > 0 and s["client_cpu_ms_per_1k_tokens"] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert set(s[key]) == {"mean", "p50", "p90", "p99"}
    assert 0 < s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]


def test_open_loop_and_unary(llama: ServerProcess) -> None:
    s = _bench(llama, "--request-rate", "20", "--unary")
    assert s["failures"] == {} and s["output_tokens"] == 6 * 16
    assert s["backend"] == "grpc-unary" and s["messages_per_request"] == 1
    assert s["workload"]["request_rate"] == 20 and s["workload"]["concurrency"] is None


async def test_under_load_messages_carry_several_tokens_and_keep_the_contract(
    llama: ServerProcess,
) -> None:
    # 24 requests in flight: a new stream gets 6 tokens per message
    # (policy.tokens_per_message), or more if it falls behind. The
    # holders are read by a client with tiny HTTP/2 windows that reads only
    # their first message: they stay in flight (blocked on flow control)
    # however fast the engine finishes their tokens.
    async with AsyncClient(llama.target, timeout=300) as client, \
            AsyncClient(llama.target, timeout=300, options=SLOW_READER) as slow_reader:
        holders = [slow_reader.stream(f"holder {i}", max_tokens=1900, ignore_eos=True)
                   for i in range(24)]  # fmt: skip
        try:
            # All in flight at once (one by one, the first could end under load).
            await asyncio.gather(*(anext(holder) for holder in holders))
            msgs = [m async for m in client.stream("under load", max_tokens=48,
                                                   ignore_eos=True, temperature=0.0)]  # fmt: skip
        finally:
            for holder in holders:
                await holder.aclose()
    *body, last = msgs
    assert sum(len(m.token_ids) for m in msgs) == 48 == last.usage.completion_tokens
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert all(not m.HasField("usage") and not m.finish_reason for m in body)
    assert len(msgs) <= 1 + -(-47 // 6)  # the first token alone, then 6 per message
