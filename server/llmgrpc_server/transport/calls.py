"""One gRPC call on one HTTP/2 stream: read its request messages, run its
handler (through the server's interceptors), send what the handler returns
or yields, end with the status.

The bytes go into the connection's h2 state machine and leave with the
connection's next flush, once per event-loop turn (transport/connection.py):
every message the engine's step hands out in one turn shares one write.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from llmgrpc_server.transport import wire
from llmgrpc_server.transport.context import Context

if TYPE_CHECKING:
    from llmgrpc_server.transport.connection import Connection

log = logging.getLogger(__name__)
_END = object()  # the request stream's end, in the queue of request messages


class Call:
    def __init__(self, conn: Connection, stream_id: int, max_message_bytes: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.reader = wire.MessageReader(max_message_bytes)
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.headers_sent = False
        self.window_open = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.ended = False  # the status is sent
        self.expired = False

    # --- from the connection ------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        try:
            for message in self.reader.feed(data):
                self.requests.put_nowait(message)
        except wire.WireError as e:
            # Answered now: the handler may not have started, and the client
            # may go on sending the rest of a message it should not have sent.
            self.send_status(e.code, e.details)
            self.cancel()
            self.conn.call_ended(self)

    def on_end(self) -> None:
        self.requests.put_nowait(_END)

    def cancel(self) -> None:
        """The client reset the stream, or the connection is gone."""
        if self.task is not None:
            self.task.cancel()

    def expire(self) -> None:
        """The call's deadline passed: the handler is cancelled, as grpc does."""
        self.expired = True
        self.cancel()

    # --- sending --------------------------------------------------------------------
    def send_headers(self, metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        if not self.headers_sent:
            self.headers_sent = True
            headers = wire.RESPONSE_HEADERS + wire.metadata_headers(metadata)
            if not self.conn.send_headers(self.stream_id, headers):
                raise asyncio.CancelledError  # the client reset the stream

    async def send_message(self, serialized: bytes) -> None:
        if len(serialized) > self.reader.max_bytes:
            raise wire.WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"SERVER: Sent message larger than max ({len(serialized)} vs. "
                f"{self.reader.max_bytes})",
            )
        self.send_headers()
        data = memoryview(wire.frame_message(serialized))
        while data:
            sent = self.conn.send_data(self.stream_id, data)
            if sent == 0:  # the client's window is full: wait for its WINDOW_UPDATE
                self.window_open.clear()
                await self.window_open.wait()
                continue
            # A stream the client reset ends as a cancelled call, as with grpc:
            # the handler is closed, the engine request aborted.
            if sent < 0:
                raise asyncio.CancelledError
            data = data[sent:]

    def send_status(self, code: grpc.StatusCode, details: str | None,
                    metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:  # fmt: skip
        if self.ended:
            return
        self.ended = True
        trailers = wire.status_headers(code, details, metadata)
        if not self.headers_sent:  # trailers-only: one HEADERS frame
            self.headers_sent = True
            trailers = wire.RESPONSE_HEADERS + trailers
        self.conn.send_trailers(self.stream_id, trailers)

    # --- running ----------------------------------------------------------------------
    async def _request(self, deserialize: Any) -> Any:
        message = await self.requests.get()
        if message is _END:
            raise wire.WireError(grpc.StatusCode.INTERNAL, "the request carried no message")
        end = await self.requests.get()
        if end is not _END:
            raise wire.WireError(grpc.StatusCode.INTERNAL,
                                 "a unary request carried more than one message")  # fmt: skip
        return deserialize(message) if deserialize else message

    async def _request_stream(self, deserialize: Any) -> AsyncIterator[Any]:
        while (message := await self.requests.get()) is not _END:
            yield deserialize(message) if deserialize else message

    async def run(self, handler: grpc.RpcMethodHandler, metadata: wire.Metadata,
                  deadline: float | None, peer: str) -> None:  # fmt: skip
        """Run `handler`; always ends the stream with a status or a reset."""
        serialize = handler.response_serializer or (lambda m: m)

        async def write(message: Any) -> None:  # context.write(), e.g. health's Watch
            await self.send_message(serialize(message))

        context = Context(metadata, deadline, peer, self.send_headers, write)
        try:
            await self._handle(handler, context, serialize)
            code = context.code() or grpc.StatusCode.OK
            self.send_status(code, context.details(), context.trailing_metadata())
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            self.send_status(code, context.details(), context.trailing_metadata())
        except wire.WireError as e:
            self.send_status(e.code, e.details)
        except asyncio.CancelledError:
            if self.expired:
                self.send_status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            elif not self.ended:
                self.conn.reset(self.stream_id)
        except Exception as e:
            code = context.code()
            if code not in (None, grpc.StatusCode.OK):  # set before raising, as the
                self.send_status(code, context.details())  # generated stubs do
            else:  # as grpc answers a handler's unexpected exception
                log.exception("unexpected error in a handler")
                self.send_status(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e)}: {e}")
        finally:
            self.conn.call_ended(self)

    async def _handle(self, handler: grpc.RpcMethodHandler, context: Context,
                      serialize: Any) -> None:  # fmt: skip
        if handler.request_streaming:
            request: Any = self._request_stream(handler.request_deserializer)
        else:
            request = await self._request(handler.request_deserializer)
        behavior = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                    or handler.stream_stream)  # fmt: skip
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            try:
                async for response in result:
                    await self.send_message(serialize(response))
            finally:  # at once, not when collected: the engine request ends with it
                await result.aclose()
            return
        response = await result
        if not handler.response_streaming and response is not None:
            await self.send_message(serialize(response))
