"""Cancellation and deadlines free the KV cache; health; SIGTERM drain under load.

All on the shared `llama` server; the drain test stops it, so it runs last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import grpc
import pytest
from llmgrpc import Client
from llmgrpc.client import generate_request
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.fresh_process import run_fresh
from tests.metrics_scrape import at_rest, sample_value, scrape, value
from tests.server_process import LLAMA_DRAIN_TIMEOUT, SLOW_READER, ServerProcess
from tests.waiting import poll

pytestmark = pytest.mark.engine


def start_hold_and_cancel(target: str, url: str, n: int, max_tokens: int) -> dict[str, float]:
    """The client half: n long streams at once, cancelled all together as soon
    as the engine holds KV blocks for them. Returns `vllm:generation_tokens_total`
    as last read before the cancels and once the engine had no request
    running, and how many seconds after the cancels that was."""
    with Client(target) as client:
        # The stub's call objects start on creation: all n go out at once.
        request = generate_request("Tell me a long story", max_tokens=max_tokens, ignore_eos=True)
        streams = [client.stub.GenerateStream(request, timeout=300) for _ in range(n)]
        generated = 0.0

        # Long generations hold KV blocks while they run ...
        def holding() -> bool:
            nonlocal generated
            sample = scrape(url)
            generated = sample_value(sample, "vllm:generation_tokens_total")
            return (sample_value(sample, "vllm:num_requests_running") >= 4
                    and sample_value(sample, "vllm:kv_cache_usage_perc") > 0)

        assert poll(holding, 60)
        for s in streams:
            s.cancel()
        cancelled = time.monotonic()
        assert poll(lambda: value(url, "vllm:num_requests_running") == 0, interval=0.05)
        idle_after = time.monotonic() - cancelled
        return {"generated_at_cancel": generated, "idle_after": idle_after,
                "generated_when_idle": value(url, "vllm:generation_tokens_total")}


def test_kv_cache_rises_in_flight_and_cancel_frees_it(llama: ServerProcess) -> None:
    url = llama.metrics_url
    assert poll(lambda: at_rest(url))  # the counters below move for this test's calls only
    generated_before = value(url, "vllm:generation_tokens_total")
    # 128 x 2000 tokens: four times what the 64 MiB KV cache holds at once
    # (~65k tokens), over 15 s of decoding at the ~15,000 tokens/s this
    # machine reaches. The client is a process of its own
    # (tests/fresh_process.py says why).
    n, max_tokens = 128, 2000
    seen = run_fresh(start_hold_and_cancel, llama.target, url, n, max_tokens)
    outstanding = n * max_tokens - (seen["generated_at_cancel"] - generated_before)
    after_cancel = seen["generated_when_idle"] - seen["generated_at_cancel"]
    print(f"\ncancelled {n} streams with {outstanding:.0f} tokens outstanding: no request "
          f"running {seen['idle_after']:.2f} s later, {after_cancel:.0f} tokens generated "
          f"meanwhile")  # fmt: skip
    assert outstanding > n * max_tokens / 2, "the cancels came after most of the work was done"
    # ... and cancelling them aborts them in the engine: it went idle having
    # done under a quarter of the work left (counted in tokens, not seconds:
    # a busy machine slows the aborts and the decoding alike) ...
    assert after_cancel < outstanding / 4
    # ... and frees every block.
    assert poll(lambda: value(url, "vllm:kv_cache_usage_perc") == 0)
    assert value(url, "llmgrpc_requests_cancelled_total") >= n
    assert value(url, "grpc_server_handled_total", grpc_method="GenerateStream",
                 grpc_code="CANCELLED") >= n  # fmt: skip
    # The server serves normally afterwards.
    with Client(llama.target) as client:
        assert client.generate("ok", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3


def test_kv_cache_falls_to_zero_after_generations_finish(llama: ServerProcess) -> None:
    url = llama.metrics_url
    with Client(llama.target) as client:
        results: list[pb.GenerateResponse] = []

        def run() -> None:
            results.append(client.generate("Long one", max_tokens=1900, ignore_eos=True))

        workers = [threading.Thread(target=run) for _ in range(4)]
        for w in workers:
            w.start()
        # KV blocks are held while the generations run (asserted, with a
        # scrape that sees both, in the test above) ...
        for w in workers:
            w.join()
        assert [r.usage.completion_tokens for r in results] == [1900] * 4
        # ... and all released once they finish.
        assert poll(lambda: value(url, "vllm:kv_cache_usage_perc") == 0)


def test_deadline_aborts_the_request(llama: ServerProcess) -> None:
    url = llama.metrics_url

    def deadline_exceeded(method: str) -> tuple[float, float]:
        return (value(url, "llmgrpc_requests_deadline_exceeded_total", grpc_method=method),
                value(url, "grpc_server_handled_total", grpc_method=method,
                      grpc_code="DEADLINE_EXCEEDED"))  # fmt: skip

    # Exact counts below: no earlier test's call may still be ending.
    assert poll(lambda: at_rest(url))
    unary_before = deadline_exceeded("Generate")
    generated_before = value(url, "vllm:generation_tokens_total")
    with Client(llama.target) as client, pytest.raises(grpc.RpcError) as e:
        client.generate("Hello", max_tokens=1900, ignore_eos=True, timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert poll(lambda: value(url, "vllm:num_requests_running") == 0)
    # Counted once under both names, aborted early, and its KV blocks freed.
    assert poll(lambda: deadline_exceeded("Generate") == tuple(n + 1 for n in unary_before))
    assert value(url, "vllm:generation_tokens_total") - generated_before < 1900
    assert poll(lambda: value(url, "vllm:kv_cache_usage_perc") == 0)


def test_deadline_aborts_a_stream_midway(llama: ServerProcess) -> None:
    url = llama.metrics_url
    assert poll(lambda: at_rest(url))  # as above
    stream_before = value(url, "llmgrpc_requests_deadline_exceeded_total",
                          grpc_method="GenerateStream")  # fmt: skip
    generated_before = value(url, "vllm:generation_tokens_total")
    received = 0
    with Client(llama.target) as client, pytest.raises(grpc.RpcError) as e:
        for d in client.stream("Hello", max_tokens=1900, ignore_eos=True, timeout=0.5):
            received += len(d.token_ids)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received < 1900
    assert poll(lambda: value(url, "vllm:num_requests_running") == 0)
    assert poll(lambda: value(url, "llmgrpc_requests_deadline_exceeded_total",
                               grpc_method="GenerateStream") == stream_before + 1)  # fmt: skip
    assert value(url, "vllm:generation_tokens_total") - generated_before < 1900
    assert poll(lambda: value(url, "vllm:kv_cache_usage_perc") == 0)


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


def sigterm_under_load(target: str, url: str, server_pid: int, n: int,
                       max_tokens: int) -> dict[str, Any]:  # fmt: skip
    """The client half of the drain test: n streams in flight, SIGTERM to the
    server, then what health, a new call and each stream saw. Times are
    `time.monotonic()` (CLOCK_MONOTONIC: the same clock in every process)."""
    # A slow reader (tiny HTTP/2 windows) that reads nothing until after
    # SIGTERM: all n streams are surely in flight when it arrives (still
    # sending; on this machine most are still generating too).
    with Client(target, options=SLOW_READER) as slow, Client(target) as client:
        req = generate_request("Drain me", max_tokens=max_tokens, ignore_eos=True)
        calls = [slow.stub.GenerateStream(req, timeout=120) for _ in range(n)]
        assert poll(lambda: value(url, "llmgrpc_active_streams") == n, 60)
        sigterm_at = time.monotonic()
        os.kill(server_pid, signal.SIGTERM)
        not_serving = poll(lambda: client.health() == "NOT_SERVING", 5)
        liveness = client.health("")  # keeps passing while draining
        try:
            client.generate("too late", max_tokens=1, timeout=5)
            late = ["OK", ""]
        except grpc.RpcError as e:
            late = [e.code().name, e.details()]
        streams = []
        for call in calls:
            received: list[pb.GenerateResponse] = list(call)
            streams.append([pb.FinishReason.Name(received[-1].finish_reason),
                            sum(len(d.token_ids) for d in received)])  # fmt: skip
    return {"sigterm_at": sigterm_at, "not_serving": not_serving, "liveness": liveness,
            "late": late, "streams": streams}  # fmt: skip


@pytest.mark.stops_server
def test_sigterm_drains_in_flight_streams_then_exits_zero(llama: ServerProcess) -> None:
    n, max_tokens = 16, 1500  # well within the server's drain timeout
    assert llama.proc is not None
    assert poll(lambda: at_rest(llama.metrics_url))  # the n streams it waits for are these
    # The client is a process of its own (tests/fresh_process.py says why):
    # health must turn within 5 s of the SIGTERM.
    seen = run_fresh(sigterm_under_load, llama.target, llama.metrics_url, llama.proc.pid,
                     n, max_tokens)  # fmt: skip
    assert seen["not_serving"]
    assert seen["liveness"] == "SERVING"
    code, details = seen["late"]
    assert code == "UNAVAILABLE" and "shutting down" in details, seen["late"]
    # Every in-flight stream completes, nothing truncated.
    assert seen["streams"] == [["FINISH_REASON_LENGTH", max_tokens]] * n
    assert llama.wait_exit(timeout=LLAMA_DRAIN_TIMEOUT + 60) == 0
    # A clean stop logs no error: vLLM's output handler used to log
    # EngineDeadError with its trace as the engine core stopped.
    stop = llama.stop_log()
    assert "Traceback" not in stop and " ERROR " not in stop, stop[-4000:]
    print(
        f"\ndrain of {n} streams x {max_tokens} tokens: exit 0 "
        f"{time.monotonic() - seen['sigterm_at']:.1f} s after SIGTERM"
    )
