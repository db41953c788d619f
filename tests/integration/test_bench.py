"""`llmgrpc bench --backend grpc` against the real server: a smoke test, not a benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.server_process import ServerProcess

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
