"""Run a real `llmgrpc-server` in a subprocess for integration tests.

The server binds port 0 for gRPC and metrics and logs the ports it got; tests
read them from the log (no bind-close-reuse race) and wait on the gRPC health
service, never on sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from llmgrpc import AsyncClient, Client
from llmgrpc.client import generate_request

from tests import otlp_receiver
from tests.settings import STARTUP_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(sys.executable).parent / "llmgrpc-server"
F = TypeVar("F", bound=Callable[..., Any])
_GRPC_PORT = re.compile(r"gRPC listening on port (\d+)")
_METRICS_PORT = re.compile(r"metrics listening on port (\d+)")
# Client channel options for a reader that stalls the server: with tiny HTTP/2
# windows, a stream it does not read keeps its handler (and its admission slot)
# waiting on flow control, however fast the engine is.
SLOW_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


def start_stream(client: AsyncClient, max_tokens: int, timeout: float = 120.0,
                 **sampling: Any) -> grpc.aio.Call:  # fmt: skip
    """Start a GenerateStream call (gRPC sends it at once) without reading it."""
    req = generate_request("Overload", max_tokens=max_tokens, ignore_eos=True, **sampling)
    return client.stub.GenerateStream(req, timeout=timeout)  # type: ignore[no-any-return]



# --- the shared servers ---------------------------------------------------------------
# One server per configuration, started by the first test that asks for it
# (tests/integration/conftest.py) and kept for the session: an engine start
# costs 20-50 s here. A test joins one by naming its fixture. A new test that
# needs a flag adds it to a configuration whose tests it does not change, and
# starts a server of its own only when none fits. A test that stops its
# server carries `@pytest.mark.stops_server`: it runs after the other engine tests.

# "llama" carries the load test's room: 512 in flight (vLLM's default batch)
# and 300 calls per connection (above its 256); and the drain timeout that the
# SIGTERM drain test, the last on it, needs for 16 streams of 1,500 tokens.
LLAMA_MAX_IN_FLIGHT = 512
LLAMA_MAX_CONCURRENT_STREAMS = 300
LLAMA_DRAIN_TIMEOUT = 60
# "limited": a small front door and engine that make "saturated" deterministic
# (tests/integration/test_overload.py), and a short drain timeout to cut; and
# a Tokenize cap 8x the default, so that a Tokenize answer can outgrow
# --max-message-bytes (tests/integration/test_input_caps.py; no overload test
# calls Tokenize); and vLLM's priority scheduling, whose proof needs a
# saturated engine (tests/integration/test_sampling_api.py; requests without a
# priority, all 0, run first come, first served as before).
LIMITED_MAX_IN_FLIGHT = 64
LIMITED_DRAIN_TIMEOUT = 2.0
LIMITED_MAX_TOKENIZE_CHARS = 1_048_576
# AdminService on the smollm server: its token, and the directory adapters load
# from (tests/integration/test_lora.py copies adapters into it).
_ADMIN = Path(tempfile.mkdtemp(prefix="llmgrpc-admin-"))
ADMIN_TOKEN = "admin-token-for-tests"
ADMIN_TOKEN_FILE = _ADMIN / "admin-tokens"
ADMIN_TOKEN_FILE.write_text(ADMIN_TOKEN + "\n")
ADAPTER_DIR = _ADMIN / "adapters"
ADAPTER_DIR.mkdir()
# In a server's arguments, the endpoint of the session's OTLP trace receiver
# (tests/otlp_receiver.py): launch() starts it first, if no server has.
OTLP_RECEIVER = "<otlp-receiver>"
SHARED: dict[str, list[str]] = {
    # Coalescing by load alone (a budget of a second): the tests of multi-token
    # messages (test_streaming_contract.py, test_bench.py) need them whatever
    # this machine's step time; the default 10 ms budget allows none where a
    # step takes longer than 5 ms (an AVX2-only CPU at a dozen streams).
    "llama": ["--model", "tiny-llama-gqa", "--coalesce-budget-ms", "1000",
              "--max-in-flight", str(LLAMA_MAX_IN_FLIGHT),
              "--max-concurrent-streams", str(LLAMA_MAX_CONCURRENT_STREAMS),
              "--drain-timeout", str(LLAMA_DRAIN_TIMEOUT)],
    # The MoE model, a base model without a chat template. Its tests read
    # facts (the placement test reads its processes' CPUs, as the default
    # --pin-front-end leaves them), so it also carries the flag of a test that
    # needs a server of its own: one engine slot (the engine-death test, the
    # last on it, kills its engine with 15 calls queued).
    "moe": ["--model", "tiny-mixtral-moe", "--max-num-seqs", "1"],
    "limited": ["--model", "tiny-llama-gqa",
                "--max-in-flight", str(LIMITED_MAX_IN_FLIGHT), "--max-num-seqs", "1",
                "--drain-timeout", str(LIMITED_DRAIN_TIMEOUT),
                "--max-tokenize-chars", str(LIMITED_MAX_TOKENIZE_CHARS),
                "--scheduling-policy", "priority"],
    # The embedded default model in float32, where its greedy tokens must equal
    # transformers' (tests/integration/test_real_text.py); eager, as the cpu
    # image runs it, to start in seconds.
    # With the default model's two demo LoRA adapters and one adapter slot, so
    # that requests naming both rotate them (tests/integration/test_lora.py).
    # Exporting its spans and vLLM's to the session's OTLP trace receiver
    # (tests/integration/test_tracing.py).
    # On grpc's own server (--transport grpcio): text, adapters, the admin
    # service, tracing and the Prometheus test go through it on a real engine;
    # the other servers run the default, llmgrpc's own transport.
    "smollm": ["--model", "smollm2-135m-instruct", "--dtype", "float32", "--enforce-eager",
               "--transport", "grpcio",
               "--lora-modules", *(f"smollm2-135m-instruct-lora-{x}=smollm2-135m-instruct-lora-{x}"
                                   for x in "ab"),
               "--max-loras", "1", "--max-cpu-loras", "4",
               "--admin-token-file", str(ADMIN_TOKEN_FILE), "--adapter-dir", str(ADAPTER_DIR),
               "--otlp-traces-endpoint", OTLP_RECEIVER],
}  # fmt: skip
# Fixtures that start or hold a real engine server; tests using one must be
# marked `engine` (checked at collection by tests/conftest.py).
ENGINE_FIXTURES: set[str] = set()
# The servers running() has up, by name (a shared server's name is its
# fixture's): tests/conftest.py stops each after the last test that uses it.
LIVE: dict[str, ServerProcess] = {}
# Engine fixture -> the node id of the last test that uses it (tests/conftest.py).
LAST_USE: dict[str, str] = {}
# Servers launched ahead of their fixture (tests/integration/conftest.py),
# by name: running() takes one from here instead of launching it.
EARLY: dict[str, ServerProcess] = {}
# The name of every server launch() has started this session.
LAUNCHED: set[str] = set()


def engine_fixture(scope: str = "session") -> Callable[[F], F]:
    """`pytest.fixture(scope=scope)` for a fixture that starts a real engine."""

    def register(fn: F) -> F:
        ENGINE_FIXTURES.add(fn.__name__)
        return pytest.fixture(scope=scope)(fn)  # type: ignore[call-overload, no-any-return]

    return register


@dataclass
class ServerProcess:
    args: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop_log(self) -> str:
        """The log from the drain on (all of it if the server never drained)."""
        return self.log().split("draining:", 1)[-1]

    def start(self) -> ServerProcess:
        env = {**os.environ, **self.extra_env}
        self.proc = subprocess.Popen(
            [str(SERVER), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *self.args],
            stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            # A process group of its own (killpg on stop) but not a session:
            # Linux's autogroup scheduler gives every session a CPU share of
            # its own, and with the server in a new session this 2-core
            # machine ran the queue-deadline scenario 2-16x slower and lost
            # calls for minutes (docs/reliability.md, scripts/grpc_stall_loop.py).
            process_group=0,
        )  # fmt: skip
        return self

    def wait_ports(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            grpc_port, metrics_port = _GRPC_PORT.search(text), _METRICS_PORT.search(text)
            if grpc_port and (metrics_port or "-1" in self.args):
                self.port = int(grpc_port.group(1))
                self.metrics_port = int(metrics_port.group(1)) if metrics_port else 0
                return
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"server did not open its port:\n{self.log()[-4000:]}")

    def wait_serving(self, service: str = "llmgrpc.v1.LLMService", timeout: float = STARTUP_TIMEOUT) -> None:
        """Watch the health service until `service` is SERVING."""
        if not self.port:
            self.wait_ports()
        try:
            with Client(self.target) as client:
                client.wait_until_serving(service, timeout)
        except (grpc.RpcError, grpc.FutureTimeoutError) as e:
            raise RuntimeError(f"server never became ready ({e!r}):\n{self.log()[-6000:]}") from e

    def wait_started(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until the server serves or has failed (its own fixture reports why)."""
        try:
            self.wait_serving(timeout=timeout)
        except (RuntimeError, TimeoutError):
            pass

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-6000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def launch(args: list[str], name: str = "server", **kw: object) -> ServerProcess:
    args = [otlp_receiver.shared().endpoint if a == OTLP_RECEIVER else a for a in args]
    LAUNCHED.add(name)
    log_dir = Path(tempfile.mkdtemp(prefix=f"llmgrpc-{name}-"))
    return ServerProcess(args=args, log_path=log_dir / "server.log", **kw).start()  # type: ignore[arg-type]


