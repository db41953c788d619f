"""`llmgrpc bench`: load a model server and report its throughput and latency.

    llmgrpc bench --target localhost:50051 --concurrency 32 --num-requests 256
    llmgrpc bench --backend openai --url http://localhost:8000 --request-rate 20
    llmgrpc bench --backend inprocess --model tiny-llama-gqa --concurrency 8

Closed loop (`--concurrency N`): N workers; each sends its next request as soon
as its previous one ends. Open loop (`--request-rate R`): requests arrive as a
Poisson process of rate R per second (seeded), whatever the server's state.

The same definitions hold for every backend:
- TTFT: the request is sent → the first message carrying a token arrives;
- ITL: the gap between consecutive messages carrying tokens (one message may
  carry several tokens when the server coalesces);
- TPOT: (E2E - TTFT) / (output tokens - 1), per request;
- E2E: the request is sent → its last message arrives;
- throughput: successful requests and their output tokens / the wall time of
  the measured phase (warm-up excluded);
- client CPU: this process's CPU time during the measured phase (all threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llmgrpc.bench_backends import Backend, RequestResult, make_backend

PERCENTILES = (50, 90, 99)
# Common words: a prompt of n words is about 2.4 n tokens for the embedded models'
# 512-token BPE; `make_prompts` measures the ratio with the server's tokenizer.
_TEXT = (
    "the model serves tokens to many users at once while a small engine schedules "
    "requests into batches and the cache keeps keys and values for every sequence "
    "that is still running on the node in a cluster where metrics are watched and "
    "alerts fire when latency grows beyond what the service level objective allows "
    "so engineers read dashboards plan capacity and tune the server for each workload"
)
WORDS = tuple(_TEXT.split())


@dataclass(frozen=True)
class Workload:
    """What to send. Exactly one of `concurrency` (closed loop) or `request_rate` (open)."""

    num_requests: int = 64
    concurrency: int | None = 8
    request_rate: float | None = None
    prompt_len: int = 32
    prompt: str | None = None
    max_tokens: int = 128
    ignore_eos: bool = True
    warmup: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("set exactly one of concurrency and request_rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError("request_rate must be > 0")
        if self.prompt_len < 1 or self.max_tokens < 1 or self.warmup < 0:
            raise ValueError("prompt_len and max_tokens must be >= 1, warmup >= 0")


# --- statistics -----------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and percentiles of `values` (seconds), in milliseconds."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ordered = sorted(values)
    out: dict[str, float | None] = {"mean": 1e3 * sum(ordered) / len(ordered)}
    out.update({f"p{p}": 1e3 * percentile(ordered, p) for p in PERCENTILES})
    return out


def summarize(
    results: Sequence[RequestResult], duration: float, cpu_seconds: float | None = None
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1)
             for r in ok if r.ttft is not None and r.output_tokens > 1]  # fmt: skip
    summary: dict[str, Any] = {
        "requests": len(results),
        "successful": len(ok),
        "failures": dict(Counter(r.error or "UNKNOWN" for r in results if not r.ok)),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens_per_s": tokens / duration if duration > 0 else None,
        "output_tokens": tokens,
        "output_tokens_per_request": sorted({r.output_tokens for r in ok}),
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "messages_per_request": sum(r.messages for r in ok) / len(ok) if ok else None,
        "ttft_ms": distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itls]),
        "tpot_ms": distribution_ms(tpots),
        "e2e_ms": distribution_ms([r.e2e for r in ok]),
    }
    if cpu_seconds is not None:
        summary["client_cpu_s"] = cpu_seconds
        summary["client_cpu_ms_per_1k_tokens"] = (
            1e6 * cpu_seconds / tokens if tokens else None
        )
    return summary


# --- load generation ----------------------------------------------------------


def poisson_schedule(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets (seconds from the start) of `n` requests, Poisson with `rate`/s.

    The gaps are exponential with mean 1/rate; the first request arrives at 0.
    """
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


async def make_prompts(backend: Backend, workload: Workload, count: int) -> list[str]:
    """`count` distinct prompts of about `prompt_len` tokens (distinct, so that the
    prefix cache does not turn prefill into a lookup), or `--prompt` repeated."""
    if workload.prompt is not None:
        return [workload.prompt] * count
    rng = random.Random(workload.seed)
    sample = " ".join(rng.choices(WORDS, k=200))
    tokens = await backend.count_tokens(sample)
    per_word = tokens / 200 if tokens else 2.4
    n_words = max(1, round(workload.prompt_len / per_word))
    return [" ".join(rng.choices(WORDS, k=n_words)) for _ in range(count)]


Send = Callable[[str], Coroutine[Any, Any, RequestResult]]


async def closed_loop(send: Send, prompts: Sequence[str], concurrency: int) -> list[RequestResult]:
    """`concurrency` workers; each sends the next prompt when its previous request ends."""
    results: list[RequestResult] = []
    queue = iter(prompts)

    async def worker() -> None:
        for prompt in queue:  # the workers share one iterator
            results.append(await send(prompt))  # noqa: PERF401  (awaits in turn)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return results


async def open_loop(send: Send, prompts: Sequence[str], offsets: Sequence[float]
                    ) -> list[RequestResult]:  # fmt: skip
    """Send prompt i at `offsets[i]` seconds from now, however many are in flight."""
    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestResult]] = []
    for prompt, offset in zip(prompts, offsets, strict=True):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(prompt)))
    return list(await asyncio.gather(*tasks))


