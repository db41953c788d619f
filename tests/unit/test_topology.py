"""The topology planner's rules and arithmetic (llmgrpc.topology, llmgrpc.gpus).

One-node figures must be capacity.plan's, which the engine tests hold to vLLM's own
KV cache allocation; the multi-node ones are checked by hand below.
"""

from __future__ import annotations

import itertools
import math

import pytest
from llmgrpc import capacity, topology
from llmgrpc.capacity import facts_from_config, load_config
from llmgrpc.gpus import GPUS, NVLINK, PCIE, gpu_type
from llmgrpc.topology import EP_DP, TP, TP_PP, Layout, fit, recommend

GIB = 1024**3
H100 = GPUS["H100-80GB"]
NEW_MODELS = ("deepseek-v3", "llama-3.1-405b")
# The GPU-class models: the embedded tiny ones fit anywhere and say nothing.
MODELS = sorted(set(capacity.builtin_configs()) - set(capacity.EMBEDDED_MODELS))


def facts(name: str) -> capacity.ArchitectureFacts:
    return facts_from_config(load_config(name))


def dtype(name: str, gpu: str) -> str:
    """What `plan --gpu` plans in: the checkpoint's dtype, bf16 where fp8 cannot run."""
    native = topology.native_weight_dtype(load_config(name))
    return "bfloat16" if native == "fp8" and not GPUS[gpu].fp8 else native


def test_the_gpu_table() -> None:
    assert set(GPUS) == {"A100-80GB", "H100-80GB", "H200-141GB", "L40S-48GB"}
    assert [name for name, gpu in GPUS.items() if not gpu.fp8] == ["A100-80GB"]
    assert {name: gpu.interconnect for name, gpu in GPUS.items()} == {
        "A100-80GB": NVLINK, "H100-80GB": NVLINK, "H200-141GB": NVLINK, "L40S-48GB": PCIE,
    }  # fmt: skip
    assert all(gpu.gpus_per_node == 8 for gpu in GPUS.values())
    # What the driver reports, a little under the marketing figure.
    assert [round(GPUS[n].memory_gib, 1) for n in GPUS] == [80.0, 79.6, 140.4, 45.0]
    assert gpu_type("h100-80gb") is H100
    with pytest.raises(ValueError, match="A100-80GB, H100-80GB"):
        gpu_type("B200")


def test_native_weight_dtype_reads_the_quantization_config() -> None:
    assert topology.native_weight_dtype(load_config("deepseek-v3")) == "fp8"
    assert topology.native_weight_dtype(load_config("llama-3.1-405b")) == "bfloat16"


# --------------------------------------------------------------------------- one node = capacity.plan


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_one_node_tensor_parallel_is_capacity_plan(name: str, gpu: str) -> None:
    f = facts(name)
    for tp in (1, 2, 4, 8):
        layout = Layout(TP, tp=tp)
        if not topology.valid(f, layout):
            continue
        context = min(8192, f.max_position_embeddings)
        t = fit(f, GPUS[gpu], layout, weight_dtype="bfloat16", context_len=context)
        p = capacity.plan(
            f, gpu_memory_gib=GPUS[gpu].memory_gib, num_gpus_tp=tp, context_len=context
        )
        assert (t.weight_bytes_per_gpu, t.kv_memory_per_gpu) == (
            p.weight_bytes_per_gpu,
            p.kv_memory_per_gpu,
        )
        assert (t.kv_bytes_per_token_per_gpu, t.kv_bytes_per_sequence_per_gpu) == (
            p.kv_bytes_per_token_per_gpu,
            p.kv_bytes_per_sequence_per_gpu,
        )
        assert (t.num_blocks_per_rank, t.kv_token_capacity) == (p.num_blocks, p.kv_token_capacity)
        assert t.max_concurrent_sequences == p.max_concurrent_sequences
        assert t.fits == p.fits and (t.nodes, t.gpus) == (1, tp)


# --------------------------------------------------------------------------- multi-node by hand


def test_llama_405b_tp8_pp2_by_hand() -> None:
    f = facts("llama-3.1-405b")
    t = fit(f, H100, Layout(TP_PP, tp=8, pp=2), weight_dtype="bfloat16", context_len=131_072)
    usable = int(81_559 * 1024**2 * 0.9)
    weights_per_gpu = math.ceil(2 * 405_853_388_800 / 16)
    # 63 of 126 layers per stage, 1 of 8 KV heads per rank: 2 x 128 x 2 B x 63
    per_token = 2 * 128 * 2 * 63
    blocks = (usable - weights_per_gpu - 2 * GIB) // (16 * per_token)
    assert (t.nodes, t.gpus_per_node, t.gpus) == (2, 8, 16)
    assert (t.weight_bytes_per_gpu, t.layers_per_gpu) == (weights_per_gpu, 63)
    assert t.kv_bytes_per_token_per_gpu == per_token == 32_256
    assert t.kv_token_capacity == blocks * 16
    assert t.max_concurrent_sequences == blocks // (131_072 // 16)


