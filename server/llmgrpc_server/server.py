"""The server's lifecycle: start, load the engine, serve, drain, stop.

1. The gRPC port opens first: health "" is SERVING (the process is up) and
   "llmgrpc.v1.LLMService" NOT_SERVING while the model loads.
2. The engine loads; the service turns SERVING. A SIGTERM/SIGINT meanwhile
   ends the load: the port closes and `serve` returns EXIT_STOPPED_LOADING
   (main.py then ends the engine's processes and exits at once). A load that
   fails closes the port and raises its error.
3. On SIGTERM/SIGINT the service turns NOT_SERVING at once and new
   generation calls get UNAVAILABLE, while health checks keep answering; calls
   in flight get up to `drain_timeout` seconds to finish; then the server
   stops, the engine shuts down, and the process exits 0.
4. If the engine dies, both health services turn NOT_SERVING, in-flight
   calls end with UNAVAILABLE and the process exits 1 so it is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from llmgrpc.v1 import admin_service_pb2
from llmgrpc.v1 import admin_service_pb2_grpc as admin_grpc
from llmgrpc.v1 import llm_service_pb2_grpc as pb_grpc
from prometheus_client import REGISTRY, CollectorRegistry

from llmgrpc_server import model_facts
from llmgrpc_server.admin import AdminServicer
from llmgrpc_server.admission import Admission, ConnectionLimit, transport_streams
from llmgrpc_server.auth import TokenAuthInterceptor
from llmgrpc_server.config import ServerConfig
from llmgrpc_server.engine_api import Engine
from llmgrpc_server.interceptors import ServiceInterceptor
from llmgrpc_server.metrics import GrpcMetrics, ServiceMetrics
from llmgrpc_server.servicer import SERVICE_NAME, LLMServicer

if TYPE_CHECKING:  # imported only with tracing on (main.py)
    from llmgrpc_server.tracing import Tracing

log = logging.getLogger(__name__)

EngineFactory = Callable[[], Awaitable[Engine]]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ENGINE_WATCH_INTERVAL = 0.5
EXIT_ENGINE_DIED = 1
EXIT_STOPPED_LOADING = 3


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Above --max-concurrent-streams, so the service can refuse the excess
        # with a clear status instead of the client queueing it (admission.py).
        ("grpc.max_concurrent_streams", transport_streams(config.max_concurrent_streams)),
        # Long unary calls stay alive under client keepalive pings: accept a
        # ping every 10 s, never count "too many pings" strikes.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def _server(
    config: ServerConfig, interceptors: list[grpc.aio.ServerInterceptor]
) -> grpc.aio.Server:
    """grpcio's server, or llmgrpc's own transport (--transport batched) with
    the same limits and keepalive policy."""
    if config.transport != "batched":
        return grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
    from llmgrpc_server.transport.server import Server

    # Pings from clients are always welcome (grpc_options: no strikes).
    options = dict(grpc_options(config))
    return Server(
        interceptors,
        max_message_bytes=config.max_message_bytes,
        max_concurrent_streams=transport_streams(config.max_concurrent_streams),
        keepalive_time=options.get("grpc.keepalive_time_ms", 60_000) / 1000,
        keepalive_timeout=options.get("grpc.keepalive_timeout_ms", 20_000) / 1000,
    )


@dataclass
class RunningServer:
    """A started server; `port` is the one actually bound (useful with port 0)."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: LLMServicer
    metrics: ServiceMetrics


async def start(
    config: ServerConfig,
    model_name: str,
    grpc_metrics: GrpcMetrics,
    registry: CollectorRegistry = REGISTRY,
    tracing: Tracing | None = None,
) -> RunningServer:
    metrics = ServiceMetrics(model_name, registry, config.frontend_index)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if config.auth_tokens or config.admin_tokens:
        interceptors.append(TokenAuthInterceptor(config.auth_tokens, config.admin_tokens))
    interceptors.append(
        ServiceInterceptor(
            grpc_metrics,
            metrics,
            ConnectionLimit(config.max_concurrent_streams),
            frozenset({SERVICE_NAME}),
            tracing,
        )
    )
    server = _server(config, interceptors)
    health_servicer = health.aio.HealthServicer()
    servicer = LLMServicer(
        Admission(config.max_in_flight),
        metrics,
        config.service_version,
    )
    pb_grpc.add_LLMServiceServicer_to_server(servicer, server)
    if config.admin_tokens:  # otherwise its calls are UNIMPLEMENTED
        admin_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(servicer, config.adapter_dir), server
        )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    admin = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            *((admin,) if config.admin_tokens else ()),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{config.host}:{config.port}"
    credentials = (config.ssl_context() if config.transport == "batched"
                   else config.server_credentials())  # fmt: skip
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    await health_servicer.set("", SERVING)
    await health_servicer.set(SERVICE_NAME, NOT_SERVING)
    log.info("gRPC listening on port %d (%s)", port, "TLS" if credentials else "plaintext")
    return RunningServer(server, port, health_servicer, servicer, metrics)


