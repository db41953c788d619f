"""`--api-server-count 2`: two gRPC front ends on one port over one engine core
(server/llmgrpc_server/vllm_adapter/frontends.py, issue 17).

One server for the spread, the metrics and the drain (the drain stops it);
one more whose engine core is killed under a stream. Both start together:
a start is mostly imports, one process at a time, and this machine has two
cores; the second then sits idle (an idle engine sleeps) until its test.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmgrpc.client import generate_request
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc
from llmgrpc_server import cpu_placement

from tests.metrics_scrape import sample_value, scrape
from tests.server_process import ServerProcess, engine_fixture, running
from tests.waiting import poll

pytestmark = pytest.mark.engine
SERVICE = "llmgrpc.v1.LLMService"
ARGS = ["--model", "tiny-llama-gqa", "--api-server-count", "2", "--drain-timeout", "60"]
CALLS, TOKENS, INFO_CALLS = 24, 8, 4
LONG = 600  # tokens: a stream still running when the server is told to stop


def _channel(target: str) -> grpc.Channel:
    """A channel with a connection of its own: grpc otherwise shares one
    connection between channels to the same target, and the kernel spreads
    connections, not calls, over the front ends."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


@engine_fixture(scope="module")
def doomed(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """The server whose engine core the last test kills, launched (not waited on)."""
    with running(ARGS, "frontends-death", request) as server:
        yield server


@engine_fixture(scope="module")
def pair(doomed: ServerProcess, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """Starts beside `doomed`, which its tests do not use."""
    with running(ARGS, "frontends", request) as server:
        server.wait_serving()
        yield server


def _health(target: str) -> str:
    with _channel(target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=30
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def test_calls_spread_over_both_front_ends_and_the_metrics_add_up(pair: ServerProcess) -> None:
    assert {_health(pair.target) for _ in range(8)} == {"SERVING"}
    for _ in range(INFO_CALLS):  # each front end knows the engine's KV cache
        with _channel(pair.target) as ch:
            info = pb_grpc.LLMServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert info.kv_cache.num_blocks > 0, info
    received = 0
    for i in range(CALLS):  # one connection each
        with _channel(pair.target) as ch:
            stub = pb_grpc.LLMServiceStub(ch)
            call = stub.GenerateStream(
                generate_request(f"Call {i}", max_tokens=TOKENS, ignore_eos=True), timeout=120
            )
            received += sum(len(msg.token_ids) for msg in call)
    assert received == CALLS * TOKENS
    sample = scrape(pair.metrics_url)
    per_front_end = [sample_value(sample, "llmgrpc_frontend_calls_total", frontend=str(i))
                     for i in (0, 1)]  # fmt: skip
    print(f"\ncalls per front end: {per_front_end}")
    # Both took calls (all 24 connections on one: odds 2^-23), and nothing
    # is counted twice: one /metrics for both processes.
    assert min(per_front_end) > 0
    assert sum(per_front_end) == CALLS + INFO_CALLS
    handled = sample_value(sample, "grpc_server_handled_total", grpc_method="GenerateStream",
                           grpc_code="OK")  # fmt: skip
    assert handled == CALLS
    assert sample_value(sample, "llmgrpc_streamed_tokens_total") == received
    assert sample_value(sample, "vllm:generation_tokens_total") == received
    assert sample_value(sample, "vllm:request_success_total") == CALLS
    assert sample_value(sample, "llmgrpc_active_streams") == 0
    assert sample_value(sample, "llmgrpc_model_info", model_name="tiny-llama-gqa") == 1
    # N front ends are meant to spread over the cores: none places itself or
    # the engine core (no pinning, no renice; engine.py, VllmEngine.start).
    assert "CPU placement" not in pair.log()
    assert pair.proc is not None
    (engine_core,) = cpu_placement.descendants_named(pair.proc.pid, cpu_placement.ENGINE_CORE)
    assert os.getpriority(os.PRIO_PROCESS, engine_core) == os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.stops_server
def test_sigterm_drains_every_front_end_then_exits_0(pair: ServerProcess) -> None:
    assert pair.proc is not None
    with _channel(pair.target) as ch:
        call = pb_grpc.LLMServiceStub(ch).GenerateStream(
            generate_request("Drain", max_tokens=LONG, ignore_eos=True), timeout=300
        )
        stream = iter(call)
        tokens = len(next(stream).token_ids)  # running
        pair.signal(signal.SIGTERM)
        tokens += sum(len(msg.token_ids) for msg in stream)
        assert call.code() == grpc.StatusCode.OK
    assert tokens == LONG  # finished whole while the server drained
    assert pair.wait_exit(120) == 0
    log = pair.log()
    assert log.count("draining: in-flight calls have") == 2, log[-3000:]
    stop = pair.stop_log()  # a clean stop logs no error
    assert "Traceback" not in stop and " ERROR " not in stop, stop[-4000:]


@pytest.mark.stops_server
def test_a_dead_engine_fails_the_stream_and_the_server_exits_1(doomed: ServerProcess) -> None:
    doomed.wait_serving()
    assert doomed.proc is not None
    engines = cpu_placement.descendants_named(doomed.proc.pid, "VLLM::EngineCor")
    assert len(engines) == 1, engines
    statuses: list[str] = []
    seen = threading.Event()

    def watch() -> None:
        with _channel(doomed.target) as ch:
            try:
                for resp in health_pb2_grpc.HealthStub(ch).Watch(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=300
                ):
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
                    if statuses[-1] == "SERVING":
                        seen.set()
                    if statuses[-1] == "NOT_SERVING":
                        return
            except grpc.RpcError as e:  # the server went away
                statuses.append(e.code().name)
            finally:
                seen.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert seen.wait(60)
    with _channel(doomed.target) as ch:
        call = pb_grpc.LLMServiceStub(ch).GenerateStream(
            generate_request("Doomed", max_tokens=LONG, ignore_eos=True), timeout=300
        )
        stream = iter(call)
        tokens = len(next(stream).token_ids)
        os.kill(engines[0], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as failed:
            for msg in stream:
                tokens += len(msg.token_ids)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    assert tokens < LONG
    watcher.join(120)
    assert statuses[0] == "SERVING" and statuses[-1] in ("NOT_SERVING", "UNAVAILABLE"), statuses
    assert doomed.wait_exit(120) == 1
    assert poll(lambda: not cpu_placement.descendants(doomed.proc.pid), 60)  # type: ignore[union-attr]