@contextmanager
def running(args: list[str], name: str, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A launched server (not yet waited on), stopped on exit.

    Its log is deleted unless a test failed while it ran: then the log's tail
    goes to the test report and the file is kept, so a CI failure can be read.
    """
    _check_marked(request)
    failed_before = request.session.testsfailed
    server = EARLY.pop(name, None) or launch(args, name=name)
    LIVE[name] = server
    failed = True
    try:
        yield server
        failed = False
    finally:
        LIVE.pop(name, None)
        server.stop()
        if failed or request.session.testsfailed > failed_before:
            _report_log(server, request)
        else:
            shutil.rmtree(server.log_path.parent, ignore_errors=True)


def _check_marked(request: pytest.FixtureRequest) -> None:
    """An engine is started only for a test marked `engine`, or by an engine fixture."""
    if request.fixturename in ENGINE_FIXTURES:
        return  # its users' marks are checked at collection
    if isinstance(request.node, pytest.Item) and request.node.get_closest_marker("engine"):
        return
    pytest.fail(f"{request.node.nodeid} starts an engine server: mark the test "
                f"`@pytest.mark.engine`, or declare its fixture with engine_fixture()")  # fmt: skip


def _report_log(server: ServerProcess, request: pytest.FixtureRequest, lines: int = 60) -> None:
    tail = server.log().splitlines()[-lines:]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    reporter.write_line(f"\n--- last {len(tail)} lines of {server.log_path} (kept) ---")
    for line in tail:
        reporter.write_line(line)
