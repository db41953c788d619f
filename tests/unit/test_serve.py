"""`server.serve`, the whole lifecycle, on the fake engine."""

from __future__ import annotations

import asyncio
import gc

from llmgrpc import Client
from llmgrpc_server import server
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.metrics import GrpcMetrics
from prometheus_client import CollectorRegistry

from tests.fakes import FakeEngine
from tests.waiting import eventually


async def test_the_startup_heap_is_frozen_while_serving() -> None:
    """The garbage collector's full passes skip what startup built (a full pass
    over vLLM's heap paused every stream for up to 0.9 s), and the heap is
    unfrozen once the server has stopped."""
    assert gc.get_freeze_count() == 0
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    registry = CollectorRegistry()

    async def load() -> FakeEngine:
        return FakeEngine()

    serving = asyncio.create_task(server.serve(
        ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_timeout=1), "fake", load,
        GrpcMetrics(registry), stop=stop, on_started=lambda r: port.set_result(r.port),
        registry=registry,
    ))  # fmt: skip
    try:
        with Client(f"127.0.0.1:{await port}") as client:
            assert await eventually(lambda: client.health() == "SERVING")
            assert gc.get_freeze_count() > 0
            # A blocking client: its calls run in a thread, the server in this loop.
            reply = await asyncio.to_thread(client.generate, "hi", max_tokens=2)
            assert reply.usage.completion_tokens == 2
    finally:
        stop.set()
        assert await serving == 0
    assert gc.get_freeze_count() == 0
