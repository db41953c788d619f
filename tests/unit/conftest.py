"""Fixtures for the fast tests: a fake-engine server and a client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from llmgrpc import AsyncClient

from tests.fake_server import FakeServer, start_fake


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    srv = await start_fake()
    yield srv
    await srv.running.server.stop(grace=0)


@pytest.fixture
async def client(fake: FakeServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(fake.target) as c:
        yield c
