"""The batched transport's cost to queue one stream message, h2's send_data
against the hand-written DATA frame of `Connection.send_data`.

    .venv/bin/python scripts/microbench_transport.py [--messages 200000] [--rounds 5]

No sockets and no client: one server connection after its handshake with an
h2 client that opened its windows wide, one open stream, a 40-byte message
(about one streamed token) framed and queued again and again; the queued
bytes are taken every 64 messages, as a loop turn would. Prints µs per
message for each path, per round (docs/benchmarks.md cites it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import types
from typing import Any

import h2.config
import h2.connection
import h2.settings
from llmgrpc_server.transport import wire
from llmgrpc_server.transport.connection import Connection

MESSAGE = b"x" * 40
WIDE = 2**31 - 1


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1)

    def close(self) -> None:
        pass


def _connection() -> Connection:
    server = types.SimpleNamespace(max_concurrent_streams=100, max_header_list_size=16384,
                                   connections=set(), keepalive_time=0)  # fmt: skip
    conn = Connection(server)  # type: ignore[arg-type]
    conn.connection_made(_Transport())
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WIDE})
    client.increment_flow_control_window(WIDE - 65_535)
    client.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"),
                            (":authority", "a"), ("content-type", "application/grpc")])  # fmt: skip
    conn.h2.receive_data(client.data_to_send())
    conn.h2.send_headers(1, wire.RESPONSE_HEADERS)
    conn.h2.data_to_send()
    return conn


def _h2_path(conn: Connection, data: memoryview) -> None:
    room = min(len(data), conn.h2.local_flow_control_window(1), conn.h2.max_outbound_frame_size)
    conn.h2.send_data(1, data[:room])


def _hand_path(conn: Connection, data: memoryview) -> None:
    conn.send_data(1, data)


async def _round(send: Any, messages: int) -> float:
    conn = _connection()
    started = time.perf_counter()
    for i in range(messages):
        send(conn, memoryview(wire.frame_message(MESSAGE)))
        if i % 64 == 63:
            conn.h2.data_to_send()
    return (time.perf_counter() - started) / messages * 1e6


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    paths = {"h2 send_data": _h2_path, "hand-written DATA frame": _hand_path}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):  # interleaved: a drift in the machine hits both
        for name, send in paths.items():
            times[name].append(await _round(send, args.messages))
    for name, rounds in times.items():
        print(f"{name}: median {statistics.median(rounds):.2f} us/message; rounds "
              + ", ".join(f"{t:.2f}" for t in rounds))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
