"""`llmgrpc bench`: statistics, the Poisson schedule and the load loops (no engine)."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import subprocess
import sys

import pytest
from llmgrpc import bench
from llmgrpc.bench_backends import GrpcBackend, RequestResult
from llmgrpc.cli import build_parser

from tests.fake_server import FakeServer

# --- statistics -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([1, 2, 3, 4], 90, 3.7),
        ([1, 2, 3, 4], 0, 1),
        ([1, 2, 3, 4], 100, 4),
        ([4, 1, 3, 2], 25, 1.75),  # unsorted input
        ([7], 99, 7),
        (list(range(101)), 99, 99),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], p: float, expected: float) -> None:
    assert bench.percentile(values, p) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan_and_distribution_is_empty() -> None:
    assert math.isnan(bench.percentile([], 50))
    assert bench.distribution_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_distribution_is_in_milliseconds() -> None:
    d = bench.distribution_ms([0.001, 0.002, 0.003])
    assert d["mean"] == pytest.approx(2.0) and d["p50"] == pytest.approx(2.0)
    assert d["p99"] == pytest.approx(2.98)


def _ok(ttft: float, e2e: float, tokens: int, itls: list[float] | None = None) -> RequestResult:
    return RequestResult(ok=True, ttft=ttft, e2e=e2e, output_tokens=tokens, itls=itls or [],
                         prompt_tokens=10, messages=tokens)  # fmt: skip


def test_summary_counts_tokens_latencies_and_failures_by_code() -> None:
    results = [
        _ok(0.1, 1.1, 11, [0.1] * 10),
        _ok(0.3, 2.3, 11, [0.2] * 10),
        RequestResult(ok=False, error="RESOURCE_EXHAUSTED", e2e=0.01),
        RequestResult(ok=False, error="RESOURCE_EXHAUSTED", e2e=0.01),
        RequestResult(ok=False, error="HTTP 503", e2e=0.01),
    ]
    s = bench.summarize(results, duration=2.0, cpu_seconds=0.011)
    assert s["requests"] == 5 and s["successful"] == 2
    assert s["failures"] == {"RESOURCE_EXHAUSTED": 2, "HTTP 503": 1}
    assert s["output_tokens"] == 22 and s["output_tokens_per_request"] == [11]
    assert s["output_tokens_per_s"] == pytest.approx(11.0)
    assert s["requests_per_s"] == pytest.approx(1.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert s["e2e_ms"]["p90"] == pytest.approx(2180.0)
    assert s["itl_ms"]["p50"] == pytest.approx(150.0)
    # TPOT: (e2e - ttft) / (tokens - 1) = 0.1 and 0.2 s.
    assert s["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert s["client_cpu_ms_per_1k_tokens"] == pytest.approx(500.0)
    assert s["mean_prompt_tokens"] == 10


def test_summary_with_only_failures_has_no_latencies() -> None:
    s = bench.summarize([RequestResult(ok=False, error="UNAVAILABLE")], 1.0, 0.1)
    assert s["successful"] == 0 and s["output_tokens_per_s"] == 0
    assert s["ttft_ms"]["p50"] is None and s["client_cpu_ms_per_1k_tokens"] is None
    assert "-" in bench.format_table({**s, "backend": "grpc",
                                      "workload": vars(bench.Workload())})  # fmt: skip


# --- the Poisson schedule ---------------------------------------------------------


def test_poisson_schedule_is_seeded_and_starts_at_zero() -> None:
    a = bench.poisson_schedule(100, rate=5.0, seed=7)
    assert a == bench.poisson_schedule(100, rate=5.0, seed=7)
    assert a != bench.poisson_schedule(100, rate=5.0, seed=8)
    assert a[0] == 0.0 and len(a) == 100
    assert all(later > earlier for earlier, later in itertools.pairwise(a))


def test_poisson_gaps_are_exponential_with_mean_one_over_rate() -> None:
    rate, n = 20.0, 20_000
    offsets = bench.poisson_schedule(n, rate, seed=1)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.03)
    # Exponential: the standard deviation equals the mean, P(gap > mean) = 1/e.
    assert statistics.pstdev(gaps) == pytest.approx(mean, rel=0.05)
    assert sum(g > 1 / rate for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.02)
    # Arrivals per second are Poisson: mean rate and variance both ~ rate.
    per_second = [0] * math.ceil(offsets[-1])
    for t in offsets:
        per_second[int(t)] += 1
    full = per_second[:-1]
    assert statistics.fmean(full) == pytest.approx(rate, rel=0.05)
    assert statistics.pvariance(full) == pytest.approx(rate, rel=0.2)


# --- load loops -------------------------------------------------------------------


class _Probe:
    """A fake `send` that records concurrency and start times."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.in_flight = self.peak = 0
        self.starts: list[float] = []
        self.loop = asyncio.get_running_loop()

    async def __call__(self, prompt: str) -> RequestResult:
        self.starts.append(self.loop.time())
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        return _ok(0.0, self.delay, 1)


