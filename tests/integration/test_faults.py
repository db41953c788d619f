"""Faults against the real engine: a cancellation storm (the shared `llama`
server) and engine death (the last test on the shared `moe` server: it kills
its engine).

(Graceful drain under load is in test_lifecycle.py, the drain-timeout path in
test_overload.py.)
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2
from llmgrpc import AsyncClient
from llmgrpc.client import generate_request
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.fresh_process import run_fresh
from tests.metrics_scrape import at_rest, value
from tests.server_process import ServerProcess
from tests.waiting import eventually

pytestmark = pytest.mark.engine
SEED = 20261125


async def storm_stream(client: AsyncClient, rng: random.Random) -> tuple[str, int]:
    """One stream cancelled at a random point; returns where it was cut and
    how many tokens it asked for."""
    max_tokens = rng.randint(500, 1900)
    return await _cut(client, rng, max_tokens), max_tokens


async def _cut(client: AsyncClient, rng: random.Random, max_tokens: int) -> str:
    how = rng.choice(("at once", "after k messages", "after a delay"))
    call = client.stub.GenerateStream(
        generate_request("Storm", max_tokens=max_tokens, ignore_eos=True), timeout=60
    )
    if how == "at once":
        await asyncio.sleep(rng.uniform(0, 0.05))  # maybe before the server saw it
    elif how == "after k messages":
        for _ in range(rng.randint(1, 40)):
            if await call.read() is grpc.aio.EOF:
                return "finished"
    else:
        cut_at = time.monotonic() + rng.uniform(0.05, 1.5)
        while time.monotonic() < cut_at:
            try:
                msg = await asyncio.wait_for(call.read(), cut_at - time.monotonic())
            except TimeoutError:
                break
            if msg is grpc.aio.EOF:
                return "finished"
    call.cancel()
    code = await call.code()
    assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.OK), code
    return how if code == grpc.StatusCode.CANCELLED else "finished"


async def test_cancellation_storm_leaves_nothing_behind(llama: ServerProcess) -> None:
    url = llama.metrics_url
    rng = random.Random(SEED)
    waves, per_wave = 6, 64

    def counters() -> tuple[float, float, float]:
        return (
            value(url, "llmgrpc_requests_cancelled_total", grpc_method="GenerateStream"),
            value(url, "grpc_server_handled_total", grpc_method="GenerateStream",
                  grpc_code="CANCELLED"),
            value(url, "vllm:generation_tokens_total"),
        )  # fmt: skip

    # Earlier tests' calls have all ended: the deltas below are this test's.
    assert await eventually(lambda: at_rest(url))
    before = counters()
    cuts: Counter[str] = Counter()
    requested = 0
    start = time.monotonic()
    async with AsyncClient(llama.target) as client:
        for _ in range(waves):
            wave = [storm_stream(client, random.Random(rng.random())) for _ in range(per_wave)]
            for how, max_tokens in await asyncio.wait_for(asyncio.gather(*wave), 120):
                cuts[how] += 1
                requested += max_tokens
        elapsed = time.monotonic() - start

        # Nothing is left running, waiting, holding KV blocks or counted active.
        for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                      "vllm:kv_cache_usage_perc", "llmgrpc_active_streams"):  # fmt: skip
            assert await eventually(lambda g=gauge: value(url, g) == 0), gauge
        cancelled, handled_cancelled, generated = (
            a - b for a, b in zip(counters(), before, strict=True)
        )
        # The server serves normally.
        assert await client.health() == "SERVING"
        unary = await client.generate("after the storm", max_tokens=12, ignore_eos=True)
        deltas = [d async for d in client.stream("after the storm", max_tokens=12,
                                                 ignore_eos=True)]  # fmt: skip
        assert unary.usage.completion_tokens == 12 == sum(len(d.token_ids) for d in deltas)
        assert deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH

    total = waves * per_wave
    assert sum(cuts.values()) == total
    print(
        f"\ncancellation storm: {total} streams in {elapsed:.1f} s, cut {dict(cuts)}; "
        f"server counted {cancelled:.0f} cancelled; engine generated {generated:.0f} of "
        f"{requested} tokens asked for"
    )
    # Every cancellation the server saw was counted once, under both names.
    # (A stream cut after the server sent its last message, or before the
    # server saw it, is not a cancellation there.)
    assert cancelled == handled_cancelled
    assert 0 < cancelled <= total - cuts["finished"]
    # The engine stopped work for the cut streams instead of finishing it
    # (under a quarter of it ran here; an idle machine decodes faster).
    assert generated < 0.8 * requested


@pytest.mark.stops_server
async def test_engine_death_fails_calls_with_unavailable_and_exits_nonzero(
    moe: ServerProcess,
) -> None:
    # One engine slot (the `moe` server's --max-num-seqs 1): sixteen streams
    # of 2000 tokens are ~32,000 decode steps, so most are surely still in
    # the engine when it is killed.
    assert moe.proc is not None
    family = psutil.Process(moe.proc.pid).children(recursive=True)
    try:
        cores = [p for p in family if "EngineCore" in p.name()]
        assert len(cores) == 1, [(p.pid, p.name()) for p in family]
        # The client runs in a process of its own (tests/fresh_process.py
        # says why): when it acts is what this test is about.
        seen = await asyncio.to_thread(run_fresh, kill_engine_under_load, moe.target,
                                       cores[0].pid)  # fmt: skip
        _check_engine_death(seen)
        code = await asyncio.to_thread(moe.wait_exit, 60)
        print(f"server exit code {code}")
        assert code != 0, "the server must exit non-zero so it is restarted"
        # No engine process outlives the server.
        _, alive = await asyncio.to_thread(psutil.wait_procs, family, 30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        for p in family:  # only if the assertion above failed
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()


ENGINE_DEATH_STREAMS, ENGINE_DEATH_TOKENS = 16, 2000


async def kill_engine_under_load(target: str, core_pid: int) -> dict[str, Any]:
    """The client half: streams, the kill, and what every call and watch saw."""
    n, max_tokens = ENGINE_DEATH_STREAMS, ENGINE_DEATH_TOKENS
    not_serving_after: dict[str, float] = {}
    killed_at = float("inf")
    async with AsyncClient(target) as client:
        statuses: dict[str, list[str]] = {"": [], "llmgrpc.v1.LLMService": []}

        async def watch(service: str) -> None:
            stream = client.health_stub.Watch(health_pb2.HealthCheckRequest(service=service))
            try:
                async for resp in stream:
                    statuses[service].append(
                        health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                    )
                    if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        not_serving_after[service] = time.monotonic() - killed_at
            except grpc.aio.AioRpcError as e:  # the server went away
                statuses[service].append(e.code().name)

        generating = asyncio.Event()

        async def outcome(call: grpc.aio.UnaryStreamCall) -> tuple[grpc.StatusCode, str, int]:
            tokens = 0
            try:
                async for msg in call:  # read as it comes: nothing waits in buffers
                    tokens += len(msg.token_ids)
                    generating.set()
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details() or "", tokens
            return grpc.StatusCode.OK, "", tokens

        watchers = [asyncio.create_task(watch(s)) for s in statuses]
        req = generate_request("Doomed", max_tokens=max_tokens, ignore_eos=True)
        streams = [
            asyncio.create_task(outcome(client.stub.GenerateStream(req, timeout=120)))
            for _ in range(n)
        ]
        # Kill as soon as the first stream has a token: the other fifteen
        # wait in the engine's queue (first come, first served). No metrics
        # poll in between: on this shared machine one can take many seconds.
        sent_at = time.monotonic()
        await asyncio.wait_for(generating.wait(), 120)
        psutil.Process(core_pid).send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        failed_after = time.monotonic() - killed_at
        try:
            await client.generate("anyone there?", max_tokens=1, timeout=10)
            late = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            late = e.code()
        await asyncio.wait_for(asyncio.gather(*watchers), 60)

    return {
        "results": [(c.name, details, tokens) for c, details, tokens in results],
        "statuses": statuses, "not_serving_after": not_serving_after, "late": late.name,
        "first_token_after": killed_at - sent_at, "failed_after": failed_after,
    }  # fmt: skip


def _check_engine_death(seen: dict[str, Any]) -> None:
    n, max_tokens = ENGINE_DEATH_STREAMS, ENGINE_DEATH_TOKENS
    results, statuses = seen["results"], seen["statuses"]
    codes = Counter(c for c, _, _ in results)
    adapter = sum("the engine has stopped" in details for _, details, _ in results)
    print(
        f"\nengine killed {seen['first_token_after']:.1f} s after the calls went out: {n} streams -> "
        f"{dict(codes)} within {seen['failed_after']:.1f} s ({adapter} with the adapter's "
        f"message); health {statuses}, NOT_SERVING after "
        f"{ {k: round(v, 2) for k, v in seen['not_serving_after'].items()} } s; a new call -> "
        f"{seen['late']}"
    )
    # Streams the engine finished before the kill are whole; every other one
    # ends UNAVAILABLE (retry elsewhere), never OK with a cut text, never
    # another code.
    for code, details, tokens in results:
        if code == "OK":
            assert tokens == max_tokens
        else:
            assert code == "UNAVAILABLE", (code, details)
    assert codes["UNAVAILABLE"] >= n // 2
    # The adapter mapped EngineDeadError (the process did not just vanish).
    assert adapter > 0
    assert seen["late"] == "UNAVAILABLE"
    for service, watched in statuses.items():
        assert watched[0] == "SERVING", (service, watched)
        assert "NOT_SERVING" in watched, (service, watched)
