"""The embedded default model's figures beside the tiny model's, in docs/benchmarks.md.

    .venv/bin/python scripts/bench_default_model.py [--rounds 5] [--json OUT.json]

For each model (smollm2-135m-instruct, then tiny-llama-gqa): `llmgrpc-server
--model NAME` with every other flag at its default (nothing pinned, bfloat16,
compiled, the KV cache the server sizes itself), warmed up, then ROUNDS rounds,
each running concurrency 1, 8 and 16 in turn (closed loop, streamed, 128 output
tokens, ~32-token prompts, EOS ignored). One server at a time; nothing else
should run. Writes the section between the `default-model` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmgrpc import Client, bench
from llmgrpc.bench_backends import GrpcBackend

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
MODELS = ("smollm2-135m-instruct", "tiny-llama-gqa")
LEVELS = (1, 8, 16)
REQUESTS_PER_WORKER = {"smollm2-135m-instruct": 4, "tiny-llama-gqa": 16}
PORT, METRICS_PORT = 50099, 9499
BEGIN, END = "<!-- default-model:begin -->", "<!-- default-model:end -->"


def serve(model: str) -> subprocess.Popen[bytes]:
    server = REPO / ".venv" / "bin" / "llmgrpc-server"
    return subprocess.Popen(
        [str(server), "--model", model, "--port", str(PORT), "--metrics-port", str(METRICS_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def one(model: str, concurrency: int, warmup: int) -> dict[str, Any]:
    workload = bench.Workload(
        num_requests=REQUESTS_PER_WORKER[model] * concurrency, concurrency=concurrency,
        max_tokens=128, prompt_len=32, warmup=warmup,
    )  # fmt: skip
    return await bench.bench(GrpcBackend(f"127.0.0.1:{PORT}"), workload)


def measure(model: str, rounds: int) -> dict[int, list[dict[str, Any]]]:
    proc = serve(model)
    try:
        with Client(f"127.0.0.1:{PORT}") as client:
            client.wait_until_serving(timeout=600)
        bench.run_async(one(model, 8, warmup=16))  # compiles and warms every batch shape seen
        results: dict[int, list[dict[str, Any]]] = {c: [] for c in LEVELS}
        for r in range(rounds):
            for c in LEVELS:
                s = bench.run_async(one(model, c, warmup=c))
                assert not s["failures"], s["failures"]
                results[c].append(s)
                print(f"{model} round {r + 1} c={c}: {s['output_tokens_per_s']:.0f} tok/s, "
                      f"TTFT p99 {s['ttft_ms']['p99']:.0f} ms, gap p99 {s['itl_ms']['p99']:.0f} ms",
                      flush=True)  # fmt: skip
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def _spread(values: list[float], fmt: str = ",.0f") -> str:
    return (f"{format(min(values), fmt)} / {format(statistics.median(values), fmt)} / "
            f"{format(max(values), fmt)}")  # fmt: skip


def section(data: dict[str, dict[int, list[dict[str, Any]]]], rounds: int) -> str:
    lines = [
        BEGIN,
        "## The embedded default model beside the tiny one",
        "",
        f"`scripts/bench_default_model.py`, {datetime.date.today().isoformat()}: "
        "`llmgrpc-server --model NAME` with its defaults (bfloat16, compiled, nothing "
        "pinned, the KV cache the server sizes: 16 sequences of 2,048 tokens), one server "
        "at a time, a gRPC client process on the same 2-core machine; closed loop, "
        "streamed, 128 output tokens (EOS ignored), ~32-token prompts; "
        f"{rounds} rounds, each running c = 1, 8, 16 in turn. Figures are min / median / "
        "max over the rounds; the gap is between consecutive stream messages.",
        "",
        "| model | c | output tok/s | TTFT p50 ms | TTFT p99 ms | gap p99 ms | requests per round |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, levels in data.items():
        for c, runs in levels.items():
            lines.append(
                f"| {model} | {c} | {_spread([r['output_tokens_per_s'] for r in runs])} "
                f"| {_spread([r['ttft_ms']['p50'] for r in runs])} "
                f"| {_spread([r['ttft_ms']['p99'] for r in runs])} "
                f"| {_spread([r['itl_ms']['p99'] for r in runs])} | {runs[0]['requests']} |"
            )
    lines += ["", "Per round, output tokens/s:", ""]
    for model, levels in data.items():
        for c, runs in levels.items():
            per_round = ", ".join(f"{r['output_tokens_per_s']:,.0f}" for r in runs)
            lines.append(f"- {model}, c = {c}: {per_round}")
    smol, tiny = data.get(MODELS[0]), data.get(MODELS[1])
    if smol and tiny:
        ratios = ", ".join(
            f"c = {c}: {statistics.median(r['output_tokens_per_s'] for r in tiny[c]) / statistics.median(r['output_tokens_per_s'] for r in smol[c]):.0f}x"
            for c in LEVELS
        )
        lines += ["", f"The tiny model's median tokens/s over SmolLM2's: {ratios}."]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    args = p.parse_args()
    started = time.monotonic()
    data = {m: measure(m, args.rounds) for m in args.models}
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    text = DOC.read_text()
    new = section(data, args.rounds)
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + new + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC} in {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
