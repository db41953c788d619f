"""Client options of the keepalive tests (tests/unit/test_keepalive.py with a
fake engine, tests/integration/test_keepalive.py with the real one)."""

# A client that pings every second, with or without calls, without limit.
PINGING = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Separate connections per client: a ping-killed connection must not be shared.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
