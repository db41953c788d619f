"""Admission control: refuse work beyond a bound instead of queueing it forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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
