"""Client halves of the overload scenarios, shared by tests/integration/test_overload.py
and scripts/grpc_stall_loop.py, and run in a process of their own through
tests/fresh_process.run_fresh (which imports them by module name).

Streams that only hold capacity are started on a "slow reader" channel and
not read until released: the handler then waits on HTTP/2 flow control and
keeps its slot, so the scenarios do not depend on how fast the engine is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
from llmgrpc import AsyncClient

from tests import waiting
from tests.metrics_scrape import at_rest, sample_value, scrape, value
from tests.server_process import SLOW_READER, start_stream

LONG = 2000  # tokens: the most the 2048-token context allows after a short prompt


async def eventually(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Polls faster than the default: these tests watch short-lived queues."""
    return await waiting.eventually(predicate, timeout, interval=0.05)


def slow_reader(target: str) -> AsyncClient:
    """A client whose unread streams stall the server: tiny HTTP/2 windows.

    A stream it does not read holds its admission slot (the handler waits on
    flow control) for as long as the test wants, however fast the engine is.
    """
    return AsyncClient(target, options=SLOW_READER)


async def occupy(
    client: AsyncClient, url: str, n: int, max_tokens: int = LONG
) -> list[grpc.aio.Call]:
    """Start `n` streams and wait until the server has them all in flight."""
    assert await eventually(lambda: at_rest(url))  # none in flight but these
    calls = [start_stream(client, max_tokens) for _ in range(n)]
    assert await eventually(lambda: value(url, "llmgrpc_active_streams") == n)
    return calls


async def release(calls: list[grpc.aio.Call], url: str) -> None:
    """Cancel `calls` and wait until the server and the engine hold nothing."""
    for call in calls:
        call.cancel()
    await drained(url)


async def drained(url: str) -> None:
    """Wait until the server and the engine hold nothing.

    The engine's gauges come from one snapshot per engine step and the
    aborts of many calls reach it in batches: one snapshot can show none
    running and no KV in use while some aborts are still on their way
    (they were waiting), so every gauge is waited on.
    """
    for gauge in ("llmgrpc_active_streams", "vllm:num_requests_running",
                  "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):  # fmt: skip
        assert await eventually(lambda g=gauge: value(url, g) == 0), gauge  # type: ignore[misc]


async def probe_during_huge_call(target: str) -> dict[str, Any]:
    """The client half: one huge Generate call, health checks on another
    channel until it ends. Returns the call's outcome, how long it took and
    each health check's seconds."""
    async with AsyncClient(target) as client, AsyncClient(target) as prober:
        await prober.health()
        start = time.monotonic()
        # 6 MB: refused once tokenized, far too long
        work = client.generate("hello world " * 500_000, max_tokens=1, timeout=120)
        huge = asyncio.ensure_future(work)
        probes: list[float] = []
        while not huge.done():
            t = time.monotonic()
            assert await prober.health(timeout=120) == "SERVING"
            probes.append(time.monotonic() - t)
            await asyncio.sleep(0.05)
        huge_seconds = time.monotonic() - start
        try:
            outcome: str | int = len((await huge).token_ids)
        except grpc.aio.AioRpcError as e:
            outcome = e.code().name
    return {"outcome": outcome, "seconds": huge_seconds, "probes": probes}


QUEUE_COUNTERS = [
    ("grpc_server_started_total", {}),
    ("llmgrpc_requests_deadline_exceeded_total", {}),
    ("llmgrpc_requests_cancelled_total", {}),
    *(("grpc_server_handled_total", {"grpc_code": c})
      for c in ("DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED", "OK")),
    ("vllm:prompt_tokens_total", {}),
]  # fmt: skip


async def queue_late_calls(target: str, url: str, holders: int, late: int, late_prompt: int,
                           deadline: float) -> dict[str, Any]:  # fmt: skip
    """The client half: `holders` streams of LONG tokens on a slow-reader
    channel fill the engine's queue; then `late` unary calls with
    `late_prompt`-token prompts and a `deadline` s deadline, on a connection
    of their own. The holders stay until the server has counted both late
    calls (or 60 s), so the late ones can never run after them. Returns the
    late calls' codes, whether they were counted, and the Generate counters'
    changes (QUEUE_COUNTERS) since before the holders."""
    before = scrape(url)  # the engine is idle: nothing moves while this is read
    after = before

    def delta(name: str, **labels: str) -> float:
        labels = {"grpc_method": "Generate", **labels} if name != "vllm:prompt_tokens_total" else {}
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    def counted() -> bool:
        nonlocal after
        after = scrape(url)
        # Generate only: a GenerateStream call of an earlier test may still
        # expire meanwhile on a slow machine (in CI the total over all
        # methods differed while the Generate counts were both 2).
        return (delta("llmgrpc_requests_deadline_exceeded_total") == late
                and delta("grpc_server_handled_total", grpc_code="DEADLINE_EXCEEDED") == late)

    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection apart from the holders'
    async with AsyncClient(target, options=SLOW_READER) as holder, \
            AsyncClient(target, options=own) as client:  # fmt: skip
        calls = [start_stream(holder, LONG, timeout=300.0) for _ in range(holders)]
        # Admitted before the late calls are sent: they queue ahead of them.
        assert await eventually(lambda: value(url, "llmgrpc_active_streams") == holders, 60)

        async def late_call() -> str:
            try:
                await client.generate(prompt_token_ids=[7] * late_prompt, max_tokens=8,
                                      timeout=deadline)  # fmt: skip
            except grpc.aio.AioRpcError as e:
                return str(e.code().name)
            return "OK"

        codes = await asyncio.gather(*(late_call() for _ in range(late)))
        was_counted = await eventually(counted, 60)
        for call in calls:
            call.cancel()
    return {"codes": codes, "counted": was_counted,
            "prompt_tokens_before": sample_value(before, "vllm:prompt_tokens_total"),
            "deltas": {f"{name}{labels or ''}": delta(name, **labels)
                       for name, labels in QUEUE_COUNTERS}}  # fmt: skip
