"""What a handler asks of its call: the part of `grpc.aio.ServicerContext`
that llmgrpc's servicers and interceptors, grpc's health servicer and its
reflection servicer use. The call itself (transport/calls.py) does the I/O."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from llmgrpc_server.transport.wire import Metadata


class Context:
    def __init__(
        self,
        metadata: Metadata,
        deadline: float | None,
        peer: str,
        send_initial_metadata: Callable[[Sequence[tuple[str, str | bytes]]], None],
        write: Callable[[Any], Awaitable[None]],
    ) -> None:
        self._metadata = metadata
        self._deadline = deadline  # time.monotonic() at which the call expires
        self._peer = peer
        self._send_initial_metadata = send_initial_metadata
        self._write = write
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()

    # --- what the call was given ---------------------------------------------------
    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return self._peer

    # --- what the handler sends -------------------------------------------------
    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._send_initial_metadata(metadata)

    async def write(self, message: Any) -> None:
        await self._write(message)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:  # fmt: skip
        """End the call with `code`: raises, as grpc's does."""
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a code other than OK")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)
