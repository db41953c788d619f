"""One client connection: HTTP/2 by python-hyper's h2 state machine, bytes
out once per event-loop turn.

grpcio sends each message with its own batch of operations, a wake-up of its
poller thread and a `sendmsg`. Here a message is a few frames appended to h2's
buffer; the connection writes the buffer once per loop turn, so all the
messages one engine step hands out leave together, and the client reads them
in one go (docs/benchmarks.md, "the transport, not Python").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hyperframe.frame

from llmgrpc_server.transport import wire
from llmgrpc_server.transport.calls import Call

if TYPE_CHECKING:
    from llmgrpc_server.transport.server import Server

log = logging.getLogger(__name__)
# hpack logs every header it decodes at DEBUG, bearer tokens included.
logging.getLogger("hpack").setLevel(logging.INFO)


def peer_name(address: Any) -> str:
    """A socket address as grpc names a peer: ipv4:host:port, ipv6:[host]:port."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return f"unix:{address}"


class Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(
            # No strict RFC 9113 checks of header values (a trailing space in a
            # token, say): grpc's server takes them and lets the handler answer.
            h2.config.H2Configuration(
                client_side=False, header_encoding="utf-8", validate_inbound_headers=False
            )
        )
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._flush_scheduled = False
        self._keepalive: asyncio.Task[None] | None = None
        self._ping_acked = asyncio.Event()
        self.closing = False

    # --- lifecycle ----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer = peer_name(transport.get_extra_info("peername"))
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.server.max_header_list_size,
            },
        )
        self.h2.initiate_connection()
        self.flush()
        self.server.connections.add(self)
        if self.server.keepalive_time > 0:
            self._keepalive = asyncio.get_running_loop().create_task(self._keep_alive())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._keepalive is not None:
            self._keepalive.cancel()
        for call in list(self.calls.values()):
            call.cancel()

    def go_away(self) -> None:
        """Take no new calls (the server drains); those in flight go on.

        The GOAWAY frame is written past h2, whose connection would refuse
        to send anything after its own close_connection(), the in-flight
        calls' messages included."""
        if self.closing:
            return
        self.closing = True
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            last = self.h2.highest_inbound_stream_id
            self.transport.write(hyperframe.frame.GoAwayFrame(last_stream_id=last).serialize())
        if not self.calls:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _keep_alive(self) -> None:
        """Ping an idle-looking client every keepalive_time; close the
        connection when a ping goes unanswered for keepalive_timeout."""
        while True:
            await asyncio.sleep(self.server.keepalive_time)
            self._ping_acked.clear()
            try:
                self.h2.ping(time.monotonic_ns().to_bytes(8, "big"))
            except h2.exceptions.ProtocolError:  # the client ended the connection
                return
            self.flush()
            try:
                await asyncio.wait_for(self._ping_acked.wait(), self.server.keepalive_timeout)
            except TimeoutError:
                log.info("closing %s: no answer to a keepalive ping", self.peer)
                self.close()
                return

    # --- bytes out: once per loop turn ---------------------------------------------
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _lost(self, e: h2.exceptions.ProtocolError) -> None:
        """h2 refused to send: the client ended the connection (its GOAWAY)."""
        log.info("%s: cannot send (%s); its calls are cancelled", self.peer, e)
        for call in list(self.calls.values()):
            call.cancel()

    def send_headers(self, stream_id: int, headers: list[tuple[str, str]]) -> bool:
        """Queue a response's headers; False: the stream is gone (reset by the client)."""
        return self._send(self.h2.send_headers, stream_id, headers)

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of `data` as flow control and the frame size let the
        stream send now, as one DATA frame; how many bytes that was (0: wait
        for a WINDOW_UPDATE), -1: the stream is gone (reset by the client).

        Every message of a stream goes through here, so the frame is written
        by hand instead of by h2's send_data (its state machines, a frame
        object and a copy: 5.1 µs a message against 0.95,
        scripts/microbench_transport.py). h2 keeps
        the books: both flow-control windows are charged as its send_data
        charges them, and the frame joins h2's buffer, after the stream's
        HEADERS, in order. DATA changes no state in h2's machines while the
        stream is open, which `_open` checks."""
        if (stream := self._open(stream_id)) is None:
            return -1
        h2conn = self.h2
        size = min(len(data), h2conn.outbound_flow_control_window,
                   stream.outbound_flow_control_window, h2conn.max_outbound_frame_size)  # fmt: skip
        if size <= 0:
            return 0
        h2conn.outbound_flow_control_window -= size
        stream.outbound_flow_control_window -= size
        out = h2conn._data_to_send  # h2's outbound buffer (h2 < 5)
        out += wire.data_frame_header(stream_id, size)
        out += data[:size]
        self._schedule_flush()
        return size

    def _open(self, stream_id: int) -> h2.stream.H2Stream | None:
        """h2's stream if it still has it open, else None. Sending on one it
        has dropped (the client reset it) would make h2 open a new server
        stream instead, and fail the whole connection."""
        stream = self.h2.streams.get(stream_id)
        return None if stream is None or stream.closed else stream

    def _send(self, send: Any, stream_id: int, payload: Any) -> bool:
        if self._open(stream_id) is None:
            return False
        try:
            send(stream_id, payload)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return False  # this stream only: the client reset it meanwhile
        except h2.exceptions.ProtocolError as e:
            self._lost(e)
            return False
        self._schedule_flush()
        return True

    def send_trailers(self, stream_id: int, headers: list[tuple[str, str]]) -> None:
        """End the stream with `headers`; nothing if the client reset it meanwhile."""
        self._send(partial(self.h2.send_headers, end_stream=True), stream_id, headers)

    def reset(self, stream_id: int) -> None:
        if self._open(stream_id) is None:
            return
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:  # closed already, or the connection
            return
        self._schedule_flush()

    def call_ended(self, call: Call) -> None:
        self.calls.pop(call.stream_id, None)
        if self.closing and not self.calls:
            self.flush()
            self.close()

    # --- bytes in -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.info("closing %s: HTTP/2 protocol error: %s", self.peer, e)
            self.flush()  # h2 has queued its GOAWAY
            self.close()
            return
        for event in events:
            self._on_event(event)
        self._schedule_flush()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if (call := self.calls.get(event.stream_id)) is not None:
                call.on_data(event.data)
        elif isinstance(event, h2.events.RequestReceived):
            self._start(event.stream_id, event.headers)  # type: ignore[arg-type]  # str: header_encoding
        elif isinstance(event, h2.events.StreamEnded):
            if (call := self.calls.get(event.stream_id)) is not None:
                call.on_end()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_opened(getattr(event, "stream_id", 0))
        elif isinstance(event, h2.events.StreamReset):
            if (call := self.calls.pop(event.stream_id, None)) is not None:
                call.cancel()
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_acked.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closing = True
            if not self.calls:
                self.close()

    def _window_opened(self, stream_id: int) -> None:
        """Wake the calls waiting for flow-control room (0: the connection's)."""
        calls = self.calls.values() if stream_id == 0 else [self.calls.get(stream_id)]
        for call in calls:
            if call is not None:
                call.window_open.set()

    def _start(self, stream_id: int, headers: Sequence[tuple[str, str]]) -> None:
        call = Call(self, stream_id, self.server.max_message_bytes)
        self.calls[stream_id] = call
        fields = dict(headers)
        try:
            if not fields.get("content-type", "").startswith("application/grpc"):
                raise wire.WireError(grpc.StatusCode.INTERNAL, "not application/grpc")
            call.reader.encoding = fields.get("grpc-encoding", "identity")
            if call.reader.encoding not in wire.ENCODINGS:
                raise wire.WireError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"grpc-encoding {call.reader.encoding!r} is not supported "
                    f"(grpc-accept-encoding: {wire.ACCEPT_ENCODING})",
                )
            timeout = fields.get("grpc-timeout")
            deadline = None if timeout is None else time.monotonic() + wire.parse_timeout(timeout)
        except wire.WireError as e:
            call.send_status(e.code, e.details)
            self.call_ended(call)
            return
        metadata = wire.request_metadata(headers)
        loop = asyncio.get_running_loop()
        call.task = loop.create_task(
            self.server.dispatch(call, fields.get(":path", ""), metadata, deadline, self.peer)
        )
        if deadline is not None:
            timer = loop.call_at(loop.time() + (deadline - time.monotonic()), call.expire)
            call.task.add_done_callback(lambda _: timer.cancel())