async def test_closed_loop_keeps_exactly_concurrency_in_flight() -> None:
    probe = _Probe(delay=0.01)
    results = await bench.closed_loop(probe, [f"p{i}" for i in range(20)], concurrency=4)
    assert len(results) == 20 and probe.peak == 4
    # Fewer prompts than workers: one request each.
    probe = _Probe()
    assert len(await bench.closed_loop(probe, ["a", "b"], concurrency=8)) == 2


async def test_open_loop_sends_on_schedule_whatever_is_in_flight() -> None:
    probe = _Probe(delay=0.2)  # slower than the arrivals: requests pile up
    offsets = [0.0, 0.02, 0.04, 0.06]
    start = asyncio.get_running_loop().time()
    results = await bench.open_loop(probe, ["a", "b", "c", "d"], offsets)
    assert len(results) == 4 and probe.peak == 4
    for planned, actual in zip(offsets, probe.starts, strict=True):
        assert actual - start == pytest.approx(planned, abs=0.015)


def test_workload_is_validated() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        bench.Workload(concurrency=None, request_rate=None)
    with pytest.raises(ValueError, match="exactly one"):
        bench.Workload(concurrency=2, request_rate=1.0)
    with pytest.raises(ValueError, match="request_rate"):
        bench.Workload(concurrency=None, request_rate=0.0)
    with pytest.raises(ValueError, match="num_requests"):
        bench.Workload(num_requests=0)


# --- CLI and the gRPC backend against the fake engine -----------------------------------


def test_cli_registers_bench_with_defaults() -> None:
    args = build_parser().parse_args(["bench", "--request-rate", "3", "--num-requests", "9"])
    w = bench.workload_from_args(args)
    assert args.func is bench.run and args.backend == "grpc"
    assert w.request_rate == 3 and w.concurrency is None and w.num_requests == 9
    assert w.ignore_eos and w.max_tokens == 128
    closed = bench.workload_from_args(build_parser().parse_args(["bench", "--no-ignore-eos"]))
    assert closed.concurrency == 8 and not closed.ignore_eos


def test_client_package_does_not_import_vllm_or_torch() -> None:
    code = ("import sys, llmgrpc.cli, llmgrpc.bench, llmgrpc.bench_backends; "
            "print(sorted(m for m in ('vllm', 'torch', 'aiohttp') if m in sys.modules))"
            )  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("stream", [True, False])
async def test_grpc_backend_against_the_fake_engine(fake: FakeServer, stream: bool) -> None:
    backend = GrpcBackend(fake.target, stream=stream)
    w = bench.Workload(num_requests=12, concurrency=3, prompt="hello", max_tokens=6, warmup=2)
    s = await bench.bench(backend, w)
    assert s["failures"] == {} and s["successful"] == 12
    assert s["output_tokens"] == 72 and s["output_tokens_per_request"] == [6]
    assert s["mean_prompt_tokens"] == 5  # the fake engine: one token per byte
    assert s["messages_per_request"] == (6 if stream else 1)
    assert s["ttft_ms"]["p50"] > 0 and s["backend"] == ("grpc" if stream else "grpc-unary")


async def test_grpc_backend_over_several_connections(fake: FakeServer) -> None:
    """--channels: one connection per channel, the calls taking them in turn."""
    backend = GrpcBackend(fake.target, channels=3)
    w = bench.Workload(num_requests=9, concurrency=3, prompt="hello", max_tokens=2, warmup=0)
    s = await bench.bench(backend, w)
    assert s["failures"] == {} and s["successful"] == 9
    assert len(backend._clients) == 3
    assert len({id(backend._next_client()) for _ in range(3)}) == 3


async def test_grpc_backend_counts_failures_by_status(fake: FakeServer) -> None:
    backend = GrpcBackend(fake.target)
    too_long = "x" * 100  # the fake engine's context is 64 tokens
    s = await bench.bench(backend, bench.Workload(num_requests=3, concurrency=1, prompt=too_long,
                                                  max_tokens=4, warmup=0))  # fmt: skip
    assert s["failures"] == {"INVALID_ARGUMENT": 3} and s["successful"] == 0
