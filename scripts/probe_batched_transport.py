"""Probe (issue 17): what would a transport cheaper than grpcio buy the front end?

NOT a server to deploy: a measurement. It runs llmgrpc's own engine adapter
and servicer (`LLMServicer.GenerateStream` and `Tokenize`, the same engine
settings and CPU placement as `llmgrpc-server`), but in place of grpcio it
speaks the minimum of HTTP/2 (cleartext, prior knowledge) and gRPC framing
that a grpcio client needs, and it writes to each connection once per
event-loop turn: all the messages one engine step hands out leave in one
`write`, where grpcio costs a batch of operations, a poller wake-up and a
`sendmsg` per message. No TLS, auth, interceptors, metrics, deadlines or
status table: the figures are an upper bound on what a leaner transport could
reach, not a product.

    python scripts/probe_batched_transport.py [--port 50061] [llmgrpc-server flags]


then `llmgrpc bench --target localhost:50061 ...` as against the server.
Needs `hpack` (pip install hpack; not a dependency of llmgrpc).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import struct
from collections import deque
from typing import Any

import hpack
import uvloop
from llmgrpc.v1 import llm_service_pb2 as pb

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9)  # fmt: skip
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
BIG_WINDOW = 1 << 30
SERVICE = "/llmgrpc.v1.LLMService/"
log = logging.getLogger("probe")


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", stream)
        + payload
    )


class Context:
    """What the servicer asks of grpc's context, answered for a probe."""

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def send_initial_metadata(self, _: Any) -> None:
        return None


class Stream:
    __slots__ = ("body", "header_block", "pending", "task", "window")

    def __init__(self, window: int) -> None:
        self.body = bytearray()
        self.header_block = bytearray()
        self.pending: deque[tuple[bytes, bool]] = deque()  # (frame payload or trailers, is_data)
        self.task: asyncio.Task[None] | None = None
        self.window = window


