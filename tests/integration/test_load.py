"""Load and soak against the real engine, bounded in count and time.

On the shared `llama` server, which has room for the load (`--max-in-flight
512`, 300 calls per connection). The load test sends 2,048 streams, 256 at a
time, and accounts for every one; the soak runs mixed traffic for
`LLMGRPC_SOAK_SECONDS` (tests/settings.py: 30 in `make test`, 1,800 in
`make test-long`) while sampling the resident memory and open file
descriptors of the server and of the engine's processes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import psutil
import pytest
from llmgrpc import AsyncClient
from llmgrpc.client import generate_request
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.metrics_scrape import at_rest, sample_value, scrape, value
from tests.server_process import LLAMA_MAX_CONCURRENT_STREAMS as PER_CONNECTION
from tests.server_process import SLOW_READER, ServerProcess
from tests.settings import SOAK_SECONDS
from tests.waiting import NOT_YET, eventually

pytestmark = pytest.mark.engine
SEED = 20261125
CALL_TIMEOUT = 120.0  # every call has a deadline: nothing can hang
# Statuses a caller may see under load (docs/api.md); anything else fails.
DOCUMENTED_UNDER_LOAD = {
    grpc.StatusCode.OK,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass
class Result:
    code: grpc.StatusCode
    seconds: float
    tokens: int = 0
    complete: bool = False  # OK, finish LENGTH, exactly max_tokens tokens


async def one_stream(client: AsyncClient, max_tokens: int, request_id: str) -> Result:
    start = time.monotonic()
    tokens, finish = 0, pb.FINISH_REASON_UNSPECIFIED
    req = generate_request("Load", max_tokens=max_tokens, ignore_eos=True, request_id=request_id)
    try:
        async for msg in client.stub.GenerateStream(req, timeout=CALL_TIMEOUT):
            tokens += len(msg.token_ids)
            finish = msg.finish_reason or finish
    except grpc.aio.AioRpcError as e:
        return Result(e.code(), time.monotonic() - start, tokens)
    complete = tokens == max_tokens and finish == pb.FINISH_REASON_LENGTH
    return Result(grpc.StatusCode.OK, time.monotonic() - start, tokens, complete)


@dataclass
class PeakSampler:
    """Samples gauges (one scrape each time) in a thread while the load runs."""

    url: str
    names: tuple[str, ...]
    samples: list[dict[str, float]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = await asyncio.to_thread(scrape, self.url)
                self.samples.append({n: sample_value(sample, n) for n in self.names})
            except NOT_YET:
                pass  # a scrape lost under load: a gap in a report, not a failure
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()

    def peak(self, name: str) -> float:
        return max((s[name] for s in self.samples), default=0.0)


async def test_load_256_concurrent_streams_2048_requests(llama: ServerProcess) -> None:
    url = llama.metrics_url
    total, concurrency = 2048, 256
    rng = random.Random(SEED)
    plan = [(f"load-{i}", rng.randint(16, 32)) for i in range(total)]
    assert await eventually(lambda: at_rest(url))  # the count below is of these calls only
    handled_before = value(url, "grpc_server_handled_total", grpc_method="GenerateStream")
    results: dict[str, Result] = {}
    in_flight, peak_in_flight = 0, 0
    queue = iter(plan)

    async def worker(client: AsyncClient) -> None:
        nonlocal in_flight, peak_in_flight
        for request_id, max_tokens in queue:
            in_flight += 1
            peak_in_flight = max(peak_in_flight, in_flight)
            results[request_id] = await one_stream(client, max_tokens, request_id)
            in_flight -= 1

    gauges = ("llmgrpc_active_streams", "vllm:num_requests_running", "vllm:num_requests_waiting")
    sampler = PeakSampler(url, gauges)
    sampling = asyncio.create_task(sampler.run())
    start = time.monotonic()
    async with AsyncClient(llama.target) as client:
        await client.generate("warm up", max_tokens=2)
        workers = [worker(client) for _ in range(concurrency)]
        # The whole run is bounded too: a hang fails the test, it cannot stall it.
        await asyncio.wait_for(asyncio.gather(*workers), 600)
    elapsed = time.monotonic() - start
    sampler.stop()
    await sampling

    codes = Counter(r.code for r in results.values())
    latencies = sorted(r.seconds for r in results.values())
    tokens = sum(r.tokens for r in results.values())
    print(f"\nload: {total} streams, {concurrency} at a time, in {elapsed:.1f} s "
          f"({total / elapsed:.0f} req/s, {tokens / elapsed:.0f} tokens/s); "
          f"{dict((c.name, n) for c, n in codes.items())}; latency p50 "
          f"{latencies[len(latencies) // 2]:.2f} s, p99 {latencies[int(len(latencies) * 0.99)]:.2f} s, "
          f"max {latencies[-1]:.2f} s; sampled peaks: "
          + ", ".join(f"{n} {sampler.peak(n):.0f}" for n in gauges))  # fmt: skip
    # Zero lost: every request came back, once, and the server accounted for each.
    assert len(results) == total
    # 256 calls open at once on the client by construction. How many of them
    # the server and the engine held at once is reported, not asserted: it is
    # set by how fast this client (one Python process for 256 streams) gets
    # its calls out on a 2-core machine shared with the engine. Sampled peaks
    # of llmgrpc_active_streams were 200-256 at ~2,600 tokens/s or more, 22-132
    # at 1,200-1,900 tokens/s, and 9 in one CI run at 1,029 tokens/s when the
    # calls reached the server late (docs/reliability.md). That the server
    # holds hundreds of streams at once on the real engine is proven where the
    # test controls it: test_calls_beyond_the_per_connection_limit_are_refused
    # below holds 300 on one connection.
    assert peak_in_flight == concurrency
    assert await eventually(
        lambda: (
            value(url, "grpc_server_handled_total", grpc_method="GenerateStream") - handled_before
            == total
        )
    )
    # Every request completed whole or ended with a documented status; on an
    # unfaulted server nearly all complete.
    assert set(codes) <= DOCUMENTED_UNDER_LOAD, codes
    assert all(r.complete for r in results.values() if r.code == grpc.StatusCode.OK)
    assert codes[grpc.StatusCode.OK] >= 0.99 * total, codes
    assert await eventually(lambda: value(url, "llmgrpc_active_streams") == 0)
    assert await eventually(lambda: value(url, "vllm:num_requests_running") == 0)


def _family(server: ServerProcess) -> dict[str, psutil.Process]:
    assert server.proc is not None
    main = psutil.Process(server.proc.pid)
    out = {"server": main}
    for p in main.children(recursive=True):
        if "EngineCore" in p.name():
            out["engine core"] = p
        elif "Worker" in p.name():
            out["engine worker"] = p
    assert "engine core" in out, [p.name() for p in main.children(recursive=True)]
    return out


def _sample(family: dict[str, psutil.Process]) -> dict[str, float]:
    out: dict[str, float] = {}
    for role, p in family.items():
        out[f"{role} rss MiB"] = p.memory_info().rss / 2**20
        out[f"{role} fds"] = p.num_fds()
    return out


async def soak_traffic(client: AsyncClient, rng: random.Random, until: float,
                       outcomes: Counter[str]) -> None:  # fmt: skip
    """One client loop of mixed traffic: streams, unary calls, early cancels."""
    n = 0
    while time.monotonic() < until:
        n += 1
        kind = rng.choices(("stream", "unary", "cancel"), weights=(6, 3, 1))[0]
        max_tokens = rng.randint(16, 64)
        try:
            if kind == "stream":
                got = [d async for d in client.stream(
                    "Soak", max_tokens=max_tokens, ignore_eos=True, timeout=CALL_TIMEOUT)]  # fmt: skip
                assert sum(len(d.token_ids) for d in got) == max_tokens
            elif kind == "unary":
                resp = await client.generate(
                    "Soak", max_tokens=max_tokens, ignore_eos=True, timeout=CALL_TIMEOUT
                )
                assert resp.usage.completion_tokens == max_tokens
            else:
                call = client.stub.GenerateStream(
                    generate_request("Soak", max_tokens=1000, ignore_eos=True),
                    timeout=CALL_TIMEOUT,
                )
                await call.read()
                call.cancel()
            outcomes[kind] += 1
        except grpc.aio.AioRpcError as e:
            outcomes[f"{kind} {e.code().name}"] += 1


async def test_calls_beyond_the_per_connection_limit_are_refused(llama: ServerProcess) -> None:
    """--max-concurrent-streams on the real server: with 300 calls open on one
    connection the next is refused at once with RESOURCE_EXHAUSTED naming the
    flag, while another connection is served."""
    url = llama.metrics_url
    assert await eventually(lambda: at_rest(url))  # the streams counted below are these
    async with AsyncClient(llama.target, options=SLOW_READER) as holder:
        # Held in flight by flow control, not by the engine: 32 tokens with
        # 20 logprobs each (over 1 KiB) are more than the slow reader's
        # window, and the engine is done with all 300 calls in seconds, so
        # the other connection's call below does not queue behind them (600
        # tokens each took 60 s; 300 plain tokens, a 90,000-token wait, 35 s).
        req = generate_request("Hold", max_tokens=32, ignore_eos=True, logprobs=20)
        held = [holder.stub.GenerateStream(req, timeout=CALL_TIMEOUT) for _ in range(PER_CONNECTION)]
        try:
            assert await eventually(lambda: value(url, "llmgrpc_active_streams") == PER_CONNECTION)
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await holder.generate("one more", max_tokens=1, timeout=30)
            refused_in = time.monotonic() - start
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"already has {PER_CONNECTION} calls in flight" in (e.value.details() or "")
            assert "--max-concurrent-streams" in (e.value.details() or "")
            async with AsyncClient(llama.target) as other:
                assert (await other.generate("other", max_tokens=2, ignore_eos=True)).token_ids
        finally:
            for call in held:
                call.cancel()
        print(f"\ncall {PER_CONNECTION + 1} on one connection refused in {refused_in * 1000:.0f} ms")
    assert await eventually(lambda: value(url, "llmgrpc_active_streams") == 0)
    assert await eventually(lambda: value(url, "vllm:num_requests_running") == 0)


@pytest.mark.timeout(SOAK_SECONDS + 300)  # the soak, then draining its calls
async def test_soak_memory_and_fds_stay_flat(llama: ServerProcess) -> None:
    """Mixed traffic for SOAK_SECONDS; after a warm-up (the first sixth, at
    most 30 s), resident memory and open fds must not grow beyond a bound."""
    duration, interval, concurrency = SOAK_SECONDS, 5.0, 32
    warm_up = min(30.0, duration / 6)
    limits = {"rss MiB": 100.0, "fds": 50.0}
    family = _family(llama)
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    samples: list[tuple[float, dict[str, float]]] = []
    start = time.monotonic()
    until = start + duration
    async with AsyncClient(llama.target) as client:
        traffic = [asyncio.create_task(soak_traffic(client, random.Random(rng.random()), until,
                                                    outcomes)) for _ in range(concurrency)]  # fmt: skip
        while time.monotonic() < until:
            samples.append((time.monotonic() - start, _sample(family)))
            await asyncio.sleep(interval)
        await asyncio.wait_for(asyncio.gather(*traffic), CALL_TIMEOUT + 30)
    samples.append((time.monotonic() - start, _sample(family)))

    after_warm_up = [s for t, s in samples if t >= warm_up]
    base, last = after_warm_up[0], after_warm_up[-1]
    growth = {k: max(s[k] for s in after_warm_up) - base[k] for k in base}
    print(
        f"\nsoak: {duration:.0f} s, {concurrency} clients, {sum(outcomes.values())} calls "
        f"{dict(outcomes)}; {len(samples)} samples every {interval:.0f} s, warm-up {warm_up:.0f} s"
    )
    for k in base:
        print(f"  {k:24s} start {samples[0][1][k]:8.1f}  after warm-up {base[k]:8.1f}  "
              f"end {last[k]:8.1f}  max growth {growth[k]:+7.1f}")  # fmt: skip
    assert not [k for k in outcomes if " " in k], outcomes  # no call failed
    assert sum(outcomes.values()) > 0
    for k, g in growth.items():
        bound = limits["fds"] if k.endswith("fds") else limits["rss MiB"]
        assert g <= bound, f"{k} grew by {g:.1f} (bound {bound})"
