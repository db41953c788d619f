"""A real gRPC server around the fake engine, for the fast servicer tests."""

from __future__ import annotations

from dataclasses import dataclass

from llmgrpc_server import server
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.metrics import GrpcMetrics
from prometheus_client import CollectorRegistry

from tests.fakes import FakeEngine


@dataclass
class FakeServer:
    running: server.RunningServer
    engine: FakeEngine
    registry: CollectorRegistry
    target: str

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


# Ports this session's fake servers have had. grpc shares connections
# (subchannels) between channels to the same address, so a client of a new
# server on a reused port inherits a stale "Connection refused" from a channel
# still open to the old one (an UNAVAILABLE seen ~1 run in 15 before this).
_used_ports: set[int] = set()


async def start_fake(config: ServerConfig | None = None, attach: bool = True,
                     engine: FakeEngine | None = None) -> FakeServer:  # fmt: skip
    config = config or ServerConfig(host="127.0.0.1", port=0, metrics_port=-1)
    while True:
        registry = CollectorRegistry()
        running = await server.start(config, "fake", GrpcMetrics(registry), registry)
        if config.port != 0 or running.port not in _used_ports:
            break
        await running.server.stop(grace=0)  # the kernel handed out an old port: another
    _used_ports.add(running.port)
    engine = engine or FakeEngine()
    if attach:
        running.servicer.attach(engine)
        await running.health.set("llmgrpc.v1.LLMService", server.SERVING)
    return FakeServer(running, engine, registry, f"127.0.0.1:{running.port}")