async def run_workload(backend: Backend, workload: Workload) -> dict[str, Any]:
    """Warm up, then measure `workload` on a started backend; the summary as a dict."""
    w = workload
    prompts = await make_prompts(backend, w, w.warmup + w.num_requests)

    async def send(prompt: str) -> RequestResult:
        return await backend.send(prompt, w.max_tokens, w.ignore_eos)

    if w.warmup:
        await closed_loop(send, prompts[: w.warmup], w.concurrency or w.warmup)
    measured = prompts[w.warmup:]
    cpu0, t0 = time.process_time(), time.perf_counter()
    if w.concurrency is not None:
        results = await closed_loop(send, measured, w.concurrency)
    else:
        assert w.request_rate is not None
        results = await open_loop(send, measured, poisson_schedule(len(measured), w.request_rate,
                                                                   w.seed))  # fmt: skip
    duration, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    summary = summarize(results, duration, cpu)
    summary["backend"] = backend.name
    summary["workload"] = asdict(w)
    return summary


# --- output -------------------------------------------------------------------


def _cell(value: float | None, fmt: str = ">9.1f") -> str:
    return format(value, fmt) if value is not None else format("-", ">9")


def format_table(s: dict[str, Any]) -> str:
    w = s["workload"]
    load = (f"concurrency {w['concurrency']}" if w["concurrency"] is not None
            else f"Poisson {w['request_rate']:g} req/s")  # fmt: skip
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(s["failures"].items())) or "none"
    lines = [
        f"backend {s['backend']}, {load}, {s['requests']} requests "
        f"(+{w['warmup']} warm-up), max_tokens {w['max_tokens']}",
        f"{'successful':<22}{s['successful']}   failures: {failures}",
        f"{'duration':<22}{s['duration_s']:.2f} s",
        f"{'requests/s':<22}{_cell(s['requests_per_s'], '.2f').strip()}",
        f"{'output tokens/s':<22}{_cell(s['output_tokens_per_s'], '.1f').strip()}   "
        f"({s['output_tokens']} tokens, "
        f"{_cell(s['messages_per_request'], '.1f').strip()} messages/request)",
    ]
    if "client_cpu_ms_per_1k_tokens" in s:
        cpu = _cell(s["client_cpu_ms_per_1k_tokens"], ".1f").strip()
        lines.append(f"{'client CPU':<22}{cpu} ms per 1k tokens")
    lines.append(f"{'(ms)':<22}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}")
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"),
                       ("e2e_ms", "E2E")):  # fmt: skip
        d = s[key]
        lines.append(f"{label:<22}" + "".join(_cell(d[k]) for k in ("mean", "p50", "p90", "p99")))
    return "\n".join(lines)


# --- CLI ----------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register the `bench` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="load-test a server: throughput, TTFT, ITL, E2E",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--backend", choices=("grpc", "openai", "inprocess"), default="grpc")
    p.add_argument("--target", default="localhost:50051", help="grpc: host:port")
    p.add_argument("--url", default="http://localhost:8000", help="openai: the server's base URL")
    p.add_argument("--model", default="tiny-llama-gqa",
                   help="openai: the served model name; inprocess: a model directory "
                        "or embedded model name")  # fmt: skip
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight (default 8)")
    load.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (approximate)")
    p.add_argument("--prompt", help="send this prompt in every request instead")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens (default: on)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=4, help="requests sent before measuring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unary", action="store_true", help="grpc: call Generate, not GenerateStream")
    p.add_argument("--channels", type=int, default=1,
                   help="grpc: channels with a connection each, taken in turn (a server with "
                        "--api-server-count N spreads connections over its front ends)")
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline, seconds")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="inprocess: the server's default (64 MiB for embedded models)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None,
                   help="inprocess: the server's default (the model's context)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def workload_from_args(args: argparse.Namespace) -> Workload:
    concurrency = args.concurrency
    if concurrency is None and args.request_rate is None:
        concurrency = 8
    return Workload(
        num_requests=args.num_requests, concurrency=concurrency, request_rate=args.request_rate,
        prompt_len=args.prompt_len, prompt=args.prompt, max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos, warmup=args.warmup, seed=args.seed,
    )  # fmt: skip


async def bench(backend: Backend, workload: Workload) -> dict[str, Any]:
    await backend.start()
    try:
        return await run_workload(backend, workload)
    finally:
        await backend.close()


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when every request succeeded, 1 otherwise."""
    try:
        workload = workload_from_args(args)
        server_args = [
            arg for flag, value in (("--kv-cache-memory-bytes", args.kv_cache_memory_bytes),
                                    ("--max-model-len", args.max_model_len))
            if value is not None for arg in (flag, str(value))
        ]  # fmt: skip
        backend = make_backend(
            args.backend, target=args.target, url=args.url, model=args.model,
            stream=not args.unary, timeout=args.timeout, server_args=server_args,
            channels=args.channels,
        )  # fmt: skip
    except ValueError as e:
        print(f"llmgrpc bench: {e}", file=sys.stderr)
        return 2
    summary = run_async(bench(backend, workload))
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0 if not summary["failures"] else 1


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when it is installed (as the server and vLLM's do): less client CPU."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
