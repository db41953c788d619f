"""`llmgrpc plan`: what a model costs to serve, and whether it fits on given GPUs.

Reads a config (built-in name, config.json or model directory) and prints the
architecture facts, weight memory per dtype, KV cache cost and a capacity plan,
as a table or as JSON. The arithmetic is llmgrpc.capacity's. With --gpu NAME it
plans the smallest topology (TP, PP, EP/DP, nodes) on that GPU type instead, and
prints the Kubernetes patch that deploys it (llmgrpc.plan_topology).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from llmgrpc import capacity, plan_topology, topology
from llmgrpc.capacity import ArchitectureFacts, Plan

_WEIGHT_DTYPES = ("bfloat16", "float16", "fp8", "int8", "int4", "bf16", "fp16")
_KV_DTYPES = (*capacity.KV_DTYPE_BYTES, "bf16", "fp16")
_SHOWN_WEIGHT_DTYPES = ("bfloat16", "fp8", "int8", "int4")


def add_parser(subparsers: Any) -> None:
    """Register the `plan` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "plan",
        help="estimate the memory and KV cache capacity a model needs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"a built-in config name ({', '.join(capacity.builtin_configs())}), "
        "a config.json path or a model directory",
    )
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=None, help="memory of one GPU (default: 80)"
    )
    parser.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: 1)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument(
        "--context-len", type=int, default=None, help="tokens per sequence (default: the model's)"
    )
    parser.add_argument(
        "--weight-dtype",
        choices=_WEIGHT_DTYPES,
        default=None,
        help="default: the checkpoint's (fp8 when its quantization_config says so, else bfloat16)",
    )
    parser.add_argument("--kv-dtype", choices=_KV_DTYPES, default="auto")
    parser.add_argument(
        "--overhead-gib",
        type=float,
        default=capacity.DEFAULT_OVERHEAD_GIB,
        help="per-GPU memory for activations, CUDA graphs and workspaces",
    )
    parser.add_argument("--block-size", type=int, default=capacity.DEFAULT_BLOCK_SIZE)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan_topology.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print the plan; 0 when it was computed (fitting or not), 1 when it could not be."""
    try:
        config = capacity.load_config(args.model)
        facts = capacity.facts_from_config(config)
        if args.gpu is not None:
            return _run_topology(args, config, facts)
        embedded = _embedded(args, config, facts)
        result = capacity.plan(
            facts,
            gpu_memory_gib=80.0 if args.gpu_memory_gib is None else args.gpu_memory_gib,
            num_gpus_tp=1 if args.tp is None else args.tp,
            gpu_memory_utilization=args.gpu_memory_utilization,
            context_len=args.context_len,
            weight_dtype=args.weight_dtype or topology.native_weight_dtype(config),
            kv_dtype=args.kv_dtype,
            overhead_gib=args.overhead_gib,
            block_size=args.block_size,
        )
    except (OSError, TypeError, ValueError) as exc:  # UnsupportedArchitecture is a ValueError
        print(f"llmgrpc plan: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(args.model, facts, result) | {"embedded": embedded}, indent=2))
    else:
        print(render(args.model, facts, result))
        if embedded is not None:
            print("\n".join(_embedded_section(embedded)))
    return 0


def _run_topology(
    args: argparse.Namespace, config: dict[str, Any], facts: ArchitectureFacts
) -> int:
    """`--gpu`: the model's facts, then the smallest topology and its deployment patch;
    1 when nothing fits in --max-nodes."""
    result = plan_topology.plan(args, config, facts)
    if args.json:
        facts_json = _facts_json(args.model, facts, args.kv_dtype)
        print(json.dumps(facts_json | plan_topology.to_json(result), indent=2))
    else:
        context = args.context_len or facts.max_position_embeddings
        lines = _facts_lines(args.model, facts, args.kv_dtype, context)
        print("\n".join(lines + plan_topology.render(result, _size)))
    return 0 if result.recommendation.chosen is not None else 1


def _embedded(
    args: argparse.Namespace, config: dict[str, Any], facts: ArchitectureFacts
) -> dict[str, Any] | None:
    """What llmgrpc-server allocates for one of its embedded models on the CPU
    (no --kv-cache-memory-bytes): the KV cache GetModelInfo then reports."""
    if args.model not in capacity.EMBEDDED_MODELS:
        return None
    context = args.context_len or capacity.EMBEDDED_CONTEXT_LEN
    kv_dtype = args.kv_dtype
    if kv_dtype == "auto":  # the engine's: the model's dtype
        kv_dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    memory = capacity.embedded_kv_cache_bytes(facts, context, kv_dtype)
    tokens = memory // facts.kv_cache_bytes_per_token(kv_dtype)
    return {
        "context_len": context,
        "kv_dtype": kv_dtype,
        "kv_cache_bytes": memory,
        "kv_token_capacity": tokens,
        "sequences": tokens // context,
    }


def _embedded_section(e: dict[str, Any]) -> list[str]:
    return _section(
        f"llmgrpc-server on the CPU (embedded model, KV {e['kv_dtype']}, context "
        f"{e['context_len']:,})",
        [
            ("KV cache", f"{_size(e['kv_cache_bytes'])} ({e['kv_cache_bytes']:,} B)"),
            ("KV token capacity", f"{e['kv_token_capacity']:,} tokens"),
            ("full-context seqs", f"{e['sequences']:,}"),
        ],
    )


def to_json(model: str, facts: ArchitectureFacts, result: Plan) -> dict[str, Any]:
    return _facts_json(model, facts, result.kv_dtype) | {"plan": dataclasses.asdict(result)}


def _facts_json(model: str, facts: ArchitectureFacts, kv_dtype: str) -> dict[str, Any]:
    architecture = dataclasses.asdict(facts)
    architecture["kv_cache_bytes_per_token"] = facts.kv_cache_bytes_per_token(kv_dtype)
    return {
        "model": model,
        "architecture": architecture,
        "weight_bytes": {d: capacity.weight_bytes(facts, d) for d in _SHOWN_WEIGHT_DTYPES},
    }


def render(model: str, facts: ArchitectureFacts, result: Plan) -> str:
    """The human-readable report."""
    lines = _facts_lines(model, facts, result.kv_dtype, result.context_len)
    title = (
        f"Plan: {result.num_gpus_tp} x {_size(result.gpu_memory_bytes)} GPU "
        f"(TP {result.num_gpus_tp}), utilization {result.gpu_memory_utilization:.2f}, "
        f"weights {result.weight_dtype}, context {result.context_len:,}"
    )
    lines += _section(title, _plan_rows(facts, result))
    if facts.notes:
        lines += ["", "Notes", *(f"  - {note}" for note in facts.notes)]
    return "\n".join(lines)


def _facts_lines(
    model: str, facts: ArchitectureFacts, kv_dtype: str, context_len: int
) -> list[str]:
    """The model's facts: architecture, weights per dtype, KV cache cost."""
    lines = [f"{model}: {', '.join(facts.architectures) or '?'} (model_type {facts.model_type})"]
    lines += _section("Architecture", _architecture_rows(facts))
    lines += _section(
        "Weights (whole model)",
        [(d, _size(capacity.weight_bytes(facts, d))) for d in _SHOWN_WEIGHT_DTYPES],
    )
    element = capacity.kv_dtype_bytes(kv_dtype)
    per_token = facts.kv_cache_bytes_per_token(kv_dtype)
    lines += _section(
        f"KV cache ({kv_dtype}: {element} B per element)",
        [
            ("per token", f"{per_token:,} B ({_size(per_token)})"),
            (
                f"per {context_len:,}-token sequence",
                _size(facts.kv_cache_bytes(context_len, kv_dtype)),
            ),
        ],
    )
    return lines