class Connection(asyncio.Protocol):
    def __init__(self, servicer: Any, *, batched: bool = True) -> None:
        self.servicer = servicer
        self.batched = batched
        self.buf = bytearray()
        self.out = bytearray()
        self.flush_scheduled = False
        self.preface_seen = False
        self.decoder = hpack.Decoder()
        self.encoder = hpack.Encoder()
        self.streams: dict[int, Stream] = {}
        self.conn_window = 65535
        self.initial_window = 65535
        self.max_frame = 16384
        self.received = 0
        self.path: dict[int, str] = {}
        self.handlers = {
            SETTINGS: self.on_settings, PING: self.on_ping, WINDOW_UPDATE: self.on_window_update,
            HEADERS: self.on_headers, CONTINUATION: self.on_continuation, DATA: self.on_data,
            RST_STREAM: self.on_rst_stream, GOAWAY: self.on_goaway,
        }  # fmt: skip

    # --- output: one write per loop turn ---------------------------------------
    def emit(self, data: bytes) -> None:
        if not self.batched:  # --write-per-message: one write per frame, as grpcio
            self.transport.write(data)
            return
        self.out += data
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and not self.transport.is_closing():
            self.transport.write(bytes(self.out))
        self.out.clear()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.emit(
            frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 1000) + struct.pack(">HI", 4, BIG_WINDOW))
        )
        self.emit(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", BIG_WINDOW - 65535)))

    def connection_lost(self, exc: Exception | None) -> None:
        for s in self.streams.values():
            if s.task is not None:
                s.task.cancel()
        self.streams.clear()

    # --- input ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.preface_seen:
            if len(self.buf) < len(PREFACE):
                return
            assert bytes(self.buf[: len(PREFACE)]) == PREFACE, "not HTTP/2 prior knowledge"
            del self.buf[: len(PREFACE)]
            self.preface_seen = True
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            kind, flags = self.buf[3], self.buf[4]
            sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(self.buf[9 : 9 + length])
            del self.buf[: 9 + length]
            self.on_frame(kind, flags, sid, payload)

    def on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        handler = self.handlers.get(kind)
        if handler is not None:  # PRIORITY, PUSH_PROMISE and unknown kinds: ignored
            handler(flags, sid, payload)

    def on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if flags & ACK:
            return
        for i in range(0, len(payload), 6):
            key, value = struct.unpack(">HI", payload[i : i + 6])
            if key == 4:  # SETTINGS_INITIAL_WINDOW_SIZE: moves every open stream's window
                for s in self.streams.values():
                    s.window += value - self.initial_window
                self.initial_window = value
            elif key == 5:
                self.max_frame = value
        self.emit(frame(SETTINGS, ACK, 0))
        self.drain_all()

    def on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if not flags & ACK:
            self.emit(frame(PING, ACK, 0, payload))

    def on_window_update(self, flags: int, sid: int, payload: bytes) -> None:
        inc = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
        if sid == 0:
            self.conn_window += inc
            self.drain_all()
        elif (s := self.streams.get(sid)) is not None:
            s.window += inc
            self.drain(sid, s)

    def on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        if flags & PRIORITY:
            payload = payload[5:]
        s = self.streams.setdefault(sid, Stream(self.initial_window))
        self.on_header_block(flags, sid, s, payload)
        if flags & END_STREAM:
            self.start_call(sid, s)

    def on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        self.on_header_block(flags, sid, self.streams[sid], payload)

    def on_header_block(self, flags: int, sid: int, s: Stream, payload: bytes) -> None:
        s.header_block += payload
        if flags & END_HEADERS:
            headers: dict[Any, Any] = dict(self.decoder.decode(bytes(s.header_block)))
            self.path[sid] = headers.get(":path", "")
            s.header_block.clear()

    def on_data(self, flags: int, sid: int, payload: bytes) -> None:
        self.received += len(payload)
        if self.received > BIG_WINDOW // 2:
            self.emit(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received)))
            self.received = 0
        s = self.streams.get(sid)
        if s is None:
            return
        if flags & PADDED:
            payload = payload[1 : len(payload) - payload[0]]
        s.body += payload
        if flags & END_STREAM:
            self.start_call(sid, s)

    def on_rst_stream(self, flags: int, sid: int, payload: bytes) -> None:
        s = self.streams.pop(sid, None)
        if s is not None and s.task is not None:
            s.task.cancel()

    def on_goaway(self, flags: int, sid: int, payload: bytes) -> None:
        self.transport.close()

    # --- calls ----------------------------------------------------------------
    def start_call(self, sid: int, s: Stream) -> None:
        method = self.path.pop(sid, "").removeprefix(SERVICE)
        body = bytes(s.body[5:])
        s.task = asyncio.get_running_loop().create_task(self.call(sid, s, method, body))

    async def call(self, sid: int, s: Stream, method: str, body: bytes) -> None:
        self.emit(frame(HEADERS, END_HEADERS, sid, self.encoder.encode(
            [(":status", "200"), ("content-type", "application/grpc")])))  # fmt: skip
        status, message = 0, ""
        try:
            if method == "GenerateStream":
                request = pb.GenerateRequest.FromString(body)
                async for msg in self.servicer.GenerateStream(request, Context()):
                    self.send_message(sid, s, msg.SerializeToString())
            elif method == "Tokenize":
                request = pb.TokenizeRequest.FromString(body)
                msg = await self.servicer.Tokenize(request, Context())
                self.send_message(sid, s, msg.SerializeToString())
            else:
                status, message = 12, f"the probe serves GenerateStream and Tokenize, not {method}"
        except asyncio.CancelledError:
            return
        except Exception as e:  # a probe: no status table
            status, message = 13, f"{type(e).__name__}: {e}"
        trailers = [("grpc-status", str(status))] + ([("grpc-message", message)] if message else [])
        s.pending.append((self.encoder.encode(trailers), False))
        self.drain(sid, s)

    def send_message(self, sid: int, s: Stream, msg: bytes) -> None:
        s.pending.append((b"\x00" + struct.pack(">I", len(msg)) + msg, True))
        self.drain(sid, s)

    def drain(self, sid: int, s: Stream) -> None:
        while s.pending:
            payload, is_data = s.pending[0]
            if is_data:
                n = len(payload)
                if n > min(s.window, self.conn_window) or n > self.max_frame:
                    return  # a probe's messages are small: no splitting across frames
                s.window -= n
                self.conn_window -= n
                self.emit(frame(DATA, 0, sid, payload))
            else:
                self.emit(frame(HEADERS, END_HEADERS | END_STREAM, sid, payload))
                self.streams.pop(sid, None)
            s.pending.popleft()

    def drain_all(self) -> None:
        for sid, s in list(self.streams.items()):
            self.drain(sid, s)


async def main(port: int, batched: bool, server_argv: list[str]) -> None:
    from llmgrpc_server import main as server_main
    from llmgrpc_server.admission import Admission
    from llmgrpc_server.metrics import ServiceMetrics
    from llmgrpc_server.server import _frozen_startup_heap
    from llmgrpc_server.servicer import LLMServicer

    config, engine_args = server_main.parse(server_argv)
    engine = await server_main.start_engine(config, engine_args)
    servicer = LLMServicer(Admission(config.max_in_flight),
                           ServiceMetrics(server_main.served_name(engine_args)),
                           config.service_version)  # fmt: skip
    servicer.attach(engine)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(servicer, batched=batched), "127.0.0.1", port
    )
    log.info("probe serving on port %d", port)
    print(f"probe ready on {port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with _frozen_startup_heap():  # as the server does once the engine is up
            await stop.wait()
    finally:
        server.close()
        await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--write-per-message", action="store_true",
                        help="write each frame at once instead of once per loop turn")  # fmt: skip
    args, server_argv = parser.parse_known_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(main(args.port, not args.write_per_message, server_argv))
