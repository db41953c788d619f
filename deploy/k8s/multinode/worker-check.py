"""Liveness check for a headless vLLM worker pod of a LeaderWorkerSet group.

Run by the worker container's startup and liveness exec probes; exit 0 means
alive, 1 means restart me (and, with RecreateGroupOnPodRestart, the whole
group). Standard library only: it runs in the serving image as it is. It fails
when any of these holds:

1. The worker's vLLM process (--pid, PID 1 in the container) has fewer than
   --min-workers live child processes: a GPU worker process died or is a
   zombie while the parent lingers.
2. One of those processes has been in uninterruptible sleep (state D) or
   stopped (T, t) at every probe for --stuck-seconds or more without using
   CPU or reading or writing a byte: stuck in the GPU driver, on a hung
   network filesystem (the model cache), or frozen by a signal. The first
   sighting is kept in --state-file; a process that loads weights from a slow
   volume is in D often, but makes progress.
3. The leader's port (--leader-port on $LWS_LEADER_ADDRESS) does not accept a
   TCP connection within --timeout seconds: the leader, its process group's
   store, or the network between the nodes is gone.

It cannot see a worker that is alive, connected and spinning inside a
collective or a kernel: the leader's engine ends a step that does not finish
within VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS, its server exits, and the group is
recreated (docs/deploy.md, "Beyond one node").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import sys
import time
from dataclasses import dataclass

# On the pod's /tmp emptyDir: it lasts as long as the container.
STATE_FILE = pathlib.Path("/tmp/worker-check.json")
# Uninterruptible sleep, stopped by a signal, stopped by a tracer.
STUCK_STATES = ("D", "T", "t")


@dataclass(frozen=True)
class Child:
    state: str  # R, S, D, Z, ...
    work: int  # CPU ticks plus bytes read and written: grows while the process gets anywhere


def children(proc: pathlib.Path, parent: int) -> dict[int, Child]:
    """The children of `parent`, from /proc/<pid>/stat and /proc/<pid>/io."""
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid ... utime stime ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) != parent:
            continue
        work = int(fields[11]) + int(fields[12])
        try:
            io = dict(line.split(": ") for line in (entry / "io").read_text().splitlines())
            work += int(io["rchar"]) + int(io["wchar"])
        except (OSError, KeyError, ValueError):
            pass
        found[int(entry.name)] = Child(fields[0], work)
    return found


def stuck_for(kids: dict[int, Child], state_file: pathlib.Path, now: float) -> float:
    """How long some child has sat in state D or T without any work done, by the first
    such sighting kept in state_file. A process that reads a slow volume is in D
    at many probes too, but its bytes read grow between them."""
    try:
        kept = json.loads(state_file.read_text())
        seen = {int(pid): (since, work) for pid, (since, work) in kept.items()}
    except (OSError, ValueError, TypeError):
        seen = {}
    stuck = {}
    for pid, child in kids.items():
        if child.state not in STUCK_STATES:
            continue
        since, work = seen.get(pid, (now, child.work))
        stuck[pid] = (since, work) if work == child.work else (now, child.work)
    state_file.write_text(json.dumps(stuck))
    return max((now - since for since, _ in stuck.values()), default=0.0)


def reachable(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-workers", type=int, required=True)
    parser.add_argument("--leader-port", type=int, required=True)
    parser.add_argument("--leader", default=os.environ.get("LWS_LEADER_ADDRESS", ""))
    parser.add_argument("--pid", type=int, default=1)
    parser.add_argument("--stuck-seconds", type=float, default=120.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--state-file", type=pathlib.Path, default=STATE_FILE)
    parser.add_argument("--proc", type=pathlib.Path, default=pathlib.Path("/proc"))
    args = parser.parse_args(argv)

    kids = children(args.proc, args.pid)
    live = [pid for pid, child in kids.items() if child.state not in ("Z", "X")]
    if len(live) < args.min_workers:
        states = {pid: child.state for pid, child in kids.items()}
        print(f"worker-check: {len(live)} live worker processes of {args.min_workers}: {states}")
        return 1
    stuck = stuck_for(kids, args.state_file, time.time())
    if stuck >= args.stuck_seconds:
        print(f"worker-check: a worker process has been in state D or T, idle, for {stuck:.0f} s")
        return 1
    if not args.leader:
        print("worker-check: no leader address (LWS_LEADER_ADDRESS is unset)")
        return 1
    if not reachable(args.leader, args.leader_port, args.timeout):
        print(f"worker-check: leader {args.leader}:{args.leader_port} does not accept connections")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
