"""A `grpc.aio.Server` on llmgrpc's own HTTP/2 transport (`--transport batched`).

It takes what grpcio's server takes: the generated `add_*Servicer_to_server`
functions, grpc's health and reflection servicers, and grpc.aio server
interceptors (ours: auth, metrics, tracing, the status table). What differs
is how bytes leave (transport/connection.py). Ports bind when added, as
grpcio's do, with SO_REUSEPORT (`--api-server-count`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import grpc

from llmgrpc_server.transport import wire
from llmgrpc_server.transport.calls import Call
from llmgrpc_server.transport.connection import Connection

log = logging.getLogger(__name__)


class _CallDetails(NamedTuple):
    method: str
    invocation_metadata: wire.Metadata


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: one the kernel picks) that
    other processes may bind too (SO_REUSEPORT, Linux), as --api-server-count's
    front ends do; "" or "::" is every address, IPv4 included."""
    host = host.strip("[]") or "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with contextlib.suppress(AttributeError, OSError):  # not on every platform
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, port))
    return sock


class Server(grpc.aio.Server):
    def __init__(
        self,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        *,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_concurrent_streams: int = 2**31 - 1,
        max_header_list_size: int = 16 * 1024,
        keepalive_time: float = 60.0,
        keepalive_timeout: float = 20.0,
    ) -> None:
        self.interceptors = list(interceptors)
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.max_header_list_size = max_header_list_size
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[Connection] = set()
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._sockets: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._listeners: list[asyncio.Server] = []
        self._stopping = False
        self._stopped = asyncio.Event()

    # --- what servicers register -----------------------------------------------------
    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in method_handlers.items():
            self._methods[f"/{service_name}/{name}"] = handler

    def _lookup(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._methods.get(details.method)
        if handler is not None:
            return handler
        for generic in self._generic:
            if (handler := generic.service(details)) is not None:
                return handler
        return None

    async def _resolve(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The handler for a call, through the interceptors in order."""

        def continuation(i: int) -> Callable[[grpc.HandlerCallDetails], Awaitable[Any]]:
            async def next_(d: grpc.HandlerCallDetails) -> Any:
                if i == len(self.interceptors):
                    return self._lookup(d)
                return await self.interceptors[i].intercept_service(continuation(i + 1), d)

            return next_

        return await continuation(0)(details)

    async def dispatch(self, call: Call, method: str, metadata: wire.Metadata,
                       deadline: float | None, peer: str) -> None:  # fmt: skip
        """Find the call's handler and run it; a call nobody serves ends here."""
        try:
            handler = None
            if not self._stopping:
                handler = await self._resolve(_CallDetails(method, metadata))  # type: ignore[arg-type]
        except asyncio.CancelledError:
            call.conn.reset(call.stream_id)
            call.conn.call_ended(call)
            return
        if handler is None:
            if self._stopping:
                call.send_status(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            else:
                call.send_status(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")  # grpc's
            call.conn.call_ended(call)
            return
        await call.run(handler, metadata, deadline, peer)

    # --- ports and lifecycle -------------------------------------------------------------
    def _bind(self, address: str, tls: ssl.SSLContext | None) -> int:
        host, _, port = address.rpartition(":")
        sock = shared_port_socket(host, int(port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sockets.append((sock, tls))
        return int(sock.getsockname()[1])

    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, None)

    def add_secure_port(self, address: str, server_credentials: Any) -> int:
        if not isinstance(server_credentials, ssl.SSLContext):
            raise TypeError("the batched transport takes an ssl.SSLContext (config.ssl_context())")
        server_credentials.set_alpn_protocols(["h2"])
        return self._bind(address, server_credentials)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, tls in self._sockets:
            sock.listen(1024)
            self._listeners.append(
                await loop.create_server(lambda: Connection(self), sock=sock, ssl=tls)
            )

    async def stop(self, grace: float | None) -> None:
        """GOAWAY to every client: calls in flight get `grace` seconds, then are cut."""
        self._stopping = True
        for listener in self._listeners:
            listener.close()
        for conn in list(self.connections):
            conn.go_away()
        running = [c.task for conn in self.connections for c in conn.calls.values() if c.task]
        if grace and running:
            await asyncio.wait(running, timeout=grace)
        for conn in list(self.connections):
            for call in list(conn.calls.values()):
                call.cancel()
            conn.close()
        self._stopped.set()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True
