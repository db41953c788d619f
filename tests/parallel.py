"""`make test` on two pytest-xdist workers (`-n 2 --dist loadgroup`).

One group, `tests/integration/` (every `engine` test lives there: checked at
collection), goes to one worker, which runs it one test at a time in
tests/conftest.py's order (the container build first, then the shared
servers' groups). The other worker runs the rest, the tests that need no
engine, meanwhile: beside the image build and the first servers' start,
which leave a core mostly idle (pip, layer commits, imports one process at a
time). `EngineGroupScheduling` is what `--dist loadgroup` means here: xdist's
own loadgroup renames items to carry their group, which pytest 9.2's node
ids no longer allow.

No integration test's body runs beside them, though: those tests measure
ordering and latency on a 2-core machine. The first one after the container
test waits (`wait_for_the_rest`) until the other worker has reported every
other test done, through a file both can see (the wait shows in
`--durations` as part of that test's call). Without xdist nothing here does
anything: the tests run in one process, those without an engine last.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from tests.waiting import poll

GROUP = "tests/integration/"
# How long the first integration test waits for the other worker before
# running anyway (a crashed worker never reports): the rest takes about 2
# minutes here.
WAIT_LIMIT = 900.0
_waited: list[bool] = []


def in_group(nodeid: str) -> bool:
    return nodeid.startswith(GROUP)


class EngineGroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with one scope for every integration test,
    and each other test a scope of its own. The largest scope is handed out
    first, so one worker takes the integration tests and keeps them."""

    def _split_scope(self, nodeid: str) -> str:
        return GROUP if in_group(nodeid) else nodeid


def check_placed(items: list[pytest.Item]) -> list[str]:
    """Engine tests outside the group (they would run beside the others)."""
    return [item.nodeid for item in items
            if item.get_closest_marker("engine") and not in_group(item.nodeid)]  # fmt: skip


def _done_file(config: pytest.Config) -> Path | None:
    workerinput = getattr(config, "workerinput", None)  # set on xdist workers only
    if workerinput is None:
        return None
    return Path(tempfile.gettempdir()) / f"llmgrpc-tests-{workerinput['testrunuid']}.done"


def record_done(item: pytest.Item) -> None:
    """A test outside the group has ended (whatever its outcome)."""
    path = _done_file(item.config)
    if path is None or in_group(item.nodeid):
        return
    # One write of a line, O_APPEND: whole lines, whichever worker writes.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{item.nodeid}\n".encode())
    finally:
        os.close(fd)


def wait_for_the_rest(item: pytest.Item) -> None:
    """Before the first integration test after the container test: wait until
    every other test has ended on the other worker."""
    path = _done_file(item.config)
    if path is None or _waited or not in_group(item.nodeid):
        return
    if item.get_closest_marker("container"):
        return  # the image build is what they run beside
    _waited.append(True)
    expected = {i.nodeid for i in item.session.items if not in_group(i.nodeid)}

    def ended() -> set[str]:
        return set(path.read_text().splitlines()) if path.exists() else set()

    if not poll(lambda: expected <= ended(), timeout=WAIT_LIMIT, interval=0.5):
        warnings.warn(f"{len(expected - ended())} tests outside {GROUP} had not ended after "
                      f"{WAIT_LIMIT:.0f} s; the integration tests run beside them",
                      stacklevel=1)  # fmt: skip
    path.unlink(missing_ok=True)
