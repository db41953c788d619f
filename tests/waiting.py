"""Wait for a condition in tests: poll it until true or a timeout, never sleep blindly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def poll(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.2) -> bool:
    """True as soon as `predicate()` is; its last value once `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


async def eventually(
    predicate: Callable[[], bool], timeout: float = 60.0, interval: float = 0.1
) -> bool:
    """`poll` for asyncio tests: the (blocking) predicate runs in a thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(interval)
    return await asyncio.to_thread(predicate)
