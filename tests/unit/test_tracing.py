"""Our OpenTelemetry server spans (server/llmgrpc_server/tracing.py), exported
over OTLP/gRPC to a real trace receiver (tests/otlp_receiver.py), from a real
gRPC server around the fake engine."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmgrpc.client import generate_request
from llmgrpc.v1 import admin_service_pb2 as admin_pb
from llmgrpc.v1 import admin_service_pb2_grpc as admin_grpc
from llmgrpc.v1 import llm_service_pb2 as pb
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc
from llmgrpc_server import server, tracing
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.metrics import GrpcMetrics
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry

from tests.fake_server import _used_ports
from tests.fakes import FakeEngine
from tests.otlp_receiver import ReceivedSpan, Receiver

# The caller's span: what its W3C traceparent says.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
TRACESTATE = "vendor=opaque"
ADMIN_TOKEN = "admin-token"
LLM = "llmgrpc.v1.LLMService"


def traced(trace_id: str = TRACE_ID, flags: str = "01") -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id}-{CALLER_SPAN_ID}-{flags}"),
            ("tracestate", TRACESTATE))  # fmt: skip


@dataclass
class Traced:
    receiver: Receiver
    tracing: tracing.Tracing
    engine: FakeEngine
    channel: grpc.aio.Channel

    @property
    def stub(self) -> pb_grpc.LLMServiceStub:
        return pb_grpc.LLMServiceStub(self.channel)

    async def spans(self, trace_id: str, count: int) -> list[ReceivedSpan]:
        """The first `count` of our spans in trace `trace_id`, once exported."""
        assert await asyncio.to_thread(self.tracing.force_flush)
        return await asyncio.to_thread(
            self.receiver.wait_for, lambda s: s.trace_id == trace_id, count)


@pytest.fixture
async def traced_server() -> AsyncIterator[Traced]:
    """A fake-engine server whose tracing exports to a receiver that was up first."""
    receiver = Receiver().start()
    spans = tracing.Tracing.to(receiver.endpoint, "0.test", "fake")
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                          admin_tokens=(ADMIN_TOKEN,))  # fmt: skip
    while True:  # as tests/fake_server.start_fake: never a port this session had
        registry = CollectorRegistry()
        running = await server.start(config, "fake", GrpcMetrics(registry), registry, spans)
        if running.port not in _used_ports:
            break
        await running.server.stop(grace=0)
    _used_ports.add(running.port)
    engine = FakeEngine()
    running.servicer.attach(engine)
    await running.health.set(LLM, server.SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Traced(receiver, spans, engine, channel)
    await running.server.stop(grace=0)
    await spans.shutdown()
    receiver.stop()


async def _code(call: object) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _check_rpc(span: ReceivedSpan, method: str, code: grpc.StatusCode, service: str = LLM) -> None:
    assert span.name == f"{service}/{method}"
    assert span.span.kind == Span.SPAN_KIND_SERVER
    assert span.attributes["rpc.system"] == "grpc"
    assert span.attributes["rpc.service"] == service
    assert span.attributes["rpc.method"] == method
    assert span.attributes["rpc.grpc.status_code"] == code.value[0]
    assert span.resource["service.name"] == "llmgrpc-server"
    assert span.resource["service.version"] == "0.test"


async def test_generate_and_stream_spans_are_children_of_the_callers_span(
    traced_server: Traced,
) -> None:
    unary = await traced_server.stub.Generate(
        generate_request("hello", max_tokens=5, request_id="unary-1"), metadata=traced()
    )
    streamed = [m async for m in traced_server.stub.GenerateStream(
        generate_request("hello there", max_tokens=3), metadata=traced())]  # fmt: skip
    spans = {s.attributes["rpc.method"]: s for s in await traced_server.spans(TRACE_ID, 2)}

    for method, final in (("Generate", unary), ("GenerateStream", streamed[-1])):
        span = spans[method]
        _check_rpc(span, method, grpc.StatusCode.OK)
        assert span.parent_span_id == CALLER_SPAN_ID
        assert span.span.trace_state == TRACESTATE
        assert span.span.status.code == Status.STATUS_CODE_UNSET
        assert span.attributes["gen_ai.request.model"] == "fake"
        assert span.attributes["gen_ai.response.id"] == final.request_id
        assert span.attributes["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
        assert span.attributes["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    assert spans["Generate"].attributes["gen_ai.response.id"] == "unary-1"
    assert spans["Generate"].attributes["gen_ai.usage.output_tokens"] == 5
    assert spans["GenerateStream"].attributes["gen_ai.usage.output_tokens"] == 3
    assert spans["Generate"].span_id != spans["GenerateStream"].span_id
    # The engine gets our span's context, not the caller's: its spans are our children.
    handed = [dict(r.trace_headers) for r in traced_server.engine.requests[-2:]]
    for headers, method in zip(handed, ("Generate", "GenerateStream"), strict=True):
        assert headers["traceparent"] == f"00-{TRACE_ID}-{spans[method].span_id}-01"
        assert headers["tracestate"] == TRACESTATE


async def test_a_callers_error_is_recorded_and_a_server_error_is_an_error_span(
    traced_server: Traced,
) -> None:
    """INVALID_ARGUMENT (the caller's mistake) keeps the status unset, as the
    gRPC conventions say for server spans; INTERNAL is an ERROR span."""
    bad = generate_request("hello", max_tokens=0, request_id="bad-1")
    assert await _code(traced_server.stub.Generate(bad, metadata=traced())) == (
        grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert await _code(traced_server.stub.GenerateStream(bad, metadata=traced())) == (
        grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    [invalid_unary, invalid_stream] = sorted(
        await traced_server.spans(TRACE_ID, 2), key=lambda s: s.name)
    for span, method in ((invalid_unary, "Generate"), (invalid_stream, "GenerateStream")):
        _check_rpc(span, method, grpc.StatusCode.INVALID_ARGUMENT)
        assert span.parent_span_id == CALLER_SPAN_ID
        assert span.span.status.code == Status.STATUS_CODE_UNSET
        assert span.attributes["gen_ai.response.id"] == "bad-1"  # from the request
        assert "gen_ai.usage.input_tokens" not in span.attributes

    failing = "11111111111111111111111111111111"
    traced_server.engine.fail_with = RuntimeError("boom")
    assert await _code(traced_server.stub.Generate(
        generate_request("hello", max_tokens=2), metadata=traced(failing))) == (
        grpc.StatusCode.INTERNAL)  # fmt: skip
    [internal] = await traced_server.spans(failing, 1)
    _check_rpc(internal, "Generate", grpc.StatusCode.INTERNAL)
    assert internal.span.status.code == Status.STATUS_CODE_ERROR
    assert internal.span.status.message == "INTERNAL"
    assert "boom" not in str(internal.span)  # no internals leak into the span either


async def test_x_request_id_names_a_call_without_a_request_id(traced_server: Traced) -> None:
    metadata = (*traced(), ("x-request-id", "from-metadata"))
    bad = generate_request("hello", max_tokens=0)
    assert await _code(traced_server.stub.Generate(bad, metadata=metadata)) == (
        grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    [span] = await traced_server.spans(TRACE_ID, 1)
    assert span.attributes["gen_ai.response.id"] == "from-metadata"


async def test_untraced_calls_start_a_trace_and_unsampled_callers_are_not_exported(
    traced_server: Traced,
) -> None:
    """Sampling is parent based: no traceparent, a new trace (sampled); a
    caller's unsampled flag (-00), no span. Health and reflection: no spans."""
    unsampled = "22222222222222222222222222222222"
    health = "33333333333333333333333333333333"
    await traced_server.stub.Generate(
        generate_request("a", max_tokens=1), metadata=traced(unsampled, flags="00"))
    await health_pb2_grpc.HealthStub(traced_server.channel).Check(
        health_pb2.HealthCheckRequest(service=LLM), metadata=traced(health))
    await traced_server.stub.Generate(
        generate_request("b", max_tokens=1, request_id="root-1"))
    assert await asyncio.to_thread(traced_server.tracing.force_flush)
    [root] = await asyncio.to_thread(traced_server.receiver.wait_for,
                                     lambda s: s.attributes.get("gen_ai.response.id") == "root-1")
    assert root.parent_span_id == ""
    assert root.trace_id not in (TRACE_ID, unsampled, health)
    # Exported in the order they ended: what was sampled before root is here.
    assert {s.trace_id for s in traced_server.receiver.spans} == {root.trace_id}


async def test_admin_calls_have_spans_without_a_model(traced_server: Traced) -> None:
    stub = admin_grpc.AdminServiceStub(traced_server.channel)
    await stub.ListAdapters(admin_pb.ListAdaptersRequest(),
                            metadata=(*traced(), ("authorization", f"Bearer {ADMIN_TOKEN}")))  # fmt: skip
    [span] = await traced_server.spans(TRACE_ID, 1)
    _check_rpc(span, "ListAdapters", grpc.StatusCode.OK, service=tracing.ADMIN_SERVICE)
    assert span.parent_span_id == CALLER_SPAN_ID
    assert "gen_ai.request.model" not in span.attributes


async def test_tokenize_names_the_model_it_was_asked_for(traced_server: Traced) -> None:
    await traced_server.stub.Tokenize(pb.TokenizeRequest(text="hi"), metadata=traced())
    code = await _code(traced_server.stub.Tokenize(
        pb.TokenizeRequest(text="hi", model="other"), metadata=traced()))  # fmt: skip
    assert code == grpc.StatusCode.NOT_FOUND
    spans = await traced_server.spans(TRACE_ID, 2)
    assert sorted(s.attributes["gen_ai.request.model"] for s in spans) == ["fake", "other"]
    assert sorted(s.attributes["rpc.grpc.status_code"] for s in spans) == [0, 5]


def test_attribute_names_are_the_semantic_conventions() -> None:
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
    from opentelemetry.semconv._incubating.attributes import rpc_attributes as rpc

    assert (tracing.RPC_SYSTEM, tracing.RPC_SERVICE, tracing.RPC_METHOD,
            tracing.RPC_GRPC_STATUS_CODE) == (
        rpc.RPC_SYSTEM, rpc.RPC_SERVICE, rpc.RPC_METHOD, rpc.RPC_GRPC_STATUS_CODE)  # fmt: skip
    assert (tracing.GEN_AI_REQUEST_MODEL, tracing.GEN_AI_RESPONSE_ID,
            tracing.GEN_AI_USAGE_INPUT_TOKENS, tracing.GEN_AI_USAGE_OUTPUT_TOKENS) == (
        gen_ai.GEN_AI_REQUEST_MODEL, gen_ai.GEN_AI_RESPONSE_ID,
        gen_ai.GEN_AI_USAGE_INPUT_TOKENS, gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS)  # fmt: skip


def test_the_exporter_follows_vllms_protocol_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    monkeypatch.delenv(tracing.PROTOCOL_ENV, raising=False)
    assert isinstance(tracing.exporter("http://127.0.0.1:4317"), Grpc)
    monkeypatch.setenv(tracing.PROTOCOL_ENV, "http/protobuf")
    assert isinstance(tracing.exporter("http://127.0.0.1:4318/v1/traces"), Http)
    monkeypatch.setenv(tracing.PROTOCOL_ENV, "carrier-pigeon")
    with pytest.raises(ValueError, match="carrier-pigeon"):
        tracing.exporter("http://127.0.0.1:4317")


def test_otel_service_name_overrides_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracing.resource("1").attributes["service.name"] == "llmgrpc-server"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-eu-1")
    assert tracing.resource("1").attributes["service.name"] == "llm-eu-1"


def test_without_the_flag_the_request_path_never_imports_tracing() -> None:
    """No provider and no span objects without the flag: the modules a server
    runs do not import tracing.py (main.py imports it only with the flag)."""
    code = ("import sys, llmgrpc_server.server, llmgrpc_server.main; "
            "assert 'llmgrpc_server.tracing' not in sys.modules, 'imported'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
