"""Cancellation frees the KV cache; health; SIGTERM drain."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from llmgrpc import Client
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.metrics_scrape import value
from tests.server_process import ServerProcess, cleanup_logs, launch


def _poll(predicate, timeout: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_cancel_aborts_request_and_frees_kv_cache(llama: ServerProcess) -> None:
    url = llama.metrics_url
    with Client(llama.target) as client:
        streams = [client.stream("Tell me a long story", max_tokens=1500, ignore_eos=True)
                   for _ in range(4)]  # fmt: skip
        for s in streams:
            next(s)
        assert _poll(lambda: value(url, "vllm:num_requests_running") == 4, 20)
        assert _poll(lambda: value(url, "vllm:kv_cache_usage_perc") > 0, 20)
        for s in streams:
            s.close()  # cancels the call
        assert _poll(lambda: value(url, "vllm:num_requests_running") == 0)
        assert _poll(lambda: value(url, "vllm:kv_cache_usage_perc") == 0)
        assert value(url, "llmgrpc_requests_cancelled_total") >= 4
        assert value(url, "grpc_server_handled_total", grpc_method="GenerateStream",
                     grpc_code="CANCELLED") >= 4  # fmt: skip


def test_deadline_aborts_the_request(llama: ServerProcess) -> None:
    url = llama.metrics_url
    before = value(url, "llmgrpc_requests_deadline_exceeded_total")
    with Client(llama.target) as client, pytest.raises(grpc.RpcError) as e:
        client.generate("Hello", max_tokens=1900, ignore_eos=True, timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _poll(lambda: value(url, "vllm:num_requests_running") == 0)
    assert _poll(lambda: value(url, "llmgrpc_requests_deadline_exceeded_total") == before + 1)


def test_health_and_reflection(llama: ServerProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with Client(llama.target) as client:
        assert client.health("") == "SERVING"
        assert client.health("llmgrpc.v1.LLMService") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))  # fmt: skip
        names = {s.name for s in reply.list_services_response.service}
        assert {"llmgrpc.v1.LLMService", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_in_flight_streams_then_exits_zero() -> None:
    server = launch(["--drain-timeout", "60"], name="drain")
    try:
        server.wait_serving()
        with Client(server.target) as client:
            received: list[pb.GenerateResponse] = []
            done = threading.Event()

            def consume() -> None:
                for d in client.stream("Drain me", max_tokens=300, ignore_eos=True):
                    received.append(d)
                done.set()

            t = threading.Thread(target=consume)
            t.start()
            assert _poll(lambda: len(received) > 2, 30)
            server.signal()
            assert _poll(lambda: client.health() == "NOT_SERVING", 5)
            assert client.health("") == "SERVING"  # liveness keeps passing while draining
            t.join(timeout=90)
            assert done.is_set()
            assert received[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(d.token_ids) for d in received) == 300
        # New connections are refused once the server stops accepting.
        with Client(server.target) as late, pytest.raises(grpc.RpcError) as e:
            late.generate("too late", max_tokens=1, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.wait_exit(timeout=120) == 0
    finally:
        server.stop()
        cleanup_logs(server)
