"""A free TCP port on loopback, for a process that must be told its port
before it binds it (Prometheus, vLLM's --master-port, nginx). The port may be
taken again before it is used: a race these tests accept."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