async def serve(
    config: ServerConfig,
    model_name: str,
    engine_factory: EngineFactory,
    grpc_metrics: GrpcMetrics,
    *,
    stop: asyncio.Event | None = None,
    on_started: Callable[[RunningServer], None] | None = None,
    registry: CollectorRegistry = REGISTRY,
    tracing: Tracing | None = None,
) -> int:
    """Run until `stop` is set (or a signal arrives); return the exit code.

    The caller shuts `tracing` down once this returns (the server has stopped).
    """
    stop = stop or _stop_on_signals()
    running = await start(config, model_name, grpc_metrics, registry, tracing)
    if on_started is not None:
        on_started(running)
    try:
        engine = await _load(engine_factory, stop)
    except Exception:
        # Closed here, the port leaves no grpc noise after the error's trace.
        await running.server.stop(grace=0)
        raise
    if engine is None:
        log.warning("stopped while the model was loading")
        await running.server.stop(grace=0)
        return EXIT_STOPPED_LOADING
    running.servicer.attach(engine)
    running.metrics.set_model_info(model_facts.info_metric_labels(engine.model_info()))
    with _frozen_startup_heap(), _quiet_ended_call_writes():
        await running.health.set(SERVICE_NAME, SERVING)
        log.info("serving %s", model_name)
        if await _wait_for_stop_or_death(engine, stop):
            log.error("the engine died; failing in-flight calls and exiting for a restart")
            await running.health.set(SERVICE_NAME, NOT_SERVING)
            await running.health.set("", NOT_SERVING)
            await running.server.stop(grace=2)
            return EXIT_ENGINE_DIED
        return await drain(running, engine, config.drain_timeout)


async def drain(running: RunningServer, engine: Engine, timeout: float) -> int:
    log.info("draining: in-flight calls have %g s to finish", timeout)
    await running.health.set(SERVICE_NAME, NOT_SERVING)
    admission = running.servicer.admission
    admission.drain()
    if not await admission.wait_idle(timeout):
        log.warning("drain timeout: cancelling %d calls still in flight", admission.in_flight)
    # Short grace for responses already on their way (health Watch streams
    # and the like are cancelled). Cut calls get UNAVAILABLE.
    await running.server.stop(grace=1.0)
    await engine.shutdown()
    log.info("stopped")
    return 0


class _EndedCallWrites(logging.Filter):
    """grpc logs a streamed write to a call that has already ended (the client
    went away, its deadline passed, a drain timeout cut it) as ERROR with a
    traceback, "ExecuteBatchError raised in core by servicer method", whenever
    the write fails before the cancellation has reached the handler. Nothing
    is wrong on our side then: one DEBUG line of ours instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "ExecuteBatchError raised in core" not in record.getMessage():
            return True
        log.debug("write to an ended call dropped: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _quiet_ended_call_writes() -> Iterator[None]:
    grpc_log, quiet = logging.getLogger("grpc._cython.cygrpc"), _EndedCallWrites()
    grpc_log.addFilter(quiet)
    try:
        yield
    finally:
        grpc_log.removeFilter(quiet)


@contextlib.contextmanager
def _frozen_startup_heap() -> Iterator[None]:
    """Keep the garbage collector's full passes off what startup built.

    vLLM, torch, transformers and the tokenizer leave ~10^6 objects that live
    as long as the process. Left in the oldest generation, each full
    collection walks them all, and requests' garbage triggers one every few
    seconds under load: 0.4-0.9 s each on two cores, every stream paused
    (TTFT p99 ~0.6 s at 32 streams). Frozen, they are skipped, as vLLM's own
    OpenAI server does (`freeze_gc_heap`); unfrozen once the server has stopped.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _load(factory: EngineFactory, stop: asyncio.Event) -> Engine | None:
    load = asyncio.ensure_future(factory())
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if load in done:
        stopping.cancel()
        return load.result()
    load.cancel()
    return None


async def _wait_for_stop_or_death(engine: Engine, stop: asyncio.Event) -> bool:
    while not stop.is_set():
        if engine.is_dead:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ENGINE_WATCH_INTERVAL)
    return False


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
