"""`llmgrpc-server`: parse flags once, wire the vLLM engine in, serve.

Every vLLM engine flag works (`AsyncEngineArgs.add_cli_args`); ours are in
the "llmgrpc server" group. With no `--model` the embedded default model is
built (offline, a few seconds) and served.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from llmgrpc_server import config as server_config
from llmgrpc_server import models

log = logging.getLogger("llmgrpc_server")

# The embedded models are tiny: a small KV cache is plenty, and vLLM's default
# (a fraction of all memory, on the CPU backend) fails on small machines.
EMBEDDED_KV_CACHE_BYTES = 64 * 1024 * 1024


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
    if ns.model in models.EMBEDDED:
        name = ns.model
        ns.model = models.resolve(name, config.models_dir)
        if not ns.served_model_name:
            ns.served_model_name = [name]
        if ns.kv_cache_memory_bytes is None:
            ns.kv_cache_memory_bytes = EMBEDDED_KV_CACHE_BYTES
        vllm_settings.prefer_compact_json(ns)
    return config, vllm_settings.engine_args_from_cli(ns)


def served_name(engine_args: Any) -> str:
    names = engine_args.served_model_name
    if isinstance(names, list | tuple) and names:
        return str(names[0])
    return str(names or engine_args.model)


async def run(config: server_config.ServerConfig, engine_args: Any) -> int:
    from llmgrpc_server import server
    from llmgrpc_server.metrics import GrpcMetrics
    from llmgrpc_server.vllm_adapter.engine import VllmEngine

    if config.metrics_port >= 0:
        from prometheus_client import disable_created_metrics

        from llmgrpc_server.metrics_http import start_metrics_server

        # `_created` series double the scrape size and no dashboard reads them.
        disable_created_metrics()
        http = start_metrics_server(config.metrics_port, config.host.strip("[]") or "::")
        log.info("metrics listening on port %d (/metrics)", http.server_port)
    return await server.serve(
        config,
        served_name(engine_args),
        lambda: VllmEngine.start(
            engine_args,
            max_prompt_tokens=config.max_prompt_tokens,
            max_tokens=config.max_tokens_limit,
            max_tokens_per_message=config.max_tokens_per_message,
            pin_front_end=config.pin_front_end,
            size_caps=config.size_caps(),
        ),
        GrpcMetrics(),
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config, engine_args = parse(argv)
    except ValueError as e:
        print(f"llmgrpc-server: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    try:
        import uvloop

        code = uvloop.run(run(config, engine_args))
    except ImportError:
        code = asyncio.run(run(config, engine_args))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
