"""One real server per embedded model per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server_process import ServerProcess, running


def _serve(model: str, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with running(["--model", model, "--drain-timeout", "10"], model, request) as server:
        server.wait_serving()
        yield server


@pytest.fixture(scope="session")
def llama(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from _serve("tiny-llama-gqa", request)


@pytest.fixture(scope="session")
def moe(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield from _serve("tiny-mixtral-moe", request)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.engine)
