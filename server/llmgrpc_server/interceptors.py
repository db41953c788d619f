"""One server interceptor for errors and gRPC metrics, on every RPC.

It wraps unary and streaming handlers alike:
1. counts the call as started;
2. runs the handler, turning `ServiceError`s into rich statuses and any other
   exception into INTERNAL with a generic message (the trace goes to the log);
   a request that does not parse (corrupt wire bytes, invalid UTF-8 in a
   string field) is INVALID_ARGUMENT, not grpc's own UNKNOWN;
3. records the final code, the duration and the messages sent, including for
   calls that the client cancelled or whose deadline expired;
4. holds a place in the per-connection limit for the calls of the limited
   services (LLMService; not health or reflection) while they run;
5. with tracing on (tracing.py), records the call in a span of its own: the
   request's model and id, the final usage, the status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from llmgrpc_server import call_metadata
from llmgrpc_server.admission import ConnectionLimit
from llmgrpc_server.errors import InvalidArgument, ServiceError, to_status
from llmgrpc_server.metrics import GrpcMetrics, ServiceMetrics

if TYPE_CHECKING:  # imported only with tracing on (main.py)
    from llmgrpc_server.tracing import RpcSpan, Tracing

log = logging.getLogger(__name__)

_Handler = Callable[..., Any]

# A client's own deadline timer starts before the server's (the server starts
# its timer when it reads the request), so when a deadline passes the client
# usually gives up first and the server sees a plain cancellation a few
# milliseconds before its own deadline. A cancellation this close to the
# deadline is counted as the deadline: at most 1 s and a tenth of the time
# the call was given.
DEADLINE_SLACK_SECONDS = 1.0
DEADLINE_SLACK_FRACTION = 0.1


def _deadline_passed(budget: float | None, remaining: float | None) -> bool:
    """Whether a call cancelled with `remaining` seconds left of `budget` hit its deadline."""
    if budget is None or remaining is None:
        return False
    slack = min(DEADLINE_SLACK_SECONDS, DEADLINE_SLACK_FRACTION * budget)
    return remaining <= slack


class _Undecodable:
    """Stands in for a request message that did not parse."""

    def __init__(self, error: DecodeError) -> None:
        self.error = InvalidArgument("request", f"cannot be parsed: {error}")


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpc would answer UNKNOWN with the exception's repr; parse errors are the
    # caller's bad input, so hand them to the handler to raise as one.
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as e:
            return _Undecodable(e)

    return deserialize


class _Call:
    """Bookkeeping for one RPC."""

    def __init__(
        self,
        rpc_type: str,
        full_method: str,
        grpc_metrics: GrpcMetrics,
        context: grpc.aio.ServicerContext,
        tracing: Tracing | None,
    ) -> None:
        _, _, path = full_method.partition("/")
        self.service, _, self.method = path.partition("/")
        self.labels = (rpc_type, self.service, self.method)
        self.metrics = grpc_metrics
        self.code = grpc.StatusCode.OK
        self.start = time.perf_counter()
        self.budget = context.time_remaining()  # seconds to the deadline, None if none
        self.finished = False
        grpc_metrics.started.labels(*self.labels).inc()
        grpc_metrics.msg_received.labels(*self.labels).inc()
        self.span: RpcSpan | None = None
        if tracing is not None:
            self.span = tracing.start(self.service, self.method, context.invocation_metadata())

    def finish(self) -> None:
        """Record the call once (an error records it before its status is sent)."""
        if self.finished:
            return
        self.finished = True
        self.metrics.handled.labels(*self.labels, self.code.name).inc()
        self.metrics.handling_seconds.labels(*self.labels).observe(
            time.perf_counter() - self.start
        )
        if self.span is not None:
            self.span.end(self.code)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        grpc_metrics: GrpcMetrics,
        service_metrics: ServiceMetrics,
        connections: ConnectionLimit,
        limited_services: frozenset[str],
        tracing: Tracing | None = None,
    ) -> None:
        self._grpc = grpc_metrics
        self._service = service_metrics
        self._connections = connections
        self._limited = limited_services
        self._tracing = tracing

    def _place(
        self, call: _Call, context: grpc.aio.ServicerContext
    ) -> contextlib.AbstractContextManager[None]:
        """The call's place in its connection's limit (none for unlimited services)."""
        if call.service not in self._limited:
            return contextlib.nullcontext()
        return self._connections.hold(context.peer())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if method.split("/")[1] in self._limited:
            self._service.frontend_call()
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        unary_codec = {**codec, "request_deserializer": _lenient(handler.request_deserializer)}
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method), **unary_codec
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, "server_stream"), **unary_codec
            )
        if handler.stream_stream:
            # Reflection: count it, but it has no service errors to map.
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method, "bidi_stream"), **codec
            )
        return handler

    def _unary(self, behavior: _Handler, method: str, rpc_type: str = "unary") -> _Handler:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(rpc_type, method, self._grpc, context, self._tracing)
            try:
                if isinstance(request, _Undecodable):
                    raise request.error
                if call.span is not None:
                    call.span.request(request, context.invocation_metadata())
                    # The handler runs in this call's task: the engine sees our span.
                    call_metadata.SERVER_SPAN_CONTEXT.set(call.span.context_headers())
                with self._place(call, context):
                    response = await behavior(request, context)
                self._grpc.msg_sent.labels(*call.labels).inc()
                if call.span is not None:
                    call.span.response(response)
                return response
            except BaseException as e:
                await self._fail(call, context, e)
                raise
            finally:
                call.finish()

        return unary

    def _stream(self, behavior: _Handler, method: str, rpc_type: str) -> _Handler:
        if not inspect.isasyncgenfunction(behavior):
            # A handler that writes with context.write() (e.g. health Watch).
            return self._unary(behavior, method, rpc_type)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(rpc_type, method, self._grpc, context, self._tracing)
            sent = self._grpc.msg_sent.labels(*call.labels)
            span = call.span
            try:
                if isinstance(request, _Undecodable):
                    raise request.error
                if span is not None:
                    span.request(request, context.invocation_metadata())
                    call_metadata.SERVER_SPAN_CONTEXT.set(span.context_headers())
                with self._place(call, context):
                    async for response in behavior(request, context):
                        if span is not None:
                            span.response(response)
                        yield response
                        sent.inc()
            except BaseException as e:
                await self._fail(call, context, e)
                raise
            finally:
                call.finish()

        return stream

    async def _fail(self, call: _Call, context: grpc.aio.ServicerContext, e: BaseException) -> None:
        """Record why the call ended and, for errors, abort it with a status.

        Re-raising is left to the caller: abort_with_status raises AbortError,
        which grpc turns into the status; cancellation must propagate as is.
        """
        if isinstance(e, asyncio.CancelledError | GeneratorExit):
            if _deadline_passed(call.budget, context.time_remaining()):
                call.code = grpc.StatusCode.DEADLINE_EXCEEDED
                self._service.deadline_exceeded(call.method)
            else:
                call.code = grpc.StatusCode.CANCELLED
                self._service.cancelled(call.method)
            return
        if isinstance(e, grpc.aio.AbortError):
            call.code = context.code() or grpc.StatusCode.UNKNOWN  # type: ignore[assignment]
            return
        if isinstance(e, ServiceError):
            call.code = e.code
            if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._service.deadline_exceeded(call.method)
            if e.reason:  # the engine failed or refused it (vllm_adapter/failures.py)
                self._service.engine_failed(call.method, e.reason)
        else:
            call.code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in %s/%s", call.service, call.method)
        # Counted before the caller can see the status: a client that reads the
        # metrics right after its call failed finds the failure counted.
        call.finish()
        await context.abort_with_status(to_status(e))
