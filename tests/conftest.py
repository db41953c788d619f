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
from collections.abc import Callable
from typing import Any

import pytest

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: the integration tests on one worker (tests/parallel.py)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.parallel import EngineGroupScheduling

    return EngineGroupScheduling(config, log)


# Last: after deselection (-m) and pytest's own ordering.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Checks the `engine` marks, then orders the tests (_run_order)."""
    from tests.server_process import ENGINE_FIXTURES

    unmarked = [f"{item.nodeid} (uses {', '.join(sorted(ENGINE_FIXTURES & set(item.fixturenames)))})"
                for item in items
                if ENGINE_FIXTURES & set(item.fixturenames) and not item.get_closest_marker("engine")]  # fmt: skip
    if unmarked:
        raise pytest.UsageError("tests that use an engine server must be marked "
                                "`engine` (pytestmark = pytest.mark.engine):\n  "
                                + "\n  ".join(unmarked))  # fmt: skip
    from tests import parallel

    if misplaced := parallel.check_placed(items):
        raise pytest.UsageError(f"engine tests live in {parallel.GROUP} (make test runs "
                                "the rest beside them: tests/parallel.py):\n  "
                                + "\n  ".join(misplaced))  # fmt: skip
    # After every other engine test, in the order they were collected, so that
    # the servers they stop are not kept up through the tests that need none.
    from tests.server_process import LAST_USE

    items[:] = sorted(items, key=_run_order(items))
    LAST_USE.clear()
    for item in items:
        for name in ENGINE_FIXTURES & set(item.fixturenames):
            LAST_USE[name] = item.nodeid


def _run_order(items: list[pytest.Item]) -> Callable[[pytest.Item], tuple[int, int, int, int]]:
    """The order that keeps one engine server up at a time where it can: on this
    2-core machine every live server costs the others CPU (docs/reliability.md).

    1. the container build, while no server runs;
    2. the engine tests, grouped by the server they use (a server's group in the
       order of its first test; a test that stops its server last in its group);
    3. the tests without an engine.
    """
    from tests.server_process import ENGINE_FIXTURES

    position = {item.nodeid: i for i, item in enumerate(items)}
    groups: dict[str, int] = {}

    def key(item: pytest.Item) -> tuple[int, int, int, int]:
        index = position[item.nodeid]
        if item.get_closest_marker("container"):
            return (0, 0, 0, index)
        if not item.get_closest_marker("engine"):
            return (2, 0, 0, index)
        servers = [name for name in item.fixturenames if name in ENGINE_FIXTURES]
        group = groups.setdefault(servers[0] if servers else item.module.__name__, len(groups))
        return (1, group, 1 if item.get_closest_marker("stops_server") else 0, index)

    for item in items:  # the groups in the order of their first test
        key(item)
    return key


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Under `make test`'s two workers, no integration test's body runs beside
    the other tests (tests/parallel.py)."""
    from tests import parallel

    parallel.wait_for_the_rest(item)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a shared server after the last test that uses it, not at the session's end."""
    from tests import parallel
    from tests.server_process import LAST_USE, LIVE

    parallel.record_done(item)

    for name, last in LAST_USE.items():
        if last == item.nodeid and name in LIVE:
            LIVE[name].stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop a server started ahead of its tests that none ran (an interrupted session)."""
    from tests.server_process import EARLY

    while EARLY:
        EARLY.popitem()[1].stop()
