"""`llmgrpc-server`: parse flags once, wire the vLLM engine in, serve.

Every vLLM engine flag works (`AsyncEngineArgs.add_cli_args`); ours are in
the "llmgrpc server" group. With no `--model` the embedded default model is
built (offline, a few seconds) and served.

Exit codes: 0 drained after SIGTERM/SIGINT; 1 the engine died, or startup
failed (the error's trace is printed); 2 a bad flag (named);
3 (`server.EXIT_STOPPED_LOADING`) SIGTERM/SIGINT before the model was loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import uvloop

from llmgrpc_server import config as server_config
from llmgrpc_server import cpu_placement, domain, models

if TYPE_CHECKING:
    from llmgrpc_server.tracing import Tracing
    from llmgrpc_server.vllm_adapter.frontends import Slot

log = logging.getLogger("llmgrpc_server")
PROC = Path("/proc")

def parse(argv: list[str] | None) -> tuple[server_config.ServerConfig, Any]:
    from llmgrpc_server.vllm_adapter import settings as vllm_settings

    parser = vllm_settings.make_parser(
        prog="llmgrpc-server", description="Serve a language model over gRPC with vLLM."
    )
    server_config.add_cli_args(parser)
    vllm_settings.add_engine_cli_args(parser)
    parser.set_defaults(model=models.DEFAULT_MODEL)
    ns = parser.parse_args(argv)
    config = server_config.from_namespace(ns)
    if ns.lora_modules:
        config = _with_lora_modules(config, ns)
    if ns.model in models.EMBEDDED:
        name = ns.model
        ns.model = models.resolve(name, config.models_dir)
        if not ns.served_model_name:
            ns.served_model_name = [name]
        _embedded_defaults(ns)
        vllm_settings.prefer_compact_json(ns)
    else:
        _check_local_model(ns.model)
    vllm_settings.use_working_compile_cache()
    engine_args = vllm_settings.engine_args_from_cli(ns)
    if config.api_server_count != 1:
        from llmgrpc_server.vllm_adapter import frontends

        frontends.check(config, engine_args, config.api_server_count)
    return config, engine_args


def _with_lora_modules(config: server_config.ServerConfig, ns: Any) -> server_config.ServerConfig:
    """--lora-modules, built-in adapter names resolved (and built); LoRA on."""
    from llmgrpc_server.adapters import parse_lora_modules
    from llmgrpc_server.models.adapters import ADAPTERS

    modules = []
    for name, given in parse_lora_modules(ns.lora_modules):
        path = given
        if given in ADAPTERS:
            path = str(models.resolve_adapter(given, config.models_dir))
        elif not Path(given).is_dir():
            raise ValueError(f"--lora-modules {name}={given}: no such directory")
        modules.append((name, path))
    ns.enable_lora = True
    return dataclasses.replace(config, lora_modules=tuple(modules))


def _embedded_defaults(ns: Any) -> None:
    """An embedded model's context and KV cache, unless the flags set them.

    vLLM's own KV default on the CPU backend (a fraction of all memory) fails
    on small machines; the cache is sized from the model's own bytes per token
    instead (`llmgrpc.capacity.embedded_kv_cache_bytes`, what `llmgrpc plan`
    predicts), in the dtype the engine will use.
    """
    from llmgrpc import capacity

    hf_config = json.loads((Path(ns.model) / "config.json").read_text())
    if ns.max_model_len is None:
        ns.max_model_len = capacity.EMBEDDED_CONTEXT_LEN
    if ns.kv_cache_memory_bytes is None:
        config_dtype = hf_config.get("dtype") or hf_config.get("torch_dtype", "bfloat16")
        dtype = ns.dtype if ns.dtype != "auto" else config_dtype
        kv_dtype = ns.kv_cache_dtype if ns.kv_cache_dtype != "auto" else dtype
        facts = capacity.facts_from_config(hf_config)
        ns.kv_cache_memory_bytes = capacity.embedded_kv_cache_bytes(
            facts, ns.max_model_len, kv_dtype
        )


def _check_local_model(model: str) -> None:
    """A --model written as a path must exist: vLLM would take a missing one
    for a hub id and fail with "Repo id must be in the form ...", or go online."""
    if model.startswith(("/", "./", "../")) and not Path(model).exists():
        raise ValueError(f"--model {model}: no such file or directory")


def builtin_adapter_names() -> frozenset[str]:
    from llmgrpc_server.models.adapters import ADAPTERS

    return frozenset(ADAPTERS)


def served_name(engine_args: Any) -> str:
    return domain.served_names(engine_args.served_model_name, str(engine_args.model))[0]


async def run(
    config: server_config.ServerConfig, engine_args: Any, slot: Slot | None = None
) -> int:
    """The server in this process; with `slot`, one of --api-server-count's
    front ends (vllm_adapter/frontends.py), whose manager serves /metrics."""
    from llmgrpc_server import server
    from llmgrpc_server.metrics import GrpcMetrics

    if config.metrics_port >= 0:
        from prometheus_client import disable_created_metrics

        from llmgrpc_server.metrics_http import start_metrics_server

        # `_created` series double the scrape size and no dashboard reads them.
        disable_created_metrics()
        http = start_metrics_server(config.metrics_port, config.host.strip("[]") or "::")
        log.info("metrics listening on port %d (/metrics)", http.server_port)
    tracing = _tracing(config, engine_args)
    code = await server.serve(
        config,
        served_name(engine_args),
        lambda: start_engine(config, engine_args, slot),
        GrpcMetrics(),
        tracing=tracing,
    )
    if tracing is not None:  # the server has stopped: export what is left
        await tracing.shutdown()
    if code == server.EXIT_STOPPED_LOADING:
        _abandon_load(code)
    return code


async def start_engine(
    config: server_config.ServerConfig, engine_args: Any, slot: Slot | None = None
) -> Any:
    """The engine adapter as the server configures it (scripts/ use it too)."""
    from llmgrpc_server.vllm_adapter.engine import VllmEngine

    return await VllmEngine.start(
        engine_args,
        max_prompt_tokens=config.max_prompt_tokens,
        max_tokens=config.max_tokens_limit,
        max_tokens_per_message=config.max_tokens_per_message,
        coalesce_budget_s=config.coalesce_budget_ms / 1000,
        pin_front_end=config.pin_front_end,
        slot=slot,
        size_caps=config.size_caps(),
        lora_modules=config.lora_modules,
        known_adapters=builtin_adapter_names(),
    )


def _tracing(config: server_config.ServerConfig, engine_args: Any) -> Tracing | None:
    """Our spans (tracing.py), with vLLM's --otlp-traces-endpoint only: its
    spans and ours go to the same collector."""
    endpoint = engine_args.otlp_traces_endpoint
    if not endpoint:
        return None
    from llmgrpc_server.tracing import Tracing

    log.info("exporting traces to %s", endpoint)
    return Tracing.to(endpoint, config.service_version, served_name(engine_args))


def _abandon_load(code: int) -> NoReturn:
    """Exit now, leaving no engine process behind.

    The model loads in a thread that nothing can interrupt, and leaving the
    event loop would wait for it (a large model loads for half an hour): the
    engine's processes are ended and the process exits without the thread.
    """
    stuck = end_child_processes()
    if stuck:
        log.error("engine processes %s did not end (stuck in the kernel?)", stuck)
    log.info("exiting (%d) without waiting for the model load", code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Between SIGTERM and SIGKILL: the engine's processes may clean up their
# shared memory; a worker blocked in a read of the weights never answers.
CHILD_STOP_GRACE = 5.0
CHILD_KILL_WAIT = 5.0


def end_child_processes(grace: float = CHILD_STOP_GRACE,
                        kill_wait: float = CHILD_KILL_WAIT) -> list[int]:  # fmt: skip
    """SIGTERM every process below this one, SIGKILL those left after `grace`
    seconds; returns any still alive `kill_wait` seconds later.

    Each process gets each signal once, including processes that appear
    meanwhile (a child the load thread was starting).
    """
    started = time.monotonic()
    sent: dict[signal.Signals, set[int]] = {signal.SIGTERM: set(), signal.SIGKILL: set()}
    while living := _living_descendants():
        elapsed = time.monotonic() - started
        if elapsed > grace + kill_wait:
            return living
        sig = signal.SIGKILL if elapsed > grace else signal.SIGTERM
        for pid in set(living) - sent[sig]:
            log.info("%s to %d (%s)", sig.name, pid, _name(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            sent[sig].add(pid)
        time.sleep(0.05)
    log.info("the engine's processes have ended (%d)", len(sent[signal.SIGTERM]))
    return []


def _name(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "ended"


def _living_descendants() -> list[int]:
    """Processes below this one, but not zombies, nor Python's multiprocessing
    resource tracker: it ignores SIGTERM by design and ends after us, unlinking
    the shared memory the engine's processes leave."""
    living = []
    for pid in cpu_placement.descendants(os.getpid()):
        try:
            state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (PROC / str(pid) / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if state != "Z" and b"multiprocessing.resource_tracker" not in cmdline:
            living.append(pid)
    return living


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config, engine_args = parse(argv)
    except ValueError as e:
        print(f"llmgrpc-server: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    # uvloop is a dependency (vLLM imports it too): no fallback that could
    # take an ImportError from startup for a missing uvloop and run it again.
    if config.api_server_count > 1:
        from llmgrpc_server.vllm_adapter import frontends

        raise SystemExit(frontends.run(config, engine_args, config.api_server_count))
    raise SystemExit(uvloop.run(run(config, engine_args)))


if __name__ == "__main__":
    main()
