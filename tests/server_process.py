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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmgrpc import AsyncClient
from llmgrpc.client import generate_request

ROOT = Path(__file__).resolve().parent.parent
SERVER = Path(sys.executable).parent / "llmgrpc-server"
_GRPC_PORT = re.compile(r"gRPC listening on port (\d+)")
_METRICS_PORT = re.compile(r"metrics listening on port (\d+)")
# Client channel options for a reader that stalls the server: with tiny HTTP/2
# windows, a stream it does not read keeps its handler (and its admission slot)
# waiting on flow control, however fast the engine is.
SLOW_READER = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


def start_stream(client: AsyncClient, max_tokens: int, timeout: float = 120.0) -> grpc.aio.Call:
    """Start a GenerateStream call (gRPC sends it at once) without reading it."""
    req = generate_request("Overload", max_tokens=max_tokens, ignore_eos=True)
    return client.stub.GenerateStream(req, timeout=timeout)  # type: ignore[no-any-return]


STARTUP_TIMEOUT = float(os.environ.get("LLMGRPC_TEST_STARTUP_TIMEOUT", "300"))


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

    def start(self) -> ServerProcess:
        env = {**os.environ, **self.extra_env}
        env.setdefault("LLMGRPC_MODELS_DIR", str(Path.home() / ".cache/llmgrpc/models"))
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
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for resp in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout):
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as e:
                raise RuntimeError(f"server never became ready ({e.code()}):\n{self.log()[-6000:]}") from e

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
    log_dir = Path(tempfile.mkdtemp(prefix=f"llmgrpc-{name}-"))
    return ServerProcess(args=args, log_path=log_dir / "server.log", **kw).start()  # type: ignore[arg-type]


@contextmanager
def running(args: list[str], name: str, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A launched server (not yet waited on), stopped on exit.

    Its log is deleted unless a test failed while it ran: then the log's tail
    goes to the test report and the file is kept, so a CI failure can be read.
    """
    failed_before = request.session.testsfailed
    server = launch(args, name=name)
    failed = True
    try:
        yield server
        failed = False
    finally:
        server.stop()
        if failed or request.session.testsfailed > failed_before:
            _report_log(server, request)
        else:
            shutil.rmtree(server.log_path.parent, ignore_errors=True)


def _report_log(server: ServerProcess, request: pytest.FixtureRequest, lines: int = 60) -> None:
    tail = server.log().splitlines()[-lines:]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    reporter.write_line(f"\n--- last {len(tail)} lines of {server.log_path} (kept) ---")
    for line in tail:
        reporter.write_line(line)
