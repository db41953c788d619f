"""A real OTLP/gRPC trace receiver for the tests: OpenTelemetry's own
TraceService definition (opentelemetry-proto) on a grpc.aio server, port 0.

It keeps every span it is sent, with its resource's attributes, and lets a
test wait for the spans it expects (no sleeps: each export wakes the waiters).
`shared()` is the one the shared engine servers export to (tests/server_process.py).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    span: Span
    resource: dict[str, Any]
    scope: str

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_span_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.key: value(a.value) for a in self.span.attributes}


class Receiver(otlp_grpc.TraceServiceServicer):
    """Runs on grpc's own threads, so it serves whatever the caller's event
    loop is doing (the engine tests' receiver lives for the whole session)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        otlp_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=0)

    def Export(
        self, request: otlp.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> otlp.ExportTraceServiceResponse:
        received = [
            ReceivedSpan(span, {a.key: value(a.value) for a in rs.resource.attributes},
                         scope_spans.scope.name)
            for rs in request.resource_spans
            for scope_spans in rs.scope_spans
            for span in scope_spans.spans
        ]  # fmt: skip
        with self._changed:
            self.spans.extend(received)
            self._changed.notify_all()
        return otlp.ExportTraceServiceResponse()

    def wait_for(
        self, predicate: Callable[[ReceivedSpan], bool], count: int = 1, timeout: float = 60.0
    ) -> list[ReceivedSpan]:
        """The first `count` spans matching `predicate`, once that many have
        arrived (blocking: from asyncio, call it in a thread)."""

        def matching() -> list[ReceivedSpan]:
            return [s for s in self.spans if predicate(s)]

        with self._changed:
            if not self._changed.wait_for(lambda: len(matching()) >= count, timeout):
                raise TimeoutError(f"{len(matching())} of {count} spans after {timeout} s; "
                                   f"received: {[(s.name, s.trace_id) for s in self.spans]}")  # fmt: skip
            return matching()[:count]


@functools.cache
def shared() -> Receiver:
    """The receiver the shared engine servers export to, started on first use
    (it must be up before they start) and kept for the session."""
    return Receiver().start()
