"""Wait for a condition in tests: poll it until true or a timeout, never sleep blindly.

A check that fails to answer (a metrics scrape refused or timed out, a health
call that errors) counts as "not yet" until the timeout; the last check's
error, if it fails too, is what the test sees.
"""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import Callable

import grpc

NOT_YET = (OSError, http.client.HTTPException, grpc.RpcError)


def _check(predicate: Callable[[], bool]) -> bool:
    try:
        return predicate()
    except NOT_YET:
        return False


def poll(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2) -> bool:
    """True as soon as `predicate()` is; its last value once `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _check(predicate):
            return True
        time.sleep(interval)
    return predicate()


async def eventually(
    predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.1
) -> bool:
    """`poll` for asyncio tests: the (blocking) predicate runs in a thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(_check, predicate):
            return True
        await asyncio.sleep(interval)
    return await asyncio.to_thread(predicate)
