"""Long unary calls survive aggressive client keepalive pings (fake engine).

A unary Generate sends nothing until it finishes, so every client ping during
it arrives "without data". gRPC's default server policy answers the third
such ping within 5 minutes with GOAWAY ENHANCE_YOUR_CALM "too_many_pings",
which kills the call. The server's `grpc_options` accept them:
`grpc.http2.max_ping_strikes` 0 (never count strikes),
`grpc.http2.min_ping_interval_without_data_ms` 10 s and
`grpc.keepalive_permit_without_calls` 1.

A slow fake engine holds a unary call for 20 s under a ping a second: it
succeeds with the server's options, and (negative control) the same call on
the same server without them dies with too_many_pings. The real server's
long generations under pings: tests/integration/test_keepalive.py. (Here, not
there, so that these 24 s, mostly waiting, overlap the image build: see
tests/parallel.py.)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from llmgrpc import AsyncClient, Security
from llmgrpc.client import channel_options
from llmgrpc_server import server
from llmgrpc_server.config import TRANSPORTS, ServerConfig

from tests.fake_server import FakeServer, start_fake
from tests.fakes import FakeEngine
from tests.pinging import OWN_CONNECTION, PINGING
from tests.waiting import eventually

STEP = 0.25  # seconds per fake token
LONG_TOKENS = 80  # 20 s at STEP


def test_server_options_are_spelled_as_grpc_spells_them() -> None:
    options = dict(server.grpc_options(ServerConfig()))
    assert options["grpc.http2.max_ping_strikes"] == 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_client_options_override_the_defaults() -> None:
    """gRPC core takes the first of two equal keys: a caller's keepalive must
    replace the client's 30 s default, not follow it."""
    options = channel_options(Security(), PINGING)
    assert dict(options)["grpc.keepalive_time_ms"] == 1000
    assert len(options) == len(dict(options))


@asynccontextmanager
async def _slow_fake(keepalive_policy: bool, transport: str) -> AsyncIterator[FakeServer]:
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, transport=transport)
    real = server.grpc_options
    if not keepalive_policy:
        # The same server with gRPC's default ping policy (the negative control).
        keys = ("grpc.max_receive_message_length", "grpc.max_send_message_length")
        server.grpc_options = lambda c: [o for o in real(c) if o[0] in keys]  # type: ignore[assignment]
    try:
        engine = FakeEngine(step_delay=STEP, max_model_len=LONG_TOKENS + 16)
        srv = await start_fake(config, engine=engine)
    finally:
        server.grpc_options = real  # type: ignore[assignment]
    try:
        yield srv
    finally:
        await srv.running.server.stop(grace=0)


async def _long_call(srv: FakeServer) -> tuple[float, int]:
    async with AsyncClient(srv.target, options=PINGING + OWN_CONNECTION) as c:
        started = time.monotonic()
        out = await c.generate("keep me alive", max_tokens=LONG_TOKENS, timeout=120)
        return time.monotonic() - started, out.usage.completion_tokens


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_20s_unary_call_survives_a_ping_a_second(transport: str) -> None:
    async with _slow_fake(keepalive_policy=True, transport=transport) as srv:
        elapsed, tokens = await _long_call(srv)
    assert tokens == LONG_TOKENS
    assert elapsed >= LONG_TOKENS * STEP * 0.9


async def test_negative_control_default_ping_policy_kills_the_call() -> None:
    """grpcio's server with grpc's default ping policy (the transport whose
    policy it is; llmgrpc's own transport has no other)."""
    async with _slow_fake(keepalive_policy=False, transport="grpcio") as srv:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _long_call(srv)
        elapsed = time.monotonic() - started
        # The engine request is aborted with the call.
        assert await eventually(lambda: not srv.engine.running, 5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # "Too many pings", or the GOAWAY's debug data "too_many_pings".
    text = f"{e.value.details()} {e.value.debug_error_string()}".lower().replace("_", " ")
    assert "too many pings" in text
    assert elapsed < LONG_TOKENS * STEP / 2, "the call died of something slower than ping abuse"
