"""The client side of the deadline-in-the-engine-queue test, run as its own process.

    python -m tests.queued_deadline_client TARGET HOLDERS HOLDER_TOKENS LATE LATE_PROMPT_TOKENS DEADLINE_S

Starts HOLDERS streams of HOLDER_TOKENS tokens on a slow-reader channel (they
fill the engine's queue and are not read), then LATE unary `Generate` calls
with LATE_PROMPT_TOKENS-token prompts and a DEADLINE_S deadline on a channel
of their own. The test owns every number. Prints one JSON line, the late calls'
status codes, then keeps the holders until stdin closes and exits.

Why a process of its own: in the pytest process, after the earlier
integration tests, grpc's client core now and then stalled for up to two
minutes (no reads, no ping acks, no deadline timers; the server accepted the
connection at once when the client finally opened it), as in grpc/grpc#39113,
which tests/conftest.py now mitigates for the whole suite. This test is the
most sensitive to it (an 8 s deadline against a 12 s queue), so its client
also starts fresh. A fresh process is what the test means anyway: one client
whose calls wait in the server's queue.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
from llmgrpc import AsyncClient

from tests.server_process import SLOW_READER, start_stream


async def main(target: str, holders: int, holder_tokens: int, late: int, late_prompt_tokens: int,
               deadline: float) -> None:  # fmt: skip
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection apart from the holders'
    async with AsyncClient(target, options=SLOW_READER) as holder, \
            AsyncClient(target, options=own) as client:  # fmt: skip
        calls = [start_stream(holder, holder_tokens, timeout=300.0) for _ in range(holders)]
        await asyncio.sleep(0.3)  # sent: the server admits them in this order

        async def late_call() -> str:
            try:
                await client.generate(prompt_token_ids=[7] * late_prompt_tokens, max_tokens=8,
                                      timeout=deadline)  # fmt: skip
            except grpc.aio.AioRpcError as e:
                return str(e.code().name)
            return "OK"

        codes = await asyncio.gather(*(late_call() for _ in range(late)))
        print(json.dumps({"late": codes}), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the test closes stdin
        for call in calls:
            call.cancel()


if __name__ == "__main__":
    target, *counts, deadline = sys.argv[1:7]
    asyncio.run(main(target, *map(int, counts), float(deadline)))
