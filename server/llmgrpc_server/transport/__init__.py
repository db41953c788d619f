"""llmgrpc's own gRPC server transport (`--transport batched`): HTTP/2 by h2,
each connection's bytes written once per event-loop turn. See server.py."""
