"""The capacity planner against published figures and hand-worked arithmetic.

Exact parameter totals below were checked once against `transformers` building each
model on the meta device; the published figures (46.7B, 12.9B, ...) are the vendors'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from llmgrpc import capacity
from llmgrpc.capacity import UnsupportedArchitecture, facts_from_config, load_config, plan

GIB = 1024**3

# name: (model_type, attention, heads, kv_heads, head_dim, layers, total, active, bf16 KV B/token)
BUILTINS: dict[str, tuple[str, str, int, int, int, int, int, int, int]] = {
    "llama-3.1-8b": ("llama", "GQA", 32, 8, 128, 32, 8_030_261_248, 8_030_261_248, 131_072),
    "llama-3.1-70b": ("llama", "GQA", 64, 8, 128, 80, 70_553_706_496, 70_553_706_496, 327_680),
    "mistral-7b": ("mistral", "GQA", 32, 8, 128, 32, 7_241_732_096, 7_241_732_096, 131_072),
    "mixtral-8x7b": ("mixtral", "GQA", 32, 8, 128, 32, 46_702_792_704, 12_879_925_248, 131_072),
    "qwen3-30b-a3b": ("qwen3_moe", "GQA", 32, 4, 128, 48, 30_532_122_624, 3_353_032_704, 98_304),
    # MLA: one 512 + 64 latent per layer, shared by all 16 heads
    "deepseek-v2-lite": (
        "deepseek_v2",
        "MLA",
        16,
        1,
        576,
        27,
        15_706_484_224,
        2_661_150_208,
        31_104,
    ),
    # 61 layers x one 512 + 64 latent (vLLM: head_size kv_lora_rank + qk_rope_head_dim,
    # one KV head, no separate V) x 2 bytes
    "deepseek-v3": (
        "deepseek_v3",
        "MLA",
        128,
        1,
        576,
        61,
        671_026_419_200,
        37_552_297_472,
        70_272,
    ),
    "llama-3.1-405b": (
        "llama",
        "GQA",
        128,
        8,
        128,
        126,
        405_853_388_800,
        405_853_388_800,
        516_096,
    ),
    "falcon-7b": ("falcon", "MQA", 71, 1, 64, 32, 6_921_720_704, 6_921_720_704, 8_192),
    "llama-2-7b": ("llama", "MHA", 32, 32, 128, 32, 6_738_415_616, 6_738_415_616, 524_288),
    "gpt2": ("gpt2", "MHA", 12, 12, 64, 12, 124_439_808, 124_439_808, 36_864),
    "tiny-llama-gqa": ("llama", "GQA", 4, 2, 64, 2, 1_443_072, 1_443_072, 1_024),
    # the embedded default: 134,515,008 is what transformers counts on the
    # converted checkpoint (tied embeddings once)
    "smollm2-135m-instruct": ("llama", "GQA", 9, 3, 64, 30, 134_515_008, 134_515_008, 23_040),
    "tiny-mixtral-moe": ("mixtral", "GQA", 4, 2, 64, 2, 2_231_552, 1_445_120, 1_024),
}

# Vendors' rounded figures: (total, active) in billions; DeepSeek's active leaves out the
# input embedding, so it is compared with active - embedding_parameters.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),
    "llama-3.1-8b": (8.03, 8.03),
    "llama-3.1-70b": (70.6, 70.6),
    "mistral-7b": (7.24, 7.24),
    "qwen3-30b-a3b": (30.5, 3.3),
    "deepseek-v2-lite": (15.7, 2.4),
    # DeepSeek: 671B total, 36.6B activated counting the output head but not the
    # embedding (README_WEIGHTS.md); Meta: 405B (405.85B in the safetensors index)
    "deepseek-v3": (671.0, 36.6),
    "llama-3.1-405b": (405.85, 405.85),
}


def facts(name: str) -> capacity.ArchitectureFacts:
    return facts_from_config(load_config(name))


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_facts(name: str) -> None:
    model_type, kind, heads, kv_heads, head_dim, layers, total, active, kv = BUILTINS[name]
    f = facts(name)
    assert (f.model_type, f.attention_kind) == (model_type, kind)
    assert (f.num_attention_heads, f.num_kv_heads, f.head_dim) == (heads, kv_heads, head_dim)
    assert f.num_layers == layers
    assert f.gqa_group_size == heads // kv_heads
    assert (f.total_parameters, f.active_parameters) == (total, active)
    assert f.kv_cache_bytes_per_token("bfloat16") == kv
    assert f.kv_cache_bytes_per_token("auto") == kv
    assert f.kv_cache_bytes_per_token("fp8") == kv // 2


def test_builtin_configs_are_all_shipped() -> None:
    assert set(capacity.builtin_configs()) == set(BUILTINS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_figures(name: str) -> None:
    total_b, active_b = PUBLISHED[name]
    f = facts(name)
    active = f.active_parameters
    if name.startswith("deepseek"):
        active -= f.embedding_parameters
    tolerance = 0.01 if total_b < 10 else 0.1
    assert f.total_parameters / 1e9 == pytest.approx(total_b, abs=tolerance)
    assert active / 1e9 == pytest.approx(active_b, abs=tolerance)


def test_llama_70b_kv_cache_is_327680_bytes_per_token() -> None:
    # 2 (K and V) x 8 KV heads x 128 head_dim x 80 layers x 2 bytes
    assert facts("llama-3.1-70b").kv_cache_bytes_per_token("bfloat16") == 327_680


@pytest.mark.parametrize(
    ("name", "experts", "per_token", "shared", "moe_layers"),
    [
        ("mixtral-8x7b", 8, 2, 0, 32),
        ("qwen3-30b-a3b", 128, 8, 0, 48),
        ("deepseek-v2-lite", 64, 6, 2, 26),  # first_k_dense_replace = 1
        ("deepseek-v3", 256, 8, 1, 58),  # first_k_dense_replace = 3
        ("tiny-mixtral-moe", 4, 2, 0, 2),
        ("llama-3.1-8b", 0, 0, 0, 0),
    ],
)
def test_experts(name: str, experts: int, per_token: int, shared: int, moe_layers: int) -> None:
    f = facts(name)
    assert (f.num_experts, f.experts_per_token) == (experts, per_token)
    assert (f.num_shared_experts, f.num_moe_layers) == (shared, moe_layers)
    assert (f.active_parameters < f.total_parameters) == bool(experts)


def test_multi_query_model_has_one_kv_head() -> None:
    f = facts("falcon-7b")
    assert (f.attention_kind, f.num_kv_heads, f.gqa_group_size) == ("MQA", 1, 71)
    assert f.max_position_embeddings == 2048  # FalconConfig's default: the key is absent


@pytest.mark.parametrize("name", ["llama-2-7b", "gpt2"])
def test_mha_models_have_as_many_kv_heads_as_heads(name: str) -> None:
    f = facts(name)
    assert f.attention_kind == "MHA"
    assert f.num_kv_heads == f.num_attention_heads
    assert f.gqa_group_size == 1


@pytest.mark.parametrize(
    ("name", "position", "theta"),
    [
        ("llama-3.1-8b", "rope", 500_000.0),
        ("mixtral-8x7b", "rope", 1_000_000.0),
        ("llama-2-7b", "rope", 10_000.0),  # no rope_theta key: the transformers default
        ("tiny-llama-gqa", "rope", 10_000.0),  # transformers 5: inside rope_parameters
        ("gpt2", "learned", None),
    ],
)
def test_position_encoding(name: str, position: str, theta: float | None) -> None:
    f = facts(name)
    assert (f.position_encoding, f.rope_theta) == (position, theta)


def test_rope_theta_in_rope_parameters_wins_over_default() -> None:
    config = load_config("tiny-llama-gqa")
    config["rope_parameters"] = {"rope_theta": 123_456.0, "rope_type": "default"}
    assert facts_from_config(config).rope_theta == 123_456.0
    config["rope_parameters"] = {"full_attention": {"rope_theta": 5e5}}  # per layer type
    assert facts_from_config(config).rope_theta == 5e5


def test_mistral_sliding_window_caps_the_kv_of_a_sequence() -> None:
    f = facts("mistral-7b")
    per_token = f.kv_cache_bytes_per_token("bfloat16")
    assert (f.sliding_window, f.num_sliding_window_layers) == (4096, 32)
    assert f.kv_cache_bytes(1000) == 1000 * per_token
    assert f.kv_cache_bytes(4096) == 4096 * per_token
    assert f.kv_cache_bytes(32_768) == 4096 * per_token  # not 32,768 tokens' worth
    assert any("sliding window" in note for note in f.notes)


def test_full_attention_kv_grows_with_the_whole_context() -> None:
    f = facts("mixtral-8x7b")  # sliding_window: null
    assert f.sliding_window is None and f.num_sliding_window_layers == 0
    assert f.kv_cache_bytes(32_768) == 32_768 * 131_072


def test_some_sliding_layers_cap_only_their_share() -> None:
    config = load_config("tiny-llama-gqa")
    config |= {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 100}
    f = facts_from_config(config)
    per_layer = f.kv_cache_bytes_per_layer_token()
    assert (f.sliding_window, f.num_sliding_window_layers) == (100, 1)
    assert f.kv_cache_bytes(1000) == per_layer * (100 + 1000)


@pytest.mark.parametrize(("use", "expected"), [(True, (4096, 8)), (False, (None, 0))])
def test_qwen_slides_only_when_asked_and_above_max_window_layers(
    use: bool, expected: tuple[int | None, int]
) -> None:
    config = load_config("qwen3-30b-a3b")
    config |= {"use_sliding_window": use, "sliding_window": 4096, "max_window_layers": 40}
    f = facts_from_config(config)
    assert (f.sliding_window, f.num_sliding_window_layers) == expected


def test_deepseek_mla_caches_its_latent() -> None:
    f = facts("deepseek-v2-lite")
    assert f.attention_kind == "MLA"
    assert f.mla is not None
    assert (f.mla.kv_lora_rank, f.mla.qk_rope_head_dim, f.mla.latent_size) == (512, 64, 576)
    assert f.kv_cache_bytes_per_token("bfloat16") == (512 + 64) * 27 * 2
    assert f.kv_cache_bytes_per_token("fp8") == (512 + 64) * 27
    # Caching K (192) and V (128) for each of its 16 heads would cost almost 9x as much.
    per_head_kv = 27 * 16 * (192 + 128) * 2
    assert per_head_kv // f.kv_cache_bytes_per_token() == 8


def test_head_dim_is_read_before_it_is_derived() -> None:
    assert facts("qwen3-30b-a3b").head_dim == 128  # 2048 / 32 would say 64
    config = load_config("tiny-llama-gqa")
    del config["head_dim"]
    assert facts_from_config(config).head_dim == 256 // 4


def test_multimodal_wrapper_reads_its_text_config() -> None:
    text = load_config("llama-3.1-8b")
    wrapper = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024},
    }
    f = facts_from_config(wrapper)
    plain = facts("llama-3.1-8b")
    assert f.kv_cache_bytes_per_token() == plain.kv_cache_bytes_per_token()
    assert f.total_parameters == plain.total_parameters
    assert any("language model only" in note for note in f.notes)


def _tweak(name: str, **changes: Any) -> dict[str, Any]:
    config = load_config(name)
    config.update(changes)
    return config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_tweak("llama-3.1-8b", model_type="mamba"), "not supported"),
        ({"model_type": "llama", "num_hidden_layers": 2}, "hidden_size"),
        (
            _tweak("tiny-llama-gqa", layer_types=["linear_attention", "full_attention"]),
            "linear_attention",
        ),
        (_tweak("tiny-llama-gqa", layer_types=["sliding_attention"] * 2), "sliding_window"),
        (_tweak("tiny-llama-gqa", num_attention_heads=4, num_key_value_heads=3), "KV groups"),
        (_tweak("deepseek-v2-lite", kv_lora_rank=None), "kv_lora_rank"),
        (_tweak("tiny-llama-gqa", hidden_size="256"), "integer"),
    ],
)
def test_unsupported_configs_raise_clearly(config: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedArchitecture, match=message):
        facts_from_config(config)


def test_unknown_kv_dtype_raises() -> None:
    with pytest.raises(ValueError, match="KV cache dtype"):
        facts("gpt2").kv_cache_bytes_per_token("int3")


# --- weights and plans ----------------------------------------------------------------------


def test_weight_bytes_per_dtype_keep_embeddings_in_16_bits() -> None:
    f = facts("llama-3.1-8b")
    kept = f.embedding_parameters + f.lm_head_parameters
    assert kept == 2 * 128_256 * 4096
    rest = f.total_parameters - kept
    assert capacity.weight_bytes(f, "bfloat16") == 2 * f.total_parameters
    assert capacity.weight_bytes(f, "fp16") == 2 * f.total_parameters
    assert capacity.weight_bytes(f, "fp8") == rest + 2 * kept
    assert capacity.weight_bytes(f, "int8") == rest + 2 * kept
    assert capacity.weight_bytes(f, "int4") == math.ceil(rest / 2) + 2 * kept


def test_plan_by_hand_on_the_tiny_model() -> None:
    f = facts("tiny-llama-gqa")
    p = plan(f, gpu_memory_gib=1, gpu_memory_utilization=0.5, overhead_gib=0, block_size=128)
    usable = GIB // 2
    kv_memory = usable - 2 * 1_443_072
    blocks = kv_memory // (128 * 1024)
    assert (p.usable_bytes_per_gpu, p.kv_memory_per_gpu) == (usable, kv_memory)
    assert (p.num_blocks, p.kv_token_capacity) == (blocks, blocks * 128)
    assert p.context_len == 2048  # max_position_embeddings
    assert p.max_concurrent_sequences == blocks // (2048 // 128)
    assert p.fits and p.shortfall_bytes == 0


def test_engine_cache_of_the_tiny_model_in_docs() -> None:
    # docs/capacity.md: 64 MiB of cache at 1,024 B/token = 65,536 tokens = 512 blocks of 128.
    per_token = facts("tiny-llama-gqa").kv_cache_bytes_per_token("auto")
    assert per_token == 1024
    assert (64 * 2**20 // per_token, 64 * 2**20 // per_token // 128) == (65_536, 512)


def test_llama_70b_on_two_80gb_gpus() -> None:
    f = facts("llama-3.1-70b")
    short = plan(f, gpu_memory_gib=80, num_gpus_tp=2)  # the full 131,072-token context
    weights_per_gpu = 70_553_706_496  # 141.1 GB of bf16 over two ranks
    per_sequence = 131_072 * 327_680 // 2
    usable = int(80 * GIB * 0.9)
    assert short.weight_bytes_per_gpu == weights_per_gpu
    assert short.kv_bytes_per_token_per_gpu == 163_840
    assert short.kv_bytes_per_sequence_per_gpu == per_sequence
    assert not short.fits and short.max_concurrent_sequences == 0
    assert short.shortfall_bytes == weights_per_gpu + 2 * GIB + per_sequence - usable

    ok = plan(f, gpu_memory_gib=80, num_gpus_tp=2, context_len=8192)
    assert ok.fits and ok.shortfall_bytes == 0
    kv_memory = usable - weights_per_gpu - 2 * GIB
    assert ok.kv_token_capacity == kv_memory // (16 * 163_840) * 16
    assert ok.max_concurrent_sequences == ok.kv_token_capacity // 8192


def test_weights_that_do_not_fit_leave_no_kv_cache() -> None:
    p = plan(facts("llama-3.1-70b"), gpu_memory_gib=80)
    assert p.kv_memory_per_gpu == 0 and p.kv_token_capacity == 0
    assert not p.fits and p.shortfall_bytes > p.weight_bytes_per_gpu - p.usable_bytes_per_gpu


@pytest.mark.parametrize(
    ("name", "tp", "heads_per_gpu", "per_token_per_gpu"),
    [
        ("llama-3.1-70b", 1, 8, 327_680),
        ("llama-3.1-70b", 2, 4, 163_840),
        ("llama-3.1-70b", 8, 1, 40_960),
        ("llama-3.1-70b", 16, 1, 40_960),  # 8 KV heads over 16 ranks: each one twice
        ("qwen3-30b-a3b", 8, 1, 98_304 // 4),
        ("deepseek-v2-lite", 4, 1, 31_104),  # the latent is replicated on every rank
        ("gpt2", 4, 3, 36_864 // 4),
    ],
)
def test_tensor_parallel_splits_kv_heads(
    name: str, tp: int, heads_per_gpu: int, per_token_per_gpu: int
) -> None:
    p = plan(facts(name), gpu_memory_gib=80, num_gpus_tp=tp, context_len=1024)
    assert (p.kv_heads_per_gpu, p.kv_bytes_per_token_per_gpu) == (heads_per_gpu, per_token_per_gpu)
    assert p.weight_bytes_per_gpu == math.ceil(p.weight_bytes / tp)


@pytest.mark.parametrize(
    ("name", "tp", "message"),
    [
        ("falcon-7b", 2, "71 attention heads"),
        ("llama-3.1-70b", 3, "attention heads"),
        ("llama-3.1-70b", 0, "at least 1"),
    ],
)
def test_tensor_parallel_sizes_vllm_refuses(name: str, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(facts(name), gpu_memory_gib=80, num_gpus_tp=tp)


def test_plan_rejects_impossible_requests() -> None:
    f = facts("mistral-7b")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        plan(f, gpu_memory_gib=80, context_len=32_769)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        plan(f, gpu_memory_gib=80, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="weight dtype"):
        plan(f, gpu_memory_gib=80, weight_dtype="int2")


def test_sliding_window_plan_holds_more_long_sequences() -> None:
    mistral = plan(facts("mistral-7b"), gpu_memory_gib=80, context_len=32_768)
    assert mistral.kv_bytes_per_sequence_per_gpu == 4096 * 131_072
    assert mistral.max_concurrent_sequences == mistral.num_blocks // (4096 // 16)


@pytest.mark.parametrize("name", sorted(BUILTINS))
@pytest.mark.parametrize("gib", [0.5, 24, 80])
@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
def test_plan_invariants(name: str, gib: float, dtype: str) -> None:
    f = facts(name)
    p = plan(f, gpu_memory_gib=gib, weight_dtype=dtype, context_len=1024)
    assert p.fits == (p.max_concurrent_sequences >= 1) == (p.shortfall_bytes == 0)
    assert p.kv_token_capacity == p.num_blocks * p.block_size
    assert p.kv_token_capacity * p.kv_bytes_per_token_per_gpu <= p.kv_memory_per_gpu
    assert p.kv_memory_per_gpu <= p.usable_bytes_per_gpu
    bigger = plan(f, gpu_memory_gib=gib * 2, weight_dtype=dtype, context_len=1024)
    assert bigger.kv_token_capacity >= p.kv_token_capacity


# --- loading configs --------------------------------------------------------------------------

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False, "vocab_size": 512, "dtype": "bfloat16", "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "attention_bias": False, "mlp_bias": False,
    "hidden_act": "silu",
}  # fmt: skip


def test_tiny_configs_are_the_embedded_models() -> None:
    assert load_config("tiny-llama-gqa") == TINY_LLAMA
    moe = {k: v for k, v in TINY_LLAMA.items() if k not in ("attention_bias", "mlp_bias")}
    moe |= {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": None,
    }  # fmt: skip
    assert load_config("tiny-mixtral-moe") == moe


def test_load_config_from_a_file_or_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert load_config(str(tmp_path)) == TINY_LLAMA
    assert load_config(str(tmp_path / "config.json")) == TINY_LLAMA


def test_load_config_names_the_builtins_when_nothing_matches(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="mixtral-8x7b"):
        load_config("no-such-model")
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path))  # a directory without config.json
