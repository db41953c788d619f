"""The smallest topology that serves a model on a GPU type: TP, PP, EP/DP and nodes.

`recommend` walks candidate layouts from the smallest up and fits each the way
vLLM sizes its KV cache (`capacity.plan`'s arithmetic, generalised to pipeline
stages and data-parallel ranks); the smallest size at which one fits wins, and of
that size the layout holding the most full-context sequences. The rules
follow vLLM's parallelism guide: tensor parallel stays inside a node (it all-reduces
every layer), pipeline parallel or data/expert parallel spans nodes, and a
multi-node replica takes whole nodes (one pod per node in a LeaderWorkerSet).
docs/capacity.md, "Topology", has the formulas and the tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from llmgrpc import capacity
from llmgrpc.architecture import ArchitectureFacts, weight_bits
from llmgrpc.gpus import GpuType

TP = "tp"  # one node, tensor parallel
TP_PP = "tp-pp"  # TP inside each node, one pipeline stage per node
EP_DP = "ep-dp"  # experts split over every GPU, attention data parallel across ranks

DEFAULT_MAX_NODES = 16
DEFAULT_CONCURRENCY = 1  # vLLM's own startup check: one sequence of max_model_len


@dataclass(frozen=True)
class Layout:
    """How one replica (one engine, one LeaderWorkerSet group) spreads over GPUs."""

    kind: str
    tp: int
    pp: int = 1
    dp: int = 1  # data-parallel attention ranks, each with its own KV cache

    def __post_init__(self) -> None:
        if self.kind not in (TP, TP_PP, EP_DP):
            raise ValueError(f"unknown layout {self.kind!r}")
        if min(self.tp, self.pp, self.dp) < 1:
            raise ValueError(f"parallel sizes must be at least 1: {self}")
        if self.kind != TP_PP and self.pp != 1:
            raise ValueError("only TP x PP layouts have pipeline stages")
        if self.kind != EP_DP and self.dp != 1:
            raise ValueError("only expert parallel layouts have data-parallel ranks")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_parallel(self) -> bool:
        return self.kind == EP_DP

    @property
    def ep(self) -> int:
        """vLLM's expert-parallel size: experts are split over TP x DP ranks."""
        return self.tp * self.dp if self.expert_parallel else 1

    def nodes(self, gpus_per_node: int) -> int:
        return math.ceil(self.gpus / gpus_per_node)


@dataclass(frozen=True)
class Topology:
    """One layout fitted on one GPU type. Per-GPU figures are for the fullest rank;
    per-rank figures for one data-parallel rank's KV cache; the rest for the replica."""

    gpu: str
    layout: Layout
    nodes: int
    gpus_per_node: int  # GPUs each node (pod) of the replica uses
    weight_dtype: str
    kv_dtype: str
    context_len: int
    concurrency: int  # full-context sequences the replica must hold at once
    gpu_memory_utilization: float
    block_size: int
    gpu_memory_bytes: int
    usable_bytes_per_gpu: int
    overhead_bytes_per_gpu: int
    weight_bytes: int  # the whole model
    weight_bytes_per_gpu: int
    layers_per_gpu: int  # a pipeline stage's layers
    kv_heads_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    kv_bytes_per_sequence_per_gpu: int
    kv_memory_per_gpu: int
    num_blocks_per_rank: int
    kv_tokens_per_rank: int
    sequences_per_rank: int
    kv_token_capacity: int  # the replica: every DP rank's tokens
    max_concurrent_sequences: int  # the replica's full-context sequences
    fits: bool  # at least `concurrency` sequences, and one per DP rank

    @property
    def gpus(self) -> int:
        return self.layout.gpus


def native_weight_dtype(config: Mapping[str, Any]) -> str:
    """The dtype the checkpoint ships in: fp8 when its quantization_config says so
    (DeepSeek-V3), else 16-bit (the planner prices bf16 and fp16 alike)."""
    quantization = config.get("quantization_config")
    if isinstance(quantization, Mapping) and quantization.get("quant_method") == "fp8":
        return "fp8"
    return "bfloat16"


