"""Our own OpenTelemetry spans: one SERVER span per RPC, exported over OTLP.

On only with vLLM's `--otlp-traces-endpoint` (main.py builds a `Tracing`
from the engine arguments); without it this module is never imported and the
request path creates no span. The span continues the caller's trace: its
parent is read from the call's W3C `traceparent`/`tracestate` metadata.

Spans go to the same endpoint, over the same transport, as vLLM's own
(`vllm.tracing.otel`): OTLP/gRPC, plaintext unless the endpoint is
`https://`; OTLP/HTTP when OTEL_EXPORTER_OTLP_TRACES_PROTOCOL is
`http/protobuf`. The provider is ours, not the global one (vLLM sets that for
its `llm_request` spans), so the two never replace each other's exporter.
The SDK reads the standard OTEL_* variables: the sampler (default: parent
based, so the caller's sampled flag decides; a call without a parent is
sampled), the batch processor's sizes and delays, the exporter's headers,
timeout and certificate, and the resource (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import grpc
from llmgrpc.v1 import admin_service_pb2
from llmgrpc.v1 import llm_service_pb2 as pb
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Span attributes, from the OpenTelemetry semantic conventions: the RPC ones
# as OpenTelemetry's own gRPC instrumentation emits them (semconv 1.37's
# experimental RPC names), gen_ai.* for the model and its usage.
RPC_SYSTEM = "rpc.system"
RPC_SERVICE = "rpc.service"
RPC_METHOD = "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
# The request id the response carries (vLLM's llm_request span has it as gen_ai.request.id).
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"

# The codes the gRPC conventions count as a server span's errors. The
# others are the caller's (INVALID_ARGUMENT, NOT_FOUND, CANCELLED...) or a
# refusal by design (RESOURCE_EXHAUSTED): their status stays unset, and the
# code is on the span either way.
SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})  # fmt: skip

LLM_SERVICE = pb.DESCRIPTOR.services_by_name["LLMService"].full_name
ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# Health checks (probes every few seconds, Watch streams held for hours) and
# reflection (tooling) would bury the calls that matter: no spans for them.
TRACED_SERVICES = frozenset({LLM_SERVICE, ADMIN_SERVICE})

# A caller's string (model name, request id) longer than the server accepts
# (domain.Limits.max_request_id_len: the call fails INVALID_ARGUMENT) is not
# copied onto the span.
MAX_CALLER_STRING = 256
DEFAULT_SERVICE_NAME = "llmgrpc-server"
PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
_TRACE_METADATA = ("traceparent", "tracestate")


def exporter(endpoint: str) -> SpanExporter:
    """The OTLP exporter vLLM would use for `endpoint` (vllm.tracing.otel)."""
    protocol = os.environ.get(PROTOCOL_ENV, "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # As vLLM: plaintext, unless the endpoint says https.
        return OTLPSpanExporter(endpoint=endpoint, insecure=True)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as OTLPHttpSpanExporter,
        )

        return OTLPHttpSpanExporter(endpoint=endpoint)
    raise ValueError(f"{PROTOCOL_ENV}={protocol!r}: only 'grpc' and 'http/protobuf' are supported")


def resource(service_version: str) -> Resource:
    """The OTEL_* resource, named llmgrpc-server unless OTEL_SERVICE_NAME (or
    OTEL_RESOURCE_ATTRIBUTES) names it."""
    detected = Resource.create({SERVICE_VERSION: service_version})
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        detected = detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


class Tracing:
    """A tracer provider of our own and the spans of the RPCs it traces."""

    def __init__(self, span_exporter: SpanExporter, service_version: str, model_name: str) -> None:
        self._provider = TracerProvider(resource=resource(service_version))
        self._provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self._tracer = self._provider.get_tracer("llmgrpc_server", service_version)
        self._propagator = TraceContextTextMapPropagator()
        self.model_name = model_name

    @classmethod
    def to(cls, endpoint: str, service_version: str, model_name: str) -> Tracing:
        """Export to `endpoint` (vLLM's --otlp-traces-endpoint)."""
        return cls(exporter(endpoint), service_version, model_name)

    def start(
        self, service: str, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> RpcSpan | None:
        """The span of a call to service/method, None for untraced services."""
        if service not in TRACED_SERVICES:
            return None
        carrier: dict[str, list[str]] = {}
        for key, value in metadata or ():
            if key in _TRACE_METADATA and isinstance(value, str):
                carrier.setdefault(key, []).append(value)
        span = self._tracer.start_span(
            f"{service}/{method}",
            context=self._propagator.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes={RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: method},
        )
        return RpcSpan(span, self.model_name if service == LLM_SERVICE else None, self._propagator)

    def force_flush(self) -> bool:
        return self._provider.force_flush()

    async def shutdown(self) -> None:
        """Export the spans still batched, then stop (off the event loop: the
        exporter may wait for an unreachable collector up to its timeout)."""
        await asyncio.to_thread(self._provider.shutdown)


class RpcSpan:
    """One call's span: what its request and responses say, then its status."""

    __slots__ = ("_model", "_propagator", "_span")

    def __init__(
        self, span: trace.Span, model_name: str | None, propagator: TraceContextTextMapPropagator
    ) -> None:
        self._span = span
        self._model = model_name
        self._propagator = propagator

    def context_headers(self) -> tuple[tuple[str, str], ...]:
        """This span's W3C trace context (traceparent, tracestate), for the engine."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(self._span))
        return tuple(sorted(carrier.items()))

    def request(self, msg: object, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """The model a call names (an adapter or the base model) and its request id."""
        if self._model is None:
            return
        model = getattr(msg, "model", "") or self._model
        if len(model) <= MAX_CALLER_STRING:
            self._span.set_attribute(GEN_AI_REQUEST_MODEL, model)
        request_id = getattr(msg, "request_id", "") or _first(metadata, "x-request-id")
        if request_id and len(request_id) <= MAX_CALLER_STRING:
            self._span.set_attribute(GEN_AI_RESPONSE_ID, request_id)

    def response(self, msg: object) -> None:
        """A response message: the request id the server used, the final usage."""
        if not isinstance(msg, pb.GenerateResponse):
            return
        if msg.request_id:
            self._span.set_attribute(GEN_AI_RESPONSE_ID, msg.request_id)
        if msg.HasField("usage"):
            self._span.set_attribute(GEN_AI_USAGE_INPUT_TOKENS, msg.usage.prompt_tokens)
            self._span.set_attribute(GEN_AI_USAGE_OUTPUT_TOKENS, msg.usage.completion_tokens)

    def end(self, code: grpc.StatusCode) -> None:
        self._span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
        if code in SERVER_ERRORS:
            self._span.set_status(trace.StatusCode.ERROR, code.name)
        self._span.end()


def _first(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str:
    for k, value in metadata or ():
        if k == key and isinstance(value, str):
            return value
    return ""
