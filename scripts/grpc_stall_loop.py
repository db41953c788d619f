"""Hunt the gRPC client stall (docs/reliability.md): loop the queue-deadline
scenario against one server, a new traced client process per round.

    .venv/bin/python scripts/grpc_stall_loop.py [--rounds 20] [--trace http,subchannel] [--out DIR]

Each round runs `queue_late_calls` (tests/overload_scenarios.py) in a
fresh interpreter: 62 streams held on a slow-reader connection fill the
engine's queue (`--max-num-seqs 1`), then 2 unary calls with an 8 s deadline
queue behind them on a connection of their own. A healthy round ends with both
late calls DEADLINE_EXCEEDED after ~8-10 s, and both counted by the server
(`grpc_server_started_total`). A stalled round shows fewer than 2 reached or a
round far longer than that. The client's stderr (with GRPC_TRACE and
GRPC_VERBOSITY=debug) is kept per round in --out: in a stalled round, compare
the late connection's HEADERS write time with when the server counted the
calls, to tell whether the client or the server held them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.conftest  # noqa: F401  (the suite's GRPC_EXPERIMENTS, set before grpc is imported)
from tests.fresh_process import run_fresh
from tests.overload_scenarios import drained, queue_late_calls
from tests.server_process import LIMITED_MAX_IN_FLIGHT as MAX_IN_FLIGHT
from tests.server_process import launch

LATE, LATE_PROMPT, DEADLINE = 2, 500, 8.0


def one_round(target: str, url: str, trace: str, err_path: Path) -> tuple[float, dict]:
    """One scenario in a fresh client process: seconds taken, its result."""
    env = {"GRPC_TRACE": trace, "GRPC_VERBOSITY": "debug"} if trace else {}
    start = time.monotonic()
    seen = run_fresh(queue_late_calls, target, url, MAX_IN_FLIGHT - LATE, LATE, LATE_PROMPT,
                     DEADLINE, timeout=600, env=env, stderr_path=err_path)  # fmt: skip
    return time.monotonic() - start, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--trace", default="http,subchannel,connectivity_state",
                        help="GRPC_TRACE for the client ('' for none)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="where each round's client stderr goes")
    parser.add_argument("server_args", nargs="*", help="more llmgrpc-server flags (after --)")
    opts = parser.parse_args()
    out = opts.out or Path(tempfile.mkdtemp(prefix="llmgrpc-stall-"))
    out.mkdir(parents=True, exist_ok=True)
    server = launch(["--model", "tiny-llama-gqa", "--max-in-flight", str(MAX_IN_FLIGHT), "--max-num-seqs", "1", *opts.server_args], name="stall")
    try:
        server.wait_serving()
        print(f"server {server.target}, log {server.log_path}; client stderr in {out}", flush=True)
        stalled = 0
        for n in range(opts.rounds):
            took, seen = one_round(server.target, server.metrics_url, opts.trace, out / f"round{n}.err")
            reached = seen["deltas"]["grpc_server_started_total"]
            ok = reached == LATE and took < DEADLINE + 10
            stalled += not ok
            print(f"round {n}: {took:.1f} s, {reached:g} of {LATE} late calls reached the server, "
                  f"codes {seen['codes']}{'' if ok else '  <-- STALL'}", flush=True)  # fmt: skip
            asyncio.run(drained(server.metrics_url))
        print(f"{stalled} of {opts.rounds} rounds stalled")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
