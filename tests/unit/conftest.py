"""Fixtures for the fast tests: a fake-engine server and a client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from llmgrpc import AsyncClient
from llmgrpc_server.config import TRANSPORTS, ServerConfig

from tests.fake_server import FakeServer, start_fake


@pytest.fixture(params=TRANSPORTS)
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeServer]:
    """The fake-engine server, once on each transport (--transport)."""
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, transport=request.param)
    srv = await start_fake(config)
    yield srv
    await srv.running.server.stop(grace=0)


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(fake.target) as c:
        yield c
