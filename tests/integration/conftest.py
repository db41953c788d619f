"""One real server per embedded model per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server_process import ServerProcess, cleanup_logs, launch


def _serve(model: str) -> Iterator[ServerProcess]:
    server = launch(["--model", model, "--drain-timeout", "10"], name=model)
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()
        cleanup_logs(server)


@pytest.fixture(scope="session")
def llama() -> Iterator[ServerProcess]:
    yield from _serve("tiny-llama-gqa")


@pytest.fixture(scope="session")
def moe() -> Iterator[ServerProcess]:
    yield from _serve("tiny-mixtral-moe")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.engine)
