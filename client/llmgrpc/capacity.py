"""Serving capacity: fits a model's architecture facts onto GPUs the way vLLM does.

`plan` (what `llmgrpc plan` prints) builds on `llmgrpc.architecture`, which
reads the facts from a Hugging Face `config.json`; the names of that module are
re-exported here for callers of the planner. docs/capacity.md has the formulas.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llmgrpc.architecture import (
    KV_DTYPE_BYTES,
    SUPPORTED_MODEL_TYPES,
    WEIGHT_DTYPE_BITS,
    ArchitectureFacts,
    UnsupportedArchitecture,
    facts_from_config,
    kv_dtype_bytes,
    weight_bytes,
)

__all__ = [
    "KV_DTYPE_BYTES",
    "SUPPORTED_MODEL_TYPES",
    "WEIGHT_DTYPE_BITS",
    "ArchitectureFacts",
    "Plan",
    "UnsupportedArchitecture",
    "builtin_configs",
    "embedded_kv_cache_bytes",
    "facts_from_config",
    "kv_dtype_bytes",
    "kv_heads_per_gpu",
    "load_config",
    "model_source",
    "plan",
    "weight_bytes",
]

GIB = 1024**3
# Per-GPU memory vLLM uses besides weights and KV cache: the activation peak of a
# profiling forward pass, CUDA graph pools and NCCL/cuBLAS workspaces.
DEFAULT_OVERHEAD_GIB = 2.0
DEFAULT_BLOCK_SIZE = 16  # vLLM's KV cache block size on CUDA


@dataclass(frozen=True)
class Plan:
    """One tensor-parallel replica on `num_gpus_tp` GPUs. Figures named per_gpu are for
    one rank; token and sequence counts are for the replica (every rank holds its share)."""

    gpu_memory_bytes: int  # per GPU
    num_gpus_tp: int
    gpu_memory_utilization: float
    context_len: int
    weight_dtype: str
    kv_dtype: str
    block_size: int
    overhead_bytes_per_gpu: int
    usable_bytes_per_gpu: int  # gpu_memory_bytes * gpu_memory_utilization
    weight_bytes: int  # the whole model
    weight_bytes_per_gpu: int
    kv_heads_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    kv_bytes_per_sequence_per_gpu: int  # one context_len sequence, sliding windows applied
    kv_memory_per_gpu: int
    num_blocks: int
    kv_token_capacity: int  # num_blocks * block_size
    max_concurrent_sequences: int  # of context_len tokens each
    fits: bool  # weights, overhead and one full-length sequence fit: vLLM's startup check
    shortfall_bytes: int  # per GPU; 0 when it fits

    def __post_init__(self) -> None:
        if self.fits != (self.shortfall_bytes == 0) or self.fits != (
            self.max_concurrent_sequences >= 1
        ):
            raise ValueError("a plan fits exactly when one sequence fits and nothing is short")


def plan(
    facts: ArchitectureFacts,
    *,
    gpu_memory_gib: float,
    num_gpus_tp: int = 1,
    gpu_memory_utilization: float = 0.9,
    context_len: int | None = None,
    weight_dtype: str = "bfloat16",
    kv_dtype: str = "auto",
    overhead_gib: float = DEFAULT_OVERHEAD_GIB,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Plan:
    """Fit the model onto GPUs as vLLM would: weights split over TP ranks, the rest of
    `gpu_memory_utilization` minus overhead becomes KV cache blocks."""
    if gpu_memory_gib <= 0 or overhead_gib < 0 or block_size < 1:
        raise ValueError("GPU memory and block size must be positive, overhead not negative")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    context = facts.max_position_embeddings if context_len is None else context_len
    if not 1 <= context <= facts.max_position_embeddings:
        raise ValueError(
            f"context_len {context} must be in 1..{facts.max_position_embeddings} "
            "(max_position_embeddings; vLLM refuses a longer max_model_len)"
        )
    heads_per_gpu = kv_heads_per_gpu(facts, num_gpus_tp)
    # 1. What every rank must hold besides the KV cache.
    gpu_bytes = int(gpu_memory_gib * GIB)
    usable = int(gpu_bytes * gpu_memory_utilization)
    overhead = int(overhead_gib * GIB)
    weights = weight_bytes(facts, weight_dtype)
    weights_per_gpu = math.ceil(weights / num_gpus_tp)
    # 2. A rank caches only its KV heads (MLA: the whole latent) of every token.
    share = (heads_per_gpu, facts.num_kv_heads)
    per_token = facts.kv_cache_bytes_per_token(kv_dtype) * share[0] // share[1]
    per_sequence = facts.kv_cache_bytes(context, kv_dtype) * share[0] // share[1]
    # 3. The rest becomes whole blocks; a sequence needs enough of them for its context.
    kv_memory = max(0, usable - weights_per_gpu - overhead)
    block_bytes = block_size * per_token
    num_blocks = kv_memory // block_bytes
    blocks_per_sequence = max(1, math.ceil(per_sequence / block_bytes))
    concurrent = num_blocks // blocks_per_sequence
    needed = weights_per_gpu + overhead + blocks_per_sequence * block_bytes
    return Plan(
        gpu_memory_bytes=gpu_bytes,
        num_gpus_tp=num_gpus_tp,
        gpu_memory_utilization=gpu_memory_utilization,
        context_len=context,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        block_size=block_size,
        overhead_bytes_per_gpu=overhead,
        usable_bytes_per_gpu=usable,
        weight_bytes=weights,
        weight_bytes_per_gpu=weights_per_gpu,
        kv_heads_per_gpu=heads_per_gpu,
        kv_bytes_per_token_per_gpu=per_token,
        kv_bytes_per_sequence_per_gpu=per_sequence,
        kv_memory_per_gpu=kv_memory,
        num_blocks=num_blocks,
        kv_token_capacity=num_blocks * block_size,
        max_concurrent_sequences=concurrent,
        fits=concurrent >= 1,
        shortfall_bytes=0 if concurrent >= 1 else needed - usable,
    )


def kv_heads_per_gpu(facts: ArchitectureFacts, num_gpus_tp: int) -> int:
    """KV heads one TP rank caches; vLLM's rules for splitting and replicating them."""
    if num_gpus_tp < 1:
        raise ValueError(f"tensor parallel size must be at least 1, got {num_gpus_tp}")
    if facts.num_attention_heads % num_gpus_tp:
        raise ValueError(
            f"{facts.num_attention_heads} attention heads do not divide over TP {num_gpus_tp}"
        )
    if facts.mla is not None:
        return 1  # every rank keeps the whole latent
    kv_heads = facts.num_kv_heads
    if kv_heads >= num_gpus_tp:
        if kv_heads % num_gpus_tp:
            raise ValueError(f"{kv_heads} KV heads do not divide over TP {num_gpus_tp}")
        return kv_heads // num_gpus_tp
    if num_gpus_tp % kv_heads:
        raise ValueError(f"TP {num_gpus_tp} is not a multiple of the {kv_heads} KV heads")
    return 1  # fewer KV heads than ranks: each is replicated on tp / kv_heads ranks


