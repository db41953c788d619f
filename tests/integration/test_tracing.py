"""Traces on the real engine: the shared `smollm` server runs with vLLM's
--otlp-traces-endpoint pointing at the session's OTLP/gRPC receiver
(tests/otlp_receiver.py), so our spans and vLLM's own `llm_request` spans
arrive in the caller's trace."""

from __future__ import annotations

import grpc
import pytest
from llmgrpc import Client
from llmgrpc.client import generate_request
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests import otlp_receiver
from tests.server_process import ServerProcess

pytestmark = pytest.mark.engine

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN_ID = "b7ad6b7169203331"
METADATA = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"),)
MODEL = "smollm2-135m-instruct"


def test_our_spans_and_vllms_continue_the_callers_trace(smollm: ServerProcess) -> None:
    with Client(smollm.target) as client:
        unary = client.stub.Generate(
            generate_request("The capital of France is", max_tokens=4, request_id="trace-unary"),
            metadata=METADATA, timeout=120)  # fmt: skip
        streamed = list(client.stub.GenerateStream(
            generate_request("Hello", max_tokens=3, request_id="trace-stream"),
            metadata=METADATA, timeout=120))  # fmt: skip
        with pytest.raises(grpc.RpcError) as refused:
            client.stub.Generate(generate_request("Hi", max_tokens=0, request_id="trace-bad"),
                                 metadata=METADATA, timeout=120)  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Ours: one per call; vLLM's: one per request that reached the engine.
    spans = otlp_receiver.shared().wait_for(lambda s: s.trace_id == TRACE_ID, count=5)
    ours = {s.attributes["gen_ai.response.id"]: s for s in spans if s.scope == "llmgrpc_server"}
    vllm = {s.attributes["gen_ai.request.id"]: s for s in spans if s.name == "llm_request"}
    assert set(ours) == {"trace-unary", "trace-stream", "trace-bad"}
    assert set(vllm) == {"trace-unary", "trace-stream"}

    for request_id, final in (("trace-unary", unary), ("trace-stream", streamed[-1])):
        span = ours[request_id]
        assert span.parent_span_id == CALLER_SPAN_ID
        assert span.span.kind == Span.SPAN_KIND_SERVER
        assert span.resource["service.name"] == "llmgrpc-server"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.attributes["gen_ai.request.model"] == MODEL
        assert span.attributes["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
        assert span.attributes["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
        # vLLM's span: the same call, a child of ours (caller -> our RPC span -> vLLM's).
        engine = vllm[request_id]
        assert engine.parent_span_id == span.span_id
        assert engine.attributes["gen_ai.usage.prompt_tokens"] == final.usage.prompt_tokens
        assert engine.attributes["gen_ai.usage.completion_tokens"] == final.usage.completion_tokens
    assert ours["trace-unary"].name == "llmgrpc.v1.LLMService/Generate"
    assert ours["trace-stream"].name == "llmgrpc.v1.LLMService/GenerateStream"
    bad = ours["trace-bad"]
    assert bad.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.span.status.code == Status.STATUS_CODE_UNSET  # the caller's mistake
    assert bad.parent_span_id == CALLER_SPAN_ID
