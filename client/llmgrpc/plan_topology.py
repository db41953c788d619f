"""`llmgrpc plan MODEL --gpu NAME`: the smallest topology that serves the model, and
the Kubernetes patch that deploys it. The arithmetic is llmgrpc.topology's; plan.py
registers the flags and prints the model's facts before this part."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from llmgrpc import capacity, deployment_patch, topology
from llmgrpc.architecture import ArchitectureFacts
from llmgrpc.gpus import GPUS, GpuType, gpu_type
from llmgrpc.topology import EP_DP, TP_PP, Recommendation, Topology


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu",
        metavar="NAME",
        help=f"plan the smallest topology on this GPU type ({', '.join(GPUS)}) and print "
        "the Kubernetes patch that deploys it",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=topology.DEFAULT_CONCURRENCY,
        help="with --gpu: full-context sequences a replica must hold at once (default: 1, "
        "vLLM's own startup check)",
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="with --gpu: GPUs in one node (default: the GPU type's, 8; L40S nodes also "
        "come with 4)",
    )
    parser.add_argument(
        "--max-nodes",
        type=int,
        default=topology.DEFAULT_MAX_NODES,
        help="with --gpu: the largest replica to consider, in nodes",
    )


@dataclasses.dataclass(frozen=True)
class Result:
    model: str  # what a server's --model takes
    served_name: str
    gpu: GpuType
    native_weight_dtype: str
    weight_dtype: str
    weight_dtype_reason: str
    recommendation: Recommendation
    alternative: Topology | None  # the smaller topology fp8 weights would allow, if any


def plan(args: argparse.Namespace, config: dict[str, Any], facts: ArchitectureFacts) -> Result:
    """The recommendation for the parsed arguments; ValueError when they cannot be planned."""
    if args.tp is not None or args.gpu_memory_gib is not None:
        raise ValueError(
            "--gpu picks the TP size and knows the memory: drop --tp, --gpu-memory-gib"
        )
    gpu = gpu_type(args.gpu)
    if args.gpus_per_node is not None:
        gpu = dataclasses.replace(gpu, gpus_per_node=args.gpus_per_node)  # validated there
    native = topology.native_weight_dtype(config)
    weight_dtype, reason = _weight_dtype(args.weight_dtype, native, gpu)
    options = {
        "kv_dtype": args.kv_dtype,
        "context_len": args.context_len,
        "concurrency": args.concurrency,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "overhead_gib": args.overhead_gib,
        "block_size": args.block_size,
        "max_nodes": args.max_nodes,
    }
    rec = topology.recommend(facts, gpu, weight_dtype=weight_dtype, **options)
    alternative = None
    if args.weight_dtype is None and gpu.fp8 and weight_dtype != "fp8":
        fp8 = topology.recommend(facts, gpu, weight_dtype="fp8", **options).chosen
        if fp8 is not None and (rec.chosen is None or _size(fp8) < _size(rec.chosen)):
            alternative = fp8
    model = capacity.model_source(args.model)
    served = args.model if model != args.model else model.rstrip("/").rsplit("/", 1)[-1]
    return Result(model, served, gpu, native, weight_dtype, reason, rec, alternative)


def _weight_dtype(asked: str | None, native: str, gpu: GpuType) -> tuple[str, str]:
    if asked is not None:
        if asked == "fp8" and not gpu.fp8:
            raise ValueError(f"{gpu.name} has no fp8 support; plan it in bfloat16")
        if asked in ("int8", "int4"):
            return asked, "asked for: serve a checkpoint quantized to it (AWQ, GPTQ)"
        return asked, "asked for"
    if native == "fp8" and not gpu.fp8:
        return "bfloat16", f"the checkpoint is fp8, which {gpu.name} cannot run: a bf16 copy"
    return native, "the checkpoint's own"


def _size(t: Topology) -> tuple[int, int]:
    return (t.nodes, t.gpus)


def describe(layout: topology.Layout) -> str:
    if layout.kind == TP_PP:
        return f"TP {layout.tp} x PP {layout.pp}"
    if layout.kind == EP_DP:
        return f"EP {layout.ep} (DP {layout.dp} x TP {layout.tp})"
    return f"TP {layout.tp}"


def to_json(result: Result) -> dict[str, Any]:
    rec = result.recommendation
    chosen = rec.chosen
    out: dict[str, Any] = {
        "gpu": dataclasses.asdict(result.gpu) | {"memory_gib": result.gpu.memory_gib},
        "weight_dtype": result.weight_dtype,
        "weight_dtype_reason": result.weight_dtype_reason,
        "fits": chosen is not None,
        "max_nodes": rec.max_nodes,
        "topology": None if chosen is None else _topology_json(chosen, result.native_weight_dtype),
        "considered": [_topology_json(t, result.native_weight_dtype) for t in rec.considered],
        "fp8_alternative": None
        if result.alternative is None
        else _topology_json(result.alternative, result.native_weight_dtype),
        "deployment": None if chosen is None else _patch(result, chosen),
    }
    return out


def _patch(result: Result, t: Topology) -> dict[str, Any]:
    return deployment_patch.patch(
        t, result.gpu, result.model, result.served_name, result.native_weight_dtype
    )


def _topology_json(t: Topology, native: str) -> dict[str, Any]:
    layout = t.layout
    figures = dataclasses.asdict(t)
    del figures["layout"]
    return figures | {
        "layout": layout.kind,
        "tp": layout.tp,
        "pp": layout.pp,
        "dp": layout.dp,
        "ep": layout.ep,
        "expert_parallel": layout.expert_parallel,
        "gpus": t.gpus,
        "vllm_args": deployment_patch.vllm_args(t, native),
    }


def render(result: Result, size: Any) -> list[str]:
    """The topology sections of the table; `size` formats bytes as plan.py does."""
    gpu, rec = result.gpu, result.recommendation
    link = "NVLink" if gpu.interconnect == "nvlink" else "PCIe, no NVLink"
    head = (
        f"Topology on {gpu.name} ({size(gpu.memory_bytes)}, {gpu.gpus_per_node} per node, "
        f"{link}, fp8 {'yes' if gpu.fp8 else 'no'})"
    )
    lines = ["", head]
    chosen = rec.chosen
    if chosen is None:
        lines.append(f"  nothing fits in up to {rec.max_nodes} nodes (--max-nodes)")
    else:
        lines += [f"  {label:<24}  {value}" for label, value in _rows(result, chosen, size)]
    if gpu.note:
        lines.append(f"  note: {gpu.name}: {gpu.note}")
    lines += ["", "Layouts considered (the smallest that fits wins: fewest nodes, then GPUs,"]
    lines += ["  then the most full-context sequences)"]
    lines.append(f"  {'nodes':>5}  {'GPUs':>4}  {'layout':<22}  {'weights/GPU':>11}  "
                 f"{'KV tokens':>11}  {'seqs':>5}  fits")  # fmt: skip
    for t in rec.considered:
        lines.append(
            f"  {t.nodes:>5}  {t.gpus:>4}  {describe(t.layout):<22}  "
            f"{size(t.weight_bytes_per_gpu):>11}  {t.kv_token_capacity:>11,}  "
            f"{t.max_concurrent_sequences:>5,}  {'yes' if t.fits else 'no'}"
            + ("  <- chosen" if t is chosen else "")
        )
    if chosen is not None:
        patch = _patch(result, chosen)
        lines += ["", f"Deployment: {patch['kind']} patch for {patch['target']}", ""]
        lines += patch["yaml"].rstrip("\n").splitlines()
    return lines


def _rows(result: Result, t: Topology, size: Any) -> list[tuple[str, str]]:
    layout = t.layout
    per_rank = ""
    if layout.dp > 1:
        per_rank = f" ({t.kv_tokens_per_rank:,} in each of {layout.dp} DP ranks)"
    rows = [
        ("nodes", f"{t.nodes} x {t.gpus_per_node} GPUs ({t.gpus} in all)"),
        ("parallelism", describe(layout)),
        ("vLLM flags", " ".join(deployment_patch.vllm_args(t, result.native_weight_dtype))),
        ("weights", f"{t.weight_dtype} ({result.weight_dtype_reason}), {size(t.weight_bytes)}"),
        ("context / concurrency", f"{t.context_len:,} tokens / {t.concurrency:,} sequences"),
        ("usable per GPU", f"{size(t.usable_bytes_per_gpu)} ({t.gpu_memory_utilization:g} of it)"),
        ("weights per GPU", size(t.weight_bytes_per_gpu)),
        ("overhead per GPU", size(t.overhead_bytes_per_gpu)),
        ("KV memory per GPU", size(t.kv_memory_per_gpu)),
        (
            "KV bytes/token per GPU",
            f"{t.kv_bytes_per_token_per_gpu:,} B, {t.layers_per_gpu} layers",
        ),
        ("KV tokens per replica", f"{t.kv_token_capacity:,}{per_rank}"),
        ("full-context seqs", f"{t.max_concurrent_sequences:,} per replica"),
        ("fits", "yes" if t.fits else "no"),
    ]
    if result.alternative is not None:
        alt = result.alternative
        rows.append(
            (
                "with fp8 weights",
                f"{alt.nodes} x {alt.gpus_per_node} GPUs, {describe(alt.layout)}, "
                f"{alt.max_concurrent_sequences:,} full-context seqs (--weight-dtype fp8)",
            )
        )
    return rows


def markdown_table(model: str, size: Any, **options: Any) -> str:
    """One model on every GPU type at `options` (plan --gpu's defaults otherwise), as the
    Markdown table docs/capacity.md carries (scripts/render_topology_tables.py writes it)."""
    config = capacity.load_config(model)
    facts = capacity.facts_from_config(config)
    native = topology.native_weight_dtype(config)
    rows = [
        "| GPU | nodes x GPUs | layout | weights | per GPU | KV tokens per replica "
        "| full-context seqs | vLLM flags |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for gpu in GPUS.values():
        weight_dtype, _ = _weight_dtype(None, native, gpu)
        t = topology.recommend(facts, gpu, weight_dtype=weight_dtype, **options).chosen
        if t is None:
            rows.append(f"| {gpu.name} | does not fit | | {weight_dtype} | | | | |")
            continue
        flags = " ".join(a for a in deployment_patch.vllm_args(t, native) if "parallel" in a)
        rows.append(
            f"| {gpu.name} | {t.nodes} x {t.gpus_per_node} | {describe(t.layout)} "
            f"| {t.weight_dtype} | {size(t.weight_bytes_per_gpu)} | {t.kv_token_capacity:,} "
            f"| {t.max_concurrent_sequences:,} | `{flags}` |"
        )
    return "\n".join(rows) + "\n"
