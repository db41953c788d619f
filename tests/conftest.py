"""Settings for the whole suite, applied before anything imports grpc.

GRPC_EXPERIMENTS=-event_engine_client: grpcio's Python build does not run
EventEngine's own poller, and its EventEngine client endpoints can then go
unpolled: a client process stops reading, acking pings and firing deadline
timers for seconds to minutes, until some timer wakes it (grpc/grpc#39113,
#38290; the mitigation given there is this setting). Seen in this suite's
pytest process after many channels to several servers: calls opened 27 s
late, a ping ack withheld until the server's 60 s ping timeout, deadlines
reported two minutes late (docs/reliability.md). The servers inherit it and
make no client channels. A user's own environment value wins.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")


# Last: after deselection (-m) and pytest's own ordering.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Checks the `engine` marks and runs the tests that stop a shared server last
    among the engine tests."""
    from tests.server_process import ENGINE_FIXTURES

    unmarked = [f"{item.nodeid} (uses {', '.join(sorted(ENGINE_FIXTURES & set(item.fixturenames)))})"
                for item in items
                if ENGINE_FIXTURES & set(item.fixturenames) and not item.get_closest_marker("engine")]  # fmt: skip
    if unmarked:
        raise pytest.UsageError("tests that use an engine server must be marked "
                                "`engine` (pytestmark = pytest.mark.engine):\n  "
                                + "\n  ".join(unmarked))  # fmt: skip
    # After every other engine test, in the order they were collected, so that
    # the servers they stop are not kept up through the tests that need none.
    stopping = [item for item in items if item.get_closest_marker("stops_server")]
    others = [item for item in items if not item.get_closest_marker("stops_server")]
    engine = [i for i, item in enumerate(others) if item.get_closest_marker("engine")]
    at = engine[-1] + 1 if engine else len(others)
    items[:] = others[:at] + stopping + others[at:]