# --- llmgrpc-server's embedded models ---------------------------------------------------------
# Served with this context (unless --max-model-len) and a KV cache holding
# this many full-context sequences (unless --kv-cache-memory-bytes), never
# less than the floor; the server calls embedded_kv_cache_bytes itself.
EMBEDDED_MODELS = ("smollm2-135m-instruct", "tiny-llama-gqa", "tiny-mixtral-moe")
EMBEDDED_CONTEXT_LEN = 2048
EMBEDDED_KV_SEQUENCES = 16
EMBEDDED_KV_FLOOR_BYTES = 64 * 1024**2


def embedded_kv_cache_bytes(
    facts: ArchitectureFacts, context_len: int = EMBEDDED_CONTEXT_LEN, kv_dtype: str = "bfloat16"
) -> int:
    """The KV cache llmgrpc-server gives an embedded model."""
    sequences = EMBEDDED_KV_SEQUENCES * facts.kv_cache_bytes(context_len, kv_dtype)
    return max(sequences, EMBEDDED_KV_FLOOR_BYTES)


# --- built-in and local configs ---------------------------------------------------------------


# Where each built-in config.json comes from: the Hugging Face repository a server
# loads it by (docs/capacity.md, "Built-in configurations"). The embedded models
# are served by their own names.
SOURCES = {
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "falcon-7b": "tiiuae/falcon-7b",
    "gpt2": "openai-community/gpt2",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-3.1-405b": "meta-llama/Llama-3.1-405B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
}


def model_source(name_or_path: str) -> str:
    """What a server's --model takes for this config: the repository of a built-in
    config, else the name or path as given (an embedded model's name, a directory)."""
    return SOURCES.get(name_or_path, name_or_path)


def builtin_configs() -> tuple[str, ...]:
    """Names of the configs shipped in llmgrpc/configs."""
    root = resources.files("llmgrpc").joinpath("configs")
    names = (p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json"))
    return tuple(sorted(names))


def load_config(name_or_path: str) -> dict[str, Any]:
    """A config dict from a model directory, a config.json path, or a built-in name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif name_or_path in builtin_configs():
        text = resources.files("llmgrpc").joinpath("configs", f"{name_or_path}.json").read_text()
    else:
        raise FileNotFoundError(
            f"{name_or_path!r} is not a model directory, a config.json or a built-in config "
            f"({', '.join(builtin_configs())})"
        )
    config = json.loads(text)
    if not isinstance(config, dict):
        raise TypeError(f"{name_or_path}: a config must be a JSON object")
    return config
