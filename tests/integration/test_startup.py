"""Startup: a signal during the model load, and startup failures that name their cause.

The signal tests stall the load for real: the model's weights file is a named
pipe that nobody writes, so vLLM's worker blocks opening it, as on a stalled
network filesystem, and the load can never finish before the signal. The
failure tests end before any engine starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
from llmgrpc_server import models
from llmgrpc_server.server import EXIT_STOPPED_LOADING

from tests.server_process import SERVER, ServerProcess, engine_fixture, running
from tests.settings import STARTUP_TIMEOUT
from tests.waiting import poll

SIGNAL_DEADLINE = 15.0  # seconds from the signal to the exit (issue 12)
STALLED_LOAD = "Loading safetensors checkpoint shards"  # vLLM's worker, opening the weights


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def stalled_model(directory: Path) -> Path:
    """The tiny model with its weights file replaced by a named pipe."""
    source = Path(models.resolve("tiny-llama-gqa", models.default_models_dir()))
    model = directory / "stalled-model"
    shutil.copytree(source, model)
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    return model


@engine_fixture(scope="module")
def stalled(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict[str, ServerProcess]]:
    """A stalled server per signal, both launched at once: a start is mostly
    imports, one process at a time, and this machine has two cores."""
    with ExitStack() as stack:
        servers = {}
        for name in SIGNALS:
            model = stalled_model(tmp_path_factory.mktemp(name))
            args = ["--model", str(model), "--kv-cache-memory-bytes", str(64 * 1024 * 1024)]
            servers[name] = stack.enter_context(running(args, f"stalled-{name}", request))
        yield servers


def _loading(server: ServerProcess) -> bool:
    """vLLM's worker is loading the weights (and so blocked on the pipe)."""
    assert server.proc is not None
    if server.proc.poll() is not None:
        raise AssertionError(f"server exited ({server.proc.returncode}):\n{server.log()[-4000:]}")
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if p.name().startswith("VLLM::Worker")]  # fmt: skip
    return bool(workers) and STALLED_LOAD in server.log()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(pgid: int) -> list[psutil.Process]:
    """Live processes in the process group (the server led it: tests/server_process.py)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and _alive(p):
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


@pytest.mark.engine
@pytest.mark.parametrize("name", SIGNALS)
def test_a_signal_during_the_load_exits_at_once_leaving_no_engine_process(
    name: str, stalled: dict[str, ServerProcess]
) -> None:
    server, sig = stalled[name], SIGNALS[name]
    assert server.proc is not None
    assert poll(lambda: _loading(server), STARTUP_TIMEOUT, interval=0.5)
    engine = psutil.Process(server.proc.pid).children(recursive=True)
    names = sorted(p.name() for p in engine)
    assert any(n.startswith("VLLM::EngineCore") for n in names), names
    signalled = time.monotonic()
    server.signal(sig)
    code = server.wait_exit(timeout=SIGNAL_DEADLINE)
    took = time.monotonic() - signalled
    print(f"\n{sig.name} during the load: exit {code} after {took:.1f} s; "
          f"engine processes were {names}")  # fmt: skip
    assert code == EXIT_STOPPED_LOADING
    # vLLM's engine core and worker are gone by the time the server has exited ...
    assert [p.name() for p in engine if _alive(p) and p.name().startswith("VLLM")] == []
    # ... and the rest of its family soon after: Python's resource tracker
    # ends once the last process holding its pipe has.
    assert poll(lambda: not _group(server.proc.pid), 5), _group(server.proc.pid)  # type: ignore[union-attr]
    assert "stopped while the model was loading" in server.log()


def _server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SERVER), "--port", "0", "--metrics-port", "0", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})  # fmt: skip


# A module that run() imports, made to fail as a broken install would (a
# shared library the engine needs is missing).
_BROKEN_IMPORT = "libcudart.so.12: cannot open shared object file: No such file or directory"
_SHIM = """
import importlib.abc, sys

class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "llmgrpc_server.vllm_adapter.engine":
            raise ImportError({message!r})
        return None

sys.meta_path.insert(0, Broken())
"""
# A failing start's case -> the process's result, when it ends.
Starts = dict[str, Future[subprocess.CompletedProcess[str]]]
MISSING = "no-such-model"
BAD_FLAGS = {"unknown": (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
             "out-of-range": (["--max-in-flight", "0"], "--max-in-flight")}  # fmt: skip


@pytest.fixture(scope="module")
def starts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the failing starts' models live (the missing one is named after it)."""
    return tmp_path_factory.mktemp("failed-starts")


@pytest.fixture(scope="module")
def failed_starts(starts_dir: Path) -> Iterator[Starts]:
    """Every failing start of this module, run at once (each takes ~12 s of
    imports, on one core), by case -> its result."""
    tmp = starts_dir
    unknown = tmp / "unknown-architecture"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no_such_architecture"}')
    shim = tmp / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_SHIM.format(message=_BROKEN_IMPORT))
    paths = [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
    runs: dict[str, tuple[list[str], dict[str, str] | None]] = {
        **{name: (flag, None) for name, (flag, _) in BAD_FLAGS.items()},
        "missing": (["--model", str(tmp / MISSING)], None),
        "unknown-architecture": (["--model", str(unknown)], None),
        "broken-import": ([], {"PYTHONPATH": os.pathsep.join(paths)}),
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(_server, *args, env=env) for name, (args, env) in runs.items()}
        yield futures


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_a_bad_flag_exits_2_naming_it(case: str, failed_starts: Starts) -> None:
    result, named = failed_starts[case].result(), BAD_FLAGS[case][1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_model_directory_is_named(failed_starts: Starts, starts_dir: Path) -> None:
    result = failed_starts["missing"].result()
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--model {starts_dir / MISSING}: no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_that_fails_to_load_ends_with_its_cause(failed_starts: Starts) -> None:
    result = failed_starts["unknown-architecture"].result()
    assert result.returncode == 1, result.stderr[-2000:]
    # vLLM's error is the last thing printed: the port was closed before the
    # process ended, so grpc adds no "Event loop is closed" trace after it.
    assert "no_such_architecture" in result.stderr[-1500:], result.stderr[-2000:]
    assert "Exception ignored" not in result.stderr, result.stderr[-2000:]


def test_an_import_error_in_startup_shows_its_own_message(failed_starts: Starts) -> None:
    result = failed_starts["broken-import"].result()
    assert result.returncode == 1, result.stderr[-2000:]
    error = f"ImportError: {_BROKEN_IMPORT}"
    assert result.stderr.rstrip().endswith(error), result.stderr[-2000:]
    # Reported once: not taken for a missing uvloop, with startup run again.
    assert result.stderr.count(error) == 1, result.stderr[-2000:]
