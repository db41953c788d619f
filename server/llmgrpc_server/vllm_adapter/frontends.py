"""`--api-server-count N`: N gRPC front ends on one port over one engine core.

vLLM's own multi-API-server mode (`vllm serve --api-server-count N`), with our
front end: this process, the manager, binds the engine's ZMQ listeners for N
clients and starts the engine core; then it spawns N front-end processes, each
the whole llmgrpc server (servicer, admission, health, tracing) with an
AsyncLLM client on its own slot. They listen on one port with SO_REUSEPORT:
the kernel spreads *connections* (not calls) over them, so one channel stays
on one front end. The manager serves /metrics from prometheus_client's
multiprocess directory, one view of every front end (counters and histograms
add up; llmgrpc_active_streams is the live sum; vLLM's gauges keep their own
multiprocess modes, as in `vllm serve`).

Lifecycle, as with one process (server.py): every front end answers health
from the start and turns SERVING once its client is connected; SIGTERM/SIGINT
to the manager is passed on, each front end drains, then the engine stops and
the manager exits 0. If the engine dies every front end turns NOT_SERVING,
fails its calls with UNAVAILABLE and exits 1; the manager then stops the
rest and exits 1. A front end that dies alone takes the server down with it
(exit 1): a restart is the one recovery a supervisor understands.

Not with it: the AdminService (an adapter loaded through one front end would
be unknown to the others; vLLM refuses runtime LoRA updates with more than one
API server too), and multi-node or data-parallel engines (untested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import select
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from llmgrpc_server.config import ServerConfig
from llmgrpc_server.transport.server import shared_port_socket

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED, EXIT_STOPPED_LOADING = 0, 1, 3


@dataclass
class Slot:
    """What a front-end process needs to join the engine as client `index` of `count`."""

    index: int
    count: int
    client_config: dict[str, Any]  # vLLM's client addresses (and the listeners to adopt)
    engine_pids: tuple[int, ...]  # the engine core processes (the manager's children)

    def connect(self, engine_args: Any) -> Any:
        """The AsyncLLM client on this slot (blocks until the engine is up; the
        engine's ready message gives it the KV cache's size, as in one process)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args._api_process_count = self.count
        engine_args._api_process_rank = self.index
        vllm_config = engine_args.create_engine_config()
        llm = AsyncLLM.from_vllm_config(
            vllm_config,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
            client_addresses=dict(self.client_config),
            client_count=self.count,
            client_index=self.index,
        )
        self._watch_engine(llm)
        return llm

    def _watch_engine(self, llm: Any) -> None:
        """What vLLM's client does for an engine it started itself
        (MPClient.start_engine_core_monitor), for the manager's engine: once
        an engine core process exits, the client is marked dead and shut down,
        so every request in flight fails with EngineDeadError (UNAVAILABLE)
        and the server exits 1 (server.py)."""
        fds = [os.pidfd_open(pid) for pid in self.engine_pids]

        def monitor() -> None:
            select.select(fds, [], [])
            core = llm.engine_core
            if core.resources.engine_dead:
                return  # shut down already
            log.error("the engine core exited")
            core.resources.engine_dead = True
            core.shutdown()

        threading.Thread(target=monitor, name="EngineMonitor", daemon=True).start()


def check(config: ServerConfig, engine_args: Any, count: int) -> None:
    """What N front ends cannot do: a ValueError naming the flags."""
    if count < 1:
        raise ValueError(f"--api-server-count must be >= 1, got {count}")
    if count == 1:
        return
    if config.admin_tokens:
        raise ValueError("--admin-token-file (the AdminService) needs --api-server-count 1: "
                         "an adapter loaded through one front end would be unknown to the others")
    if (getattr(engine_args, "nnodes", 1) or 1) > 1 or (engine_args.data_parallel_size or 1) > 1:
        raise ValueError("--api-server-count > 1 is not supported with --nnodes or "
                         "--data-parallel-size > 1")  # fmt: skip


