"""`server.serve`, the whole lifecycle, on the fake engine."""

from __future__ import annotations

import asyncio
import gc

from llmgrpc import AsyncClient
from llmgrpc_server import server
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.metrics import GrpcMetrics
from prometheus_client import CollectorRegistry

from tests.fakes import FakeEngine


async def test_the_startup_heap_is_frozen_while_serving() -> None:
    """The garbage collector's full passes skip what startup built (a full pass
    over vLLM's heap paused every stream for up to 0.9 s), and the heap is
    unfrozen once the server has stopped."""
    assert gc.get_freeze_count() == 0
    stop, started = asyncio.Event(), asyncio.Event()
    ports: list[int] = []

    def on_started(running: server.RunningServer) -> None:
        ports.append(running.port)
        started.set()

    registry = CollectorRegistry()

    async def load() -> FakeEngine:
        return FakeEngine()

    serving = asyncio.create_task(server.serve(
        ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_timeout=1), "fake", load,
        GrpcMetrics(registry), stop=stop, on_started=on_started,
        registry=registry,
    ))  # fmt: skip
    try:
        await started.wait()
        async with AsyncClient(f"127.0.0.1:{ports[0]}") as client:
            assert await eventually_serving(client)
            assert gc.get_freeze_count() > 0
            assert (await client.generate("hi", max_tokens=2)).usage.completion_tokens == 2
    finally:
        stop.set()
        assert await serving == 0
    assert gc.get_freeze_count() == 0


async def eventually_serving(client: AsyncClient, timeout: float = 30.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await client.health() != "SERVING":
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True

