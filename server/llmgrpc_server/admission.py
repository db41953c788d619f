"""Admission control: refuse work beyond a bound instead of queueing it forever."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from llmgrpc_server.errors import Overloaded, Unavailable


class Admission:
    """At most `max_in_flight` generation requests at once; the rest get
    RESOURCE_EXHAUSTED with a retry hint, at once (no hidden queue)."""

    def __init__(self, max_in_flight: int, retry_after: float = 1.0) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """Refuse new requests from now on (UNAVAILABLE: go to another replica)."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(
                f"server is at its limit of {self.max_in_flight} requests in flight; "
                "retry later or on another replica",
                retry_after=self.retry_after,
            )
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()


def transport_streams(per_connection: int) -> int:
    """The HTTP/2 MAX_CONCURRENT_STREAMS to advertise: room to refuse the excess clearly."""
    return 2 * per_connection


class ConnectionLimit:
    """At most `per_connection` service calls at once from one client connection.

    gRPC core enforces the same bound as HTTP/2 MAX_CONCURRENT_STREAMS, but
    a client then queues the excess silently (or, racing a closing stream,
    gets UNAVAILABLE "Stream removed"). So the server advertises a higher
    transport bound (`transport_streams`) and refuses the excess here, with a
    status that names the limit. A connection is a peer address; health and
    reflection calls are not counted.
    """

    def __init__(self, per_connection: int, retry_after: float = 1.0) -> None:
        if per_connection < 1:
            raise ValueError("per_connection must be >= 1")
        self.per_connection = per_connection
        self.retry_after = retry_after
        self._open: Counter[str] = Counter()

    @contextmanager
    def hold(self, peer: str) -> Iterator[None]:
        if self._open[peer] >= self.per_connection:
            raise Overloaded(
                f"this connection already has {self.per_connection} calls in flight, the "
                "server's --max-concurrent-streams; wait for one to end or open another "
                "connection",
                retry_after=self.retry_after,
            )
        self._open[peer] += 1
        try:
            yield
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]
