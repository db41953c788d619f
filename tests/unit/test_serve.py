"""`server.serve`, the whole lifecycle, on the fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from llmgrpc import AsyncClient, Client
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc_server import server
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.metrics import GrpcMetrics
from prometheus_client import CollectorRegistry

from tests.fakes import FakeEngine
from tests.waiting import eventually


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine, drain_timeout: float) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """`server.serve` on `engine` in this loop, SERVING; yields its target and
    the stop event, and checks on the way out that it exited 0."""
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    registry = CollectorRegistry()

    async def load() -> FakeEngine:
        return engine

    task = asyncio.create_task(server.serve(
        ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, drain_timeout=drain_timeout),
        "fake", load, GrpcMetrics(registry), stop=stop,
        on_started=lambda r: port.set_result(r.port), registry=registry,
    ))  # fmt: skip
    try:
        target = f"127.0.0.1:{await port}"
        with Client(target) as probe:
            assert await eventually(lambda: probe.health() == "SERVING")
        yield target, stop
    finally:
        stop.set()
        assert await task == 0


async def test_the_startup_heap_is_frozen_while_serving() -> None:
    """The garbage collector's full passes skip what startup built (a full pass
    over vLLM's heap paused every stream for up to 0.9 s), and the heap is
    unfrozen once the server has stopped."""
    assert gc.get_freeze_count() == 0
    async with serving(FakeEngine(), drain_timeout=1) as (target, _):
        assert gc.get_freeze_count() > 0
        with Client(target) as client:
            # A blocking client: its calls run in a thread, the server in this loop.
            reply = await asyncio.to_thread(client.generate, "hi", max_tokens=2)
            assert reply.usage.completion_tokens == 2
    assert gc.get_freeze_count() == 0


async def test_drain_timeout_ends_cut_streams_with_unavailable() -> None:
    """A stream still running when --drain-timeout ends gets UNAVAILABLE (retry
    elsewhere), and its engine request is aborted."""
    engine = FakeEngine(step_delay=0.05)
    async with serving(engine, drain_timeout=0.5) as (target, stop), AsyncClient(target) as client:
        call = client.stub.GenerateStream(
            pb.GenerateRequest(prompt="x" * 60, sampling=pb.SamplingParams(max_tokens=60))
        )
        assert (await call.read()).token_ids
        stop.set()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert engine.aborted


def test_grpcs_error_for_a_write_to_an_ended_call_is_one_debug_line() -> None:
    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "server.pyx.pxi", 1,
                                 msg, None, None)  # fmt: skip

    quiet = server._EndedCallWrites()
    dropped = "ExecuteBatchError raised in core by servicer method [/llmgrpc.v1.LLMService/X]"
    assert not quiet.filter(record(dropped))
    assert quiet.filter(record("Unexpected [ValueError] raised by servicer method [/x]"))