def _architecture_rows(facts: ArchitectureFacts) -> list[tuple[str, str]]:
    if facts.mla is not None:
        attention = (
            f"MLA: {facts.num_attention_heads} heads share one latent of "
            f"{facts.mla.kv_lora_rank} + {facts.mla.qk_rope_head_dim} (rope) per token"
        )
    else:
        attention = (
            f"{facts.attention_kind}: {facts.num_attention_heads} query heads over "
            f"{facts.num_kv_heads} KV heads (group of {facts.gqa_group_size}), "
            f"head_dim {facts.head_dim}"
        )
    position = facts.position_encoding
    if facts.rope_theta is not None:
        position += f" (theta {facts.rope_theta:,.0f})"
    window = "none"
    if facts.sliding_window is not None:
        window = (
            f"{facts.sliding_window:,} tokens in {facts.num_sliding_window_layers} "
            f"of {facts.num_layers} layers"
        )
    rows = [
        ("layers", str(facts.num_layers)),
        ("hidden / intermediate", f"{facts.hidden_size} / {facts.intermediate_size}"),
        ("attention", attention),
        ("position encoding", position),
        ("sliding window", window),
    ]
    if facts.num_experts:
        rows.append(
            (
                "experts",
                f"{facts.num_experts} routed + {facts.num_shared_experts} shared, "
                f"{facts.experts_per_token} routed per token, in {facts.num_moe_layers} "
                f"of {facts.num_layers} layers (width {facts.moe_intermediate_size})",
            )
        )
    rows += [
        (
            "parameters",
            f"{_billions(facts.total_parameters)} total, "
            f"{_billions(facts.active_parameters)} active per token",
        ),
        ("vocab / max positions", f"{facts.vocab_size:,} / {facts.max_position_embeddings:,}"),
    ]
    return rows


def _plan_rows(facts: ArchitectureFacts, result: Plan) -> list[tuple[str, str]]:
    verdict = "yes" if result.fits else f"no: short by {_size(result.shortfall_bytes)} per GPU"
    return [
        ("usable per GPU", _size(result.usable_bytes_per_gpu)),
        ("weights per GPU", _size(result.weight_bytes_per_gpu)),
        ("overhead per GPU", _size(result.overhead_bytes_per_gpu)),
        ("KV memory per GPU", _size(result.kv_memory_per_gpu)),
        ("KV heads per GPU", f"{result.kv_heads_per_gpu} of {facts.num_kv_heads}"),
        ("KV bytes/token per GPU", f"{result.kv_bytes_per_token_per_gpu:,} B"),
        (
            "KV token capacity",
            f"{result.kv_token_capacity:,} tokens "
            f"({result.num_blocks:,} blocks of {result.block_size})",
        ),
        ("max concurrent seqs", f"{result.max_concurrent_sequences:,}"),
        ("fits", verdict),
    ]


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(label) for label, _ in rows)
    return ["", title, *(f"  {label:<{width}}  {value}" for label, value in rows)]


def size_text(n: int) -> str:
    """Bytes as the tables print them: 2 decimals of GiB, MiB, KiB or bytes."""
    return _size(n)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 10**8 else f"{n:,}"
