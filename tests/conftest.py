"""Settings for the whole suite, applied before anything imports grpc.

GRPC_EXPERIMENTS=-event_engine_client: grpcio's Python build does not run
EventEngine's own poller, and its EventEngine client endpoints can then go
unpolled: a client process stops reading, acking pings and firing deadline
timers for seconds to minutes, until some timer wakes it (grpc/grpc#39113,
#38290; the mitigation given there is this setting). Seen in this suite's
pytest process after many channels to several servers: calls opened 27 s
late, a ping ack withheld until the server's 60 s ping timeout, deadlines
reported two minutes late (docs/reliability.md). The servers inherit it and
make no client channels. A user's own environment value wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")
