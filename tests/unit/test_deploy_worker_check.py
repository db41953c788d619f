"""deploy/k8s/multinode/worker-check.py, the headless worker's liveness check.

Run as the exec probe runs it (a fresh `python3` with only the standard
library: -I -S, so no site-packages), against a real process tree, a real
listening socket for the leader, and a synthetic /proc for the states a test
cannot make a process enter (D, Z).
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.manifests import K8S

SCRIPT = K8S / "multinode" / "worker-check.py"
# A parent with two children that sleep: a headless vLLM with two GPU workers.
TREE = (
    "import subprocess, sys, time\n"
    "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']) for _ in range(2)]\n"
    "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
    "time.sleep(120)\n"
)


def check(*args: str, state_file: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--state-file", str(state_file), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )


@pytest.fixture
def leader() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


@pytest.fixture
def tree() -> Iterator[tuple[int, list[int]]]:
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    kids = [int(p) for p in parent.stdout.readline().split()]
    yield parent.pid, kids
    for pid in kids:
        subprocess.run(["kill", "-9", str(pid)], check=False)
    parent.kill()
    parent.wait()


def test_a_healthy_worker_passes(tree: tuple[int, list[int]], leader: int, tmp_path: pathlib.Path) -> None:
    pid, _ = tree
    result = check("--pid", str(pid), "--min-workers", "2", "--leader", "127.0.0.1",
                   "--leader-port", str(leader), state_file=tmp_path / "s")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_dead_worker_process_fails(tree: tuple[int, list[int]], leader: int, tmp_path: pathlib.Path) -> None:
    pid, kids = tree
    subprocess.run(["kill", "-9", str(kids[0])], check=True)
    # Not reaped by its parent: a zombie, which the check does not count.
    deadline = time.monotonic() + 10
    while (pathlib.Path(f"/proc/{kids[0]}/stat").read_text().split(") ")[1][0]) != "Z":
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.05)
    result = check("--pid", str(pid), "--min-workers", "2", "--leader", "127.0.0.1",
                   "--leader-port", str(leader), state_file=tmp_path / "s")  # fmt: skip
    assert result.returncode == 1
    assert "1 live worker processes of 2" in result.stdout


def test_an_unreachable_leader_fails(tree: tuple[int, list[int]], tmp_path: pathlib.Path) -> None:
    pid, _ = tree
    with socket.create_server(("127.0.0.1", 0)) as sock:
        closed = sock.getsockname()[1]
    result = check("--pid", str(pid), "--min-workers", "2", "--leader", "127.0.0.1",
                   "--leader-port", str(closed), "--timeout", "2", state_file=tmp_path / "s")  # fmt: skip
    assert result.returncode == 1
    assert "does not accept connections" in result.stdout


def test_no_leader_address_fails(tree: tuple[int, list[int]], tmp_path: pathlib.Path) -> None:
    pid, _ = tree
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(SCRIPT), "--pid", str(pid), "--min-workers", "2",
         "--leader-port", "29501", "--state-file", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=30, check=False, env={},
    )  # fmt: skip
    assert result.returncode == 1
    assert "LWS_LEADER_ADDRESS" in result.stdout


def _stat(pid: int, comm: str, state: str, parent: int, ticks: int = 0) -> str:
    # Fields 3-15 of proc(5): state ppid pgrp session tty tpgid flags minflt
    # cminflt majflt cmajflt utime stime, then more the check does not read.
    return f"{pid} ({comm}) {state} {parent} 1 1 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0\n"


def _fake_proc(root: pathlib.Path, parent: int, states: dict[int, str]) -> pathlib.Path:
    (root / str(parent)).mkdir(parents=True)
    (root / str(parent) / "stat").write_text(_stat(parent, "python3", "S", 0))
    for pid, state in states.items():
        (root / str(pid)).mkdir()
        # A comm with spaces and parentheses, as vLLM names its processes.
        (root / str(pid) / "stat").write_text(_stat(pid, "VLLM::Worker (TP0) x", state, parent))
        (root / str(pid) / "io").write_text("rchar: 100\nwchar: 5\nsyscr: 1\n")
    (root / "self").mkdir()
    return root


def test_a_worker_stuck_in_state_d_fails_only_once_it_persists(leader: int, tmp_path: pathlib.Path) -> None:
    proc = _fake_proc(tmp_path / "proc", 1, {10: "D", 11: "S"})
    state = tmp_path / "state.json"
    args = ("--proc", str(proc), "--pid", "1", "--min-workers", "2", "--leader", "127.0.0.1",
            "--leader-port", str(leader), "--stuck-seconds", "120")  # fmt: skip
    first = check(*args, state_file=state)
    assert first.returncode == 0, first.stdout  # one sighting is not a hang
    kept = json.loads(state.read_text())
    assert set(kept) == {"10"} and kept["10"][1] == 105  # rchar + wchar, no CPU ticks
    state.write_text(json.dumps({"10": [time.time() - 121, 105]}))  # in D, idle, for two minutes
    stuck = check(*args, state_file=state)
    assert stuck.returncode == 1
    assert "state D or T, idle, for 12" in stuck.stdout
    # Out of D: its sighting is forgotten.
    (proc / "10" / "stat").write_text(_stat(10, "VLLM::Worker", "S", 1))
    assert check(*args, state_file=state).returncode == 0
    assert json.loads(state.read_text()) == {}


def test_a_worker_in_state_d_that_makes_progress_passes(leader: int, tmp_path: pathlib.Path) -> None:
    """Loading weights from a slow volume: in D at every probe, but reading."""
    proc = _fake_proc(tmp_path / "proc", 1, {10: "D", 11: "S"})
    state = tmp_path / "state.json"
    args = ("--proc", str(proc), "--pid", "1", "--min-workers", "2", "--leader", "127.0.0.1",
            "--leader-port", str(leader), "--stuck-seconds", "120")  # fmt: skip
    state.write_text(json.dumps({"10": [time.time() - 600, 105]}))
    (proc / "10" / "io").write_text("rchar: 900100\nwchar: 5\n")  # read 900 kB since
    result = check(*args, state_file=state)
    assert result.returncode == 0, result.stdout
    since, work = json.loads(state.read_text())["10"]
    assert work == 900105 and time.time() - since < 60, "progress restarts the clock"
    # CPU time counts as progress too.
    (proc / "10" / "stat").write_text(_stat(10, "VLLM::Worker", "D", 1, ticks=7))
    assert check(*args, state_file=state).returncode == 0
    assert json.loads(state.read_text())["10"][1] == 900112


def test_zombies_do_not_count_as_workers(leader: int, tmp_path: pathlib.Path) -> None:
    proc = _fake_proc(tmp_path / "proc", 1, {10: "R", 11: "Z", 12: "S"})
    result = check("--proc", str(proc), "--pid", "1", "--min-workers", "3", "--leader", "127.0.0.1",
                   "--leader-port", str(leader), state_file=tmp_path / "s")  # fmt: skip
    assert result.returncode == 1
    assert "2 live worker processes of 3" in result.stdout


def test_a_stopped_worker_fails_once_it_stays_stopped(tree: tuple[int, list[int]], leader: int, tmp_path: pathlib.Path) -> None:
    """SIGSTOP, as docs/spikes/multinode-cpu.md froze a node: a real process in state T."""
    pid, kids = tree
    subprocess.run(["kill", "-STOP", str(kids[0])], check=True)
    deadline = time.monotonic() + 10
    while pathlib.Path(f"/proc/{kids[0]}/stat").read_text().split(") ")[1][0] != "T":
        assert time.monotonic() < deadline, "the stopped child never showed state T"
        time.sleep(0.05)
    state = tmp_path / "state.json"
    args = ("--pid", str(pid), "--min-workers", "2", "--leader", "127.0.0.1",
            "--leader-port", str(leader), "--stuck-seconds", "120")  # fmt: skip
    assert check(*args, state_file=state).returncode == 0  # first sighting
    since, work = json.loads(state.read_text())[str(kids[0])]
    state.write_text(json.dumps({str(kids[0]): [since - 121, work]}))
    stopped = check(*args, state_file=state)
    assert stopped.returncode == 1
    assert "state D or T, idle" in stopped.stdout
    subprocess.run(["kill", "-CONT", str(kids[0])], check=True)