def fit(
    facts: ArchitectureFacts,
    gpu: GpuType,
    layout: Layout,
    *,
    weight_dtype: str,
    kv_dtype: str = "auto",
    context_len: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    gpu_memory_utilization: float = 0.9,
    overhead_gib: float = capacity.DEFAULT_OVERHEAD_GIB,
    block_size: int = capacity.DEFAULT_BLOCK_SIZE,
) -> Topology:
    """Fit `layout` on `gpu` as vLLM would size each rank's KV cache. With one pipeline
    stage and one DP rank this is `capacity.plan` exactly (a test holds it to that)."""
    if weight_dtype == "fp8" and not gpu.fp8:
        raise ValueError(f"{gpu.name} has no fp8 support: plan its weights in bfloat16")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if layout.pp > facts.num_layers:
        raise ValueError(f"{layout.pp} pipeline stages for {facts.num_layers} layers")
    if layout.expert_parallel and not facts.num_experts:
        raise ValueError("expert parallelism needs a mixture-of-experts model")
    base = capacity.plan(  # validates the context, the TP size and the utilization
        facts,
        gpu_memory_gib=gpu.memory_gib,
        num_gpus_tp=layout.tp,
        gpu_memory_utilization=gpu_memory_utilization,
        context_len=context_len,
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        overhead_gib=overhead_gib,
        block_size=block_size,
    )
    # 1. Weights: TP x PP splits all of them; EP splits the routed experts over TP x DP
    #    and TP alone splits the rest (attention, dense layers, shared experts, embeddings).
    weights = base.weight_bytes
    if layout.expert_parallel:
        expert = routed_expert_bytes(facts, weight_dtype)
        rank_experts = math.ceil(facts.num_experts / layout.ep) * facts.num_moe_layers
        rest = weights - expert * facts.num_experts * facts.num_moe_layers
        weights_per_gpu = math.ceil(rest / layout.tp) + rank_experts * expert
    else:
        weights_per_gpu = math.ceil(weights / (layout.tp * layout.pp))
    # 2. A rank caches its KV heads (MLA: the whole latent) of its stage's layers.
    layers = math.ceil(facts.num_layers / layout.pp)
    heads, kv_heads = base.kv_heads_per_gpu, facts.num_kv_heads
    per_token = facts.kv_cache_bytes_per_layer_token(kv_dtype) * layers * heads // kv_heads
    sequence = facts.kv_cache_bytes(base.context_len, kv_dtype)
    per_sequence = -(-sequence * layers // facts.num_layers) * heads // kv_heads  # ceil
    # 3. The rest of the usable memory becomes whole blocks, as in capacity.plan.
    kv_memory = max(0, base.usable_bytes_per_gpu - weights_per_gpu - base.overhead_bytes_per_gpu)
    block_bytes = block_size * per_token
    num_blocks = kv_memory // block_bytes
    sequences = num_blocks // max(1, math.ceil(per_sequence / block_bytes))
    total_sequences = sequences * layout.dp
    return Topology(
        gpu=gpu.name,
        layout=layout,
        nodes=layout.nodes(gpu.gpus_per_node),
        gpus_per_node=min(layout.gpus, gpu.gpus_per_node),
        weight_dtype=weight_dtype,
        kv_dtype=kv_dtype,
        context_len=base.context_len,
        concurrency=concurrency,
        gpu_memory_utilization=gpu_memory_utilization,
        block_size=block_size,
        gpu_memory_bytes=base.gpu_memory_bytes,
        usable_bytes_per_gpu=base.usable_bytes_per_gpu,
        overhead_bytes_per_gpu=base.overhead_bytes_per_gpu,
        weight_bytes=weights,
        weight_bytes_per_gpu=weights_per_gpu,
        layers_per_gpu=layers,
        kv_heads_per_gpu=heads,
        kv_bytes_per_token_per_gpu=per_token,
        kv_bytes_per_sequence_per_gpu=per_sequence,
        kv_memory_per_gpu=kv_memory,
        num_blocks_per_rank=num_blocks,
        kv_tokens_per_rank=num_blocks * block_size,
        sequences_per_rank=sequences,
        kv_token_capacity=num_blocks * block_size * layout.dp,
        max_concurrent_sequences=total_sequences,
        fits=sequences >= 1 and total_sequences >= concurrency,
    )


def routed_expert_bytes(facts: ArchitectureFacts, weight_dtype: str) -> int:
    """One routed expert of one layer: a SwiGLU MLP (gate, up, down) in every supported
    MoE family, quantized like any linear layer."""
    params = 3 * facts.hidden_size * facts.moe_intermediate_size
    return math.ceil(params * weight_bits(weight_dtype) / 8)


def valid(facts: ArchitectureFacts, layout: Layout) -> bool:
    """Whether vLLM would start this layout for this model: TP must split the heads
    (capacity.kv_heads_per_gpu's rules) and every pipeline stage needs a layer."""
    try:
        capacity.kv_heads_per_gpu(facts, layout.tp)
    except ValueError:
        return False
    return layout.pp <= facts.num_layers


def layouts(facts: ArchitectureFacts, gpu: GpuType, max_nodes: int) -> Iterator[Layout]:
    """Candidate layouts from the smallest up: one node's power-of-two TP sizes (and
    DP ranks for MoE), then whole nodes, TP = the node's GPUs, stages or ranks across."""
    per_node = gpu.gpus_per_node
    size = 1
    while size <= per_node:
        yield Layout(TP, tp=size)
        if facts.num_experts and size > 1:
            yield Layout(EP_DP, tp=1, dp=size)
        size *= 2
    for nodes in range(2, max_nodes + 1):
        yield Layout(TP_PP, tp=per_node, pp=nodes)
        if facts.num_experts:
            yield Layout(EP_DP, tp=1, dp=nodes * per_node)
            yield Layout(EP_DP, tp=per_node, dp=nodes)


@dataclass(frozen=True)
class Recommendation:
    chosen: Topology | None  # None: nothing fits in max_nodes
    considered: tuple[Topology, ...]  # every valid layout up to the chosen size
    max_nodes: int


def recommend(
    facts: ArchitectureFacts,
    gpu: GpuType,
    *,
    weight_dtype: str,
    max_nodes: int = DEFAULT_MAX_NODES,
    **options: Any,
) -> Recommendation:
    """The smallest layout that fits: fewest nodes, then fewest GPUs; among layouts of
    that size the one holding the most full-context sequences, then the most tokens."""
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be at least 1, got {max_nodes}")
    considered = [
        fit(facts, gpu, layout, weight_dtype=weight_dtype, **options)
        for layout in layouts(facts, gpu, max_nodes)
        if valid(facts, layout)
    ]
    fitting = [t for t in considered if t.fits]
    if not fitting:
        return Recommendation(None, tuple(considered), max_nodes)
    smallest = min(_size(t) for t in fitting)
    tied = [t for t in fitting if _size(t) == smallest]
    chosen = max(tied, key=lambda t: (t.max_concurrent_sequences, t.kv_token_capacity))
    shown = tuple(t for t in considered if _size(t) <= smallest)
    return Recommendation(chosen, shown, max_nodes)


def _size(t: Topology) -> tuple[int, int]:
    return (t.nodes, t.gpus)
