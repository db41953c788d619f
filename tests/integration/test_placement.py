"""The served engine's processes, as `--pin-front-end` (the default) leaves
them, on the shared `moe` server: placed, and the engine core reniced."""

from __future__ import annotations

import os

import pytest
from llmgrpc_server import cpu_placement

from tests.server_process import ServerProcess

pytestmark = pytest.mark.engine


def _threads(pid: int) -> dict[int, set[int]]:
    return {int(t): os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="vLLM's CPU backend reserves a CPU")
def test_front_end_and_engine_core_run_off_the_workers_cpus(moe: ServerProcess) -> None:
    assert moe.proc is not None
    server = moe.proc.pid
    workers = cpu_placement.descendants_named(server, "VLLM::Worker")
    engine_core = cpu_placement.descendants_named(server, "VLLM::EngineCor")
    assert len(workers) == 1 and len(engine_core) == 1, {
        p: _comm(p) for p in cpu_placement.descendants(server)
    }
    worker_cpus = os.sched_getaffinity(workers[0])
    front_end = os.sched_getaffinity(0) - worker_cpus
    assert worker_cpus and front_end
    for pid in (server, *engine_core):
        threads = _threads(pid)
        assert len(threads) > 1 and set(map(frozenset, threads.values())) == {
            frozenset(front_end)
        }, f"{_comm(pid)}: {threads}"
    assert f"front end and engine core on CPUs {sorted(front_end)}" in moe.log()
    # The engine core's spin while the worker computes weighs little (cpu_placement).
    assert _nice(engine_core[0]) == {cpu_placement.ENGINE_CORE_NICE}
    assert _nice(server) == {os.getpriority(os.PRIO_PROCESS, 0)}


def _nice(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, t) for t in _threads(pid)}


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()
