"""Run the client half of an integration test in a process of its own.

    result = run_fresh(client_half, target, 16)          # in a sync test
    result = await asyncio.to_thread(run_fresh, ...)     # in an asyncio test

`client_half` is a module-level function (sync or `async def`) that takes and
returns JSON values. It runs in a new interpreter (`python -m
tests.fresh_process MODULE QUALNAME ARGS`); what it prints reaches the test's
output, its return value comes back, and an exception there fails the test
with the child's traceback. The test itself keeps the servers, the metrics
checks and the assertions.

Why: now and then grpc's client core goes silent for tens of seconds to
minutes (no reads, no ping acks, deadline timers firing 35 s to two minutes
late, a new connection opened 27 s late) while the server answered at once.
It was first seen in the pytest process after many earlier tests, and it
matches grpc/grpc#39113, which `tests/conftest.py` mitigates for the whole
suite. It also happens in a fresh process: the queue test's scenario in a
loop, a new client process per round, had the late calls miss the server in
3 of 10 rounds (docs/reliability.md). A client of its own still takes away
one unknown, what earlier tests left in the pytest process, and keeps a
test's client half in one function; tests whose verdict hangs on when their
client acts run it here, and the queue test also repeats its scenario when
the stall keeps its late calls from reaching the server.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_RESULT = "fresh-process-result: "


def run_fresh(fn: Callable[..., Any], *args: Any, timeout: float = 300.0,
              env: dict[str, str] | None = None, stderr_path: Path | None = None) -> Any:  # fmt: skip
    """`fn(*args)` in a new interpreter; its JSON-encoded return value.

    `env` adds to the child's environment (a GRPC_TRACE, say); the child's
    whole stderr goes to `stderr_path` when one is given."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fresh_process", fn.__module__, fn.__qualname__,
         json.dumps(args)],
        cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if stderr_path is not None:
        stderr_path.write_text(proc.stderr)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith(_RESULT)))
    if proc.returncode != 0:
        raise AssertionError(f"{fn.__qualname__} failed in its own process "
                             f"(exit {proc.returncode}):\n{proc.stderr[-6000:]}")  # fmt: skip
    results = [line[len(_RESULT):] for line in lines if line.startswith(_RESULT)]
    assert len(results) == 1, f"{fn.__qualname__} printed no result:\n{proc.stderr[-6000:]}"
    return json.loads(results[0])


def _main(module: str, qualname: str, args: str) -> None:
    fn = importlib.import_module(module)
    for name in qualname.split("."):
        fn = getattr(fn, name)
    result = fn(*json.loads(args))
    if inspect.iscoroutine(result):
        result = asyncio.run(result)
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:4])