def test_deepseek_v3_expert_parallel_by_hand() -> None:
    f = facts("deepseek-v3")
    t = fit(f, H100, Layout(EP_DP, tp=1, dp=16), weight_dtype="fp8", context_len=163_840)
    expert = 3 * 7168 * 2048  # one routed expert of one layer, fp8: a byte per parameter
    routed = 256 * 58 * expert
    rest = capacity.weight_bytes(f, "fp8") - routed  # attention, dense layers, shared, embeddings
    assert t.weight_bytes_per_gpu == rest + 16 * 58 * expert  # 256 experts / EP 16
    # TP 1: every DP rank keeps the whole latent of every layer for its own sequences.
    assert t.kv_bytes_per_token_per_gpu == 576 * 61 * 2 == 70_272
    usable = int(81_559 * 1024**2 * 0.9)
    blocks = (usable - t.weight_bytes_per_gpu - 2 * GIB) // (16 * 70_272)
    assert t.kv_tokens_per_rank == blocks * 16
    assert t.kv_token_capacity == 16 * blocks * 16
    assert t.sequences_per_rank == blocks // (163_840 // 16)
    assert t.max_concurrent_sequences == 16 * t.sequences_per_rank
    assert t.layout.ep == 16 and t.nodes == 2


def test_expert_parallel_rounds_uneven_experts_up() -> None:
    f = facts("deepseek-v3")
    t = fit(f, H100, Layout(EP_DP, tp=8, dp=3), weight_dtype="fp8", context_len=4096)
    expert = 3 * 7168 * 2048
    rest = capacity.weight_bytes(f, "fp8") - 256 * 58 * expert
    assert t.weight_bytes_per_gpu == math.ceil(rest / 8) + math.ceil(256 / 24) * 58 * expert


# --------------------------------------------------------------------------- the rules


def _cases() -> list[tuple[str, str, int]]:
    return [
        (name, gpu, concurrency)
        for name, gpu in itertools.product(MODELS, sorted(GPUS))
        for concurrency in (1, 8)
    ]


@pytest.mark.parametrize(("name", "gpu", "concurrency"), _cases())
def test_the_smallest_layout_that_fits_is_chosen(name: str, gpu: str, concurrency: int) -> None:
    f = facts(name)
    context = min(32_768, f.max_position_embeddings)
    options = {"context_len": context, "concurrency": concurrency}
    rec = recommend(f, GPUS[gpu], weight_dtype=dtype(name, gpu), max_nodes=6, **options)
    chosen = rec.chosen
    assert chosen is not None and chosen.fits
    size = (chosen.nodes, chosen.gpus)
    for layout in topology.layouts(f, GPUS[gpu], 6):
        if not topology.valid(f, layout):
            continue
        other = fit(f, GPUS[gpu], layout, weight_dtype=dtype(name, gpu), **options)
        if (other.nodes, other.gpus) < size:
            assert not other.fits, f"{layout} is smaller and fits"
        elif (other.nodes, other.gpus) == size and other.fits:
            assert other.max_concurrent_sequences <= chosen.max_concurrent_sequences


@pytest.mark.parametrize(("name", "gpu", "concurrency"), _cases())
def test_tensor_parallel_never_spans_nodes(name: str, gpu: str, concurrency: int) -> None:
    f = facts(name)
    per_node = GPUS[gpu].gpus_per_node
    context = min(32_768, f.max_position_embeddings)
    rec = recommend(
        f, GPUS[gpu], weight_dtype=dtype(name, gpu), max_nodes=6,
        context_len=context, concurrency=concurrency,
    )  # fmt: skip
    for t in rec.considered:
        assert t.layout.tp <= per_node
        if t.nodes > 1:  # whole nodes, one pod each, TP inside
            assert t.gpus == t.nodes * per_node == t.nodes * t.gpus_per_node
            assert t.layout.tp in (1, per_node)


@pytest.mark.parametrize("name", MODELS)
def test_fp8_is_never_chosen_on_a100(name: str) -> None:
    a100 = GPUS["A100-80GB"]
    assert dtype(name, "A100-80GB") == "bfloat16"
    rec = recommend(facts(name), a100, weight_dtype="bfloat16", max_nodes=4, context_len=1024)
    assert all(t.weight_dtype == "bfloat16" for t in rec.considered)
    with pytest.raises(ValueError, match="no fp8"):
        fit(facts(name), a100, Layout(TP, tp=1), weight_dtype="fp8", context_len=1024)


def test_more_concurrency_never_shrinks_the_topology() -> None:
    f = facts("llama-3.1-405b")
    sizes = []
    for concurrency in (1, 5, 6, 12, 20):
        rec = recommend(f, H100, weight_dtype="bfloat16", concurrency=concurrency)
        assert rec.chosen is not None
        sizes.append((rec.chosen.nodes, rec.chosen.gpus))
    assert sizes == sorted(sizes)
    assert sizes[:2] == [(2, 16), (2, 16)] and sizes[2] == (3, 24)  # 5 full sequences fit on 2


def test_nothing_fits_within_max_nodes() -> None:
    rec = recommend(facts("deepseek-v3"), H100, weight_dtype="fp8", max_nodes=1)
    assert rec.chosen is None
    assert rec.considered and not any(t.fits for t in rec.considered)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (dict(kind="ep-dp", tp=1, pp=2, dp=2), "pipeline stages"),
        (dict(kind="tp", tp=8, dp=2), "data-parallel"),
        (dict(kind="tp", tp=0), "at least 1"),
        (dict(kind="zigzag", tp=1), "unknown layout"),
    ],
)
def test_layouts_vllm_cannot_run_are_refused(layout: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout(**layout)  # type: ignore[arg-type]


def test_invalid_sizes_are_skipped() -> None:
    falcon = facts("falcon-7b")  # 71 heads: TP 1 only, so one node and no multi-node layouts
    rec = recommend(falcon, H100, weight_dtype="bfloat16", max_nodes=3, context_len=2048)
    assert {t.layout for t in rec.considered} == {Layout(TP, tp=1)}
    with pytest.raises(ValueError, match="mixture-of-experts"):
        fit(falcon, H100, Layout(EP_DP, tp=1, dp=2), weight_dtype="bfloat16")