def run(config: ServerConfig, engine_args: Any, count: int) -> int:
    """The manager: engine, front ends, /metrics; returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="llmgrpc-metrics-")
    # Read by prometheus_client when the front ends import it (spawned: fresh
    # interpreters with this environment).
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    _raise_on_signals()
    reservation = None
    procs: list[multiprocessing.process.BaseProcess] = []
    engine_manager, listeners, up = None, None, False
    try:
        reservation, port = _reserve_port(config)
        front = dataclasses.replace(config, port=port, metrics_port=-1)
        engine_manager, listeners = _launch(front, engine_args, count, procs)
        up = True
        log.info("%d front ends on port %d", count, port)
        http = _serve_metrics(config, metrics_dir)
        if http is not None:
            log.info("metrics listening on port %d (/metrics)", http.server_port)
        return _supervise(procs, metrics_dir)
    except SystemExit:  # SIGTERM/SIGINT
        if not up:
            log.warning("stopped while starting")
            return EXIT_STOPPED_LOADING
        log.info("stopping: the front ends drain")
        _stop(procs, config.drain_timeout)
        return EXIT_OK if all(p.exitcode == 0 for p in procs) else EXIT_FAILED
    finally:
        _stop(procs, config.drain_timeout)
        if engine_manager is not None:
            engine_manager.shutdown(timeout=10)
        if listeners is not None:
            listeners.cleanup()  # the ipc paths
        if reservation is not None:
            reservation.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("stopped")


def _raise_on_signals() -> None:
    """The first SIGTERM/SIGINT interrupts whatever the manager waits for
    (SystemExit); later ones are ignored while the front ends drain."""
    signalled: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not signalled:
            signalled.append(signum)
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _reserve_port(config: ServerConfig) -> tuple[socket.socket | None, int]:
    """The port every front end binds. Port 0: one picked now and held by a
    bound, non-listening SO_REUSEPORT socket (it takes no connections)."""
    if config.port != 0:
        return None, config.port
    sock = shared_port_socket(config.host, 0)
    return sock, int(sock.getsockname()[1])


def _launch(config: ServerConfig, engine_args: Any, count: int,
            procs: list[multiprocessing.process.BaseProcess]) -> tuple[Any, Any]:  # fmt: skip
    """The engine core and the front ends (into `procs` as they start, so that a
    signal meanwhile stops those already running); returns the engine's manager
    and the ZMQ listeners. The caller holds the listeners until the engine stops:
    vLLM's EngineZmqListeners unlinks its ipc paths when collected, and an engine
    socket that has not connected yet (the output side connects after the
    handshake) could then never reach its front end: every call would hang."""
    from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
    from vllm.v1.executor import Executor

    engine_args._api_process_count = count
    engine_args._api_process_rank = -1
    vllm_config = engine_args.create_engine_config()
    listeners = bind_engine_zmq_listeners(vllm_config, count)
    spawn = multiprocessing.get_context("spawn")
    with launch_core_engines(vllm_config, Executor.get_class(vllm_config),
                             not engine_args.disable_log_stats, listeners.addresses) as launch:
        assert launch.engine_manager is not None  # local engines only (check())
        engine_pids = tuple(p.pid for p in launch.engine_manager.processes)
        for i, (inp, out) in enumerate(zip(listeners.inputs, listeners.outputs, strict=True)):
            client = {"input_address": inp.address, "output_address": out.address,
                      "input_listener": inp.socket, "output_listener": out.socket}  # fmt: skip
            if launch.coordinator is not None:
                client["stats_update_address"] = launch.coordinator.get_stats_publish_address()
            slot = Slot(i, count, client, engine_pids)
            proc = spawn.Process(target=_front_end, name=f"llmgrpc-frontend-{i}",
                                 args=(dataclasses.replace(config, frontend_index=i),
                                       engine_args, slot))  # fmt: skip
            proc.start()
            procs.append(proc)
            inp.close()
            out.close()
        launch.watched_frontend_processes = procs
        engine_manager = launch.engine_manager
    # The engine is up: launch_core_engines waited for its handshake.
    return engine_manager, listeners


def _front_end(config: ServerConfig, engine_args: Any, slot: Slot) -> None:
    """A front-end process: the one-process server on its slot."""
    import uvloop

    from llmgrpc_server import main

    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s frontend-{slot.index} %(name)s: %(message)s",
    )  # fmt: skip
    # A terminal's Ctrl-C reaches the whole group: the manager passes it on as SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(uvloop.run(main.run(config, engine_args, slot=slot)))


def _serve_metrics(config: ServerConfig, metrics_dir: str) -> Any:
    if config.metrics_port < 0:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from llmgrpc_server.metrics_http import start_metrics_server

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    return start_metrics_server(config.metrics_port, config.host.strip("[]") or "::", registry)


def _supervise(procs: list[multiprocessing.process.BaseProcess], metrics_dir: str) -> int:
    """Wait until a front end exits (the engine died, or one crashed) or a
    signal comes (SystemExit from the handler: the caller stops them)."""
    ended = wait([p.sentinel for p in procs])
    dead = next(p for p in procs if p.sentinel in ended)
    dead.join()
    _mark_dead(dead, metrics_dir)
    log.error("front end %s exited (%s): stopping the server", dead.name, dead.exitcode)
    return EXIT_FAILED


def _mark_dead(proc: multiprocessing.process.BaseProcess, metrics_dir: str) -> None:
    from prometheus_client import multiprocess

    if proc.pid is not None:
        multiprocess.mark_process_dead(proc.pid, metrics_dir)


def _stop(procs: list[multiprocessing.process.BaseProcess], drain_timeout: float) -> None:
    """SIGTERM to the front ends still running (each drains), then wait."""
    for proc in procs:
        if proc.exitcode is None and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join(drain_timeout + 15)
        if proc.exitcode is None:
            log.error("front end %s did not stop: killing it", proc.name)
            proc.kill()
            proc.join(5)
