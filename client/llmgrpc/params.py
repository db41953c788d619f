"""Parameter counts of a decoder-only transformer, from its Hugging Face config.

`layout_from_config` reads the shape of the layers of each supported family into a
`Layout`; `count_parameters` is pure arithmetic over it. No framework is imported
and no weights are read; the counts match what `transformers` instantiates for the
supported families, to the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ATTENTION_STANDARD = "standard"  # separate Q/K/V/O projections (MHA, GQA, MQA)
ATTENTION_MLA = "mla"  # DeepSeek multi-head latent attention
MLP_GATED = "gated"  # SwiGLU: gate, up, down
MLP_PLAIN = "plain"  # up, activation, down
NORM_RMS = "rms"  # weight only
NORM_LAYER = "layer"  # weight and bias


@dataclass(frozen=True)
class MlaDims:
    """DeepSeek MLA projection sizes; `q_lora_rank` 0 means Q is not compressed."""

    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        if min(self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim) <= 0:
            raise ValueError(f"MLA dimensions must be positive: {self}")
        if min(self.q_lora_rank, self.qk_nope_head_dim) < 0:
            raise ValueError(f"MLA dimensions must not be negative: {self}")

    @property
    def latent_size(self) -> int:
        """Elements one token's cache holds per layer: the compressed KV plus the RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoeLayout:
    """The mixture-of-experts part of a model; `num_moe_layers` of its layers are sparse."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    num_moe_layers: int
    # Shared experts run for every token; DeepSeek's fold into one MLP this wide.
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    # Qwen2-MoE scales its shared expert by a learned sigmoid gate (hidden -> 1).
    shared_expert_gate: bool = False
    # DeepSeek-V3's aux-loss-free routing keeps a bias per expert.
    router_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_experts <= 0 or not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"experts_per_token {self.experts_per_token} must be in 1..{self.num_experts}"
            )
        if self.expert_intermediate_size <= 0 or self.num_moe_layers < 0:
            raise ValueError(f"invalid MoE layout: {self}")
        if (self.num_shared_experts > 0) != (self.shared_intermediate_size > 0):
            raise ValueError("shared experts need a width, and a width needs shared experts")


@dataclass(frozen=True)
class Layout:
    """Everything parameter counting needs to know about a model's shape."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # width of the dense MLP layers
    attention: str = ATTENTION_STANDARD
    mla: MlaDims | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each Q and K head
    mlp: str = MLP_GATED
    mlp_bias: bool = False
    norm: str = NORM_RMS
    norms_per_layer: int = 2
    learned_positions: int = 0  # rows of a learned position table (GPT-2), else 0
    tie_word_embeddings: bool = False
    moe: MoeLayout | None = None

    def __post_init__(self) -> None:
        sizes = (self.hidden_size, self.num_layers, self.vocab_size, self.num_attention_heads)
        if min(sizes) <= 0 or min(self.num_kv_heads, self.head_dim) <= 0:
            raise ValueError(f"layout sizes must be positive: {self}")
        if self.attention not in (ATTENTION_STANDARD, ATTENTION_MLA):
            raise ValueError(f"unknown attention {self.attention!r}")
        if (self.attention == ATTENTION_MLA) != (self.mla is not None):
            raise ValueError("MLA attention needs MlaDims, and only MLA has them")
        if self.mlp not in (MLP_GATED, MLP_PLAIN) or self.norm not in (NORM_RMS, NORM_LAYER):
            raise ValueError(f"unknown MLP {self.mlp!r} or norm {self.norm!r}")
        if self.moe is not None and self.moe.num_moe_layers > self.num_layers:
            raise ValueError("more MoE layers than layers")
        dense_layers = self.num_layers - (self.moe.num_moe_layers if self.moe else 0)
        if dense_layers and self.intermediate_size <= 0:
            raise ValueError("dense MLP layers need a positive intermediate_size")


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of the whole model, and of the part one token runs through."""

    total: int
    active: int
    embedding: int  # input token table, plus a learned position table if any
    lm_head: int  # 0 when tied to the input embedding

    def __post_init__(self) -> None:
        if not 0 < self.active <= self.total:
            raise ValueError(f"active {self.active} must be in 1..total {self.total}")


def count_parameters(layout: Layout) -> ParameterCount:
    """Total and per-token parameters: attention, MLP or experts, norms, embeddings, head."""
    h = layout.hidden_size
    per_layer = _attention(layout) + layout.norms_per_layer * _norm(layout.norm, h)
    dense_mlp = _mlp(layout.mlp, h, layout.intermediate_size, layout.mlp_bias)
    moe_layers = layout.moe.num_moe_layers if layout.moe else 0
    dense_layers = layout.num_layers - moe_layers
    body_total = layout.num_layers * per_layer + dense_layers * dense_mlp
    body_active = body_total
    if layout.moe is not None:
        moe_total, moe_active = _moe(layout.moe, h)
        body_total += moe_layers * moe_total
        body_active += moe_layers * moe_active
    embedding = (layout.vocab_size + layout.learned_positions) * h
    lm_head = 0 if layout.tie_word_embeddings else layout.vocab_size * h
    rest = embedding + lm_head + _norm(layout.norm, h)  # the final norm
    return ParameterCount(
        total=body_total + rest, active=body_active + rest, embedding=embedding, lm_head=lm_head
    )


def _norm(kind: str, width: int) -> int:
    return width if kind == NORM_RMS else 2 * width


def _linear(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _attention(layout: Layout) -> int:
    h = layout.hidden_size
    heads = layout.num_attention_heads
    if layout.mla is not None:
        return _mla_attention(layout.mla, h, heads)
    q = heads * layout.head_dim
    kv = layout.num_kv_heads * layout.head_dim
    qk_norm = 2 * layout.head_dim if layout.qk_norm else 0
    return (
        _linear(h, q, layout.qkv_bias)
        + 2 * _linear(h, kv, layout.qkv_bias)
        + _linear(q, h, layout.o_bias)
        + qk_norm
    )


def _mla_attention(mla: MlaDims, h: int, heads: int) -> int:
    qk_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    if mla.q_lora_rank:
        # q_a_proj, its RMSNorm, q_b_proj
        q = h * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * heads * qk_head
    else:
        q = h * heads * qk_head
    kv_a = h * mla.latent_size + mla.kv_lora_rank  # kv_a_proj_with_mqa and kv_a_layernorm
    kv_b = mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    o = heads * mla.v_head_dim * h
    return q + kv_a + kv_b + o


def _mlp(kind: str, h: int, width: int, bias: bool) -> int:
    if width == 0:
        return 0
    if kind == MLP_GATED:
        return 2 * _linear(h, width, bias) + _linear(width, h, bias)
    return _linear(h, width, bias) + _linear(width, h, bias)


def _moe(moe: MoeLayout, h: int) -> tuple[int, int]:
    """(total, active) parameters of one sparse layer's MLP block."""
    expert = _mlp(MLP_GATED, h, moe.expert_intermediate_size, bias=False)
    always = h * moe.num_experts  # the router runs for every token
    always += moe.num_experts if moe.router_bias else 0
    always += _mlp(MLP_GATED, h, moe.shared_intermediate_size, bias=False)
    always += h if moe.shared_expert_gate else 0
    return moe.num_experts * expert + always, moe.experts_per_token * expert + always


# --- reading a layout from a Hugging Face config --------------------------------------------

LLAMA_LIKE = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
FALCON = ("falcon",)
GPT2 = ("gpt2", "gpt_bigcode")
SUPPORTED_MODEL_TYPES = LLAMA_LIKE + DEEPSEEK + FALCON + GPT2


class UnsupportedArchitecture(ValueError):
    """The config describes a model whose serving cost this planner cannot compute honestly."""


def layout_from_config(c: Mapping[str, Any], model_type: str) -> Layout:
    """The layer layout of a (text) config whose `model_type` is supported."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported by the capacity planner; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type in DEEPSEEK:
        return _deepseek_layout(c)
    if model_type in FALCON:
        return _falcon_layout(c)
    if model_type in GPT2:
        return _gpt2_layout(c, model_type)
    return _llama_layout(c, model_type)


def _llama_layout(c: Mapping[str, Any], model_type: str) -> Layout:
    h, heads = config_int(c, "hidden_size"), config_int(c, "num_attention_heads")
    layers = config_int(c, "num_hidden_layers")
    qwen2 = model_type.startswith("qwen2")
    attention_bias = bool(c.get("attention_bias", False))
    return Layout(
        hidden_size=h,
        num_layers=layers,
        vocab_size=config_int(c, "vocab_size"),
        num_attention_heads=heads,
        num_kv_heads=config_int(c, "num_key_value_heads", default=heads),
        head_dim=_head_dim(c, h, heads),
        intermediate_size=config_int(c, "intermediate_size"),
        qkv_bias=qwen2 or attention_bias,  # Qwen2 always biases Q, K and V
        o_bias=attention_bias and not qwen2,
        qk_norm=model_type.startswith("qwen3"),
        mlp_bias=bool(c.get("mlp_bias", False)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings") or False),
        moe=_llama_moe(c, model_type, layers),
    )


def _llama_moe(c: Mapping[str, Any], model_type: str, layers: int) -> MoeLayout | None:
    if model_type == "mixtral":
        return MoeLayout(
            num_experts=config_int(c, "num_local_experts"),
            experts_per_token=config_int(c, "num_experts_per_tok"),
            expert_intermediate_size=config_int(c, "intermediate_size"),
            num_moe_layers=layers,
        )
    if model_type not in ("qwen2_moe", "qwen3_moe"):
        return None
    step = config_int(c, "decoder_sparse_step", default=1)
    dense_only = set(c.get("mlp_only_layers") or ())
    shared = config_int(c, "shared_expert_intermediate_size", default=0)
    return MoeLayout(
        num_experts=config_int(c, "num_experts"),
        experts_per_token=config_int(c, "num_experts_per_tok"),
        expert_intermediate_size=config_int(c, "moe_intermediate_size"),
        num_moe_layers=sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0),
        num_shared_experts=1 if shared else 0,
        shared_intermediate_size=shared,
        shared_expert_gate=bool(shared),
    )


def _deepseek_layout(c: Mapping[str, Any]) -> Layout:
    if c.get("attention_bias"):
        raise UnsupportedArchitecture("DeepSeek attention with biases is not supported")
    h, layers = config_int(c, "hidden_size"), config_int(c, "num_hidden_layers")
    heads = config_int(c, "num_attention_heads")
    mla = MlaDims(
        q_lora_rank=config_int(c, "q_lora_rank", default=0),
        kv_lora_rank=config_int(c, "kv_lora_rank"),
        qk_nope_head_dim=config_int(c, "qk_nope_head_dim"),
        qk_rope_head_dim=config_int(c, "qk_rope_head_dim"),
        v_head_dim=config_int(c, "v_head_dim"),
    )
    moe = None
    experts = config_int(c, "n_routed_experts", default=0)
    if experts:
        first_dense = config_int(c, "first_k_dense_replace", default=0)
        freq = config_int(c, "moe_layer_freq", default=1)
        width = config_int(c, "moe_intermediate_size")
        shared = config_int(c, "n_shared_experts", default=0)
        moe = MoeLayout(
            num_experts=experts,
            experts_per_token=config_int(c, "num_experts_per_tok"),
            expert_intermediate_size=width,
            num_moe_layers=sum(1 for i in range(first_dense, layers) if i % freq == 0),
            num_shared_experts=shared,
            shared_intermediate_size=shared * width,
            router_bias=c.get("topk_method") == "noaux_tc",
        )
    return Layout(
        hidden_size=h,
        num_layers=layers,
        vocab_size=config_int(c, "vocab_size"),
        num_attention_heads=heads,
        num_kv_heads=heads,
        head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        intermediate_size=config_int(c, "intermediate_size"),
        attention=ATTENTION_MLA,
        mla=mla,
        tie_word_embeddings=bool(c.get("tie_word_embeddings") or False),
        moe=moe,
    )


def _falcon_layout(c: Mapping[str, Any]) -> Layout:
    h, heads = config_int(c, "hidden_size"), config_int(c, "num_attention_heads", "n_head")
    new_arch = bool(c.get("new_decoder_architecture", False))
    if new_arch:
        kv_heads = config_int(c, "num_kv_heads", default=heads)
    else:
        kv_heads = 1 if c.get("multi_query", True) else heads
    parallel = bool(c.get("parallel_attn", True))
    two_norms = c.get("num_ln_in_parallel_attn") == 2 or (
        new_arch and c.get("num_ln_in_parallel_attn") is None
    )
    bias = bool(c.get("bias", False))
    return Layout(
        hidden_size=h,
        num_layers=config_int(c, "num_hidden_layers", "n_layer"),
        vocab_size=config_int(c, "vocab_size"),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_head_dim(c, h, heads),
        intermediate_size=config_int(c, "ffn_hidden_size", default=4 * h),
        qkv_bias=bias,
        o_bias=bias,
        mlp=MLP_PLAIN,
        mlp_bias=bias,
        norm=NORM_LAYER,
        norms_per_layer=2 if not parallel or two_norms else 1,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


def _gpt2_layout(c: Mapping[str, Any], model_type: str) -> Layout:
    h = config_int(c, "n_embd", "hidden_size")
    heads = config_int(c, "n_head", "num_attention_heads")
    multi_query = model_type == "gpt_bigcode" and bool(c.get("multi_query", True))
    return Layout(
        hidden_size=h,
        num_layers=config_int(c, "n_layer", "num_hidden_layers"),
        vocab_size=config_int(c, "vocab_size"),
        num_attention_heads=heads,
        num_kv_heads=1 if multi_query else heads,
        head_dim=_head_dim(c, h, heads),
        intermediate_size=config_int(c, "n_inner", default=4 * h),
        qkv_bias=True,
        o_bias=True,
        mlp=MLP_PLAIN,
        mlp_bias=True,
        norm=NORM_LAYER,
        learned_positions=config_int(c, "n_positions", "max_position_embeddings"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


def _head_dim(c: Mapping[str, Any], hidden: int, heads: int) -> int:
    if c.get("head_dim") is not None:
        return config_int(c, "head_dim")
    if hidden % heads:
        raise UnsupportedArchitecture(f"hidden_size {hidden} does not split into {heads} heads")
    return hidden // heads


def config_int(c: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    """The first of `keys` that is set, as an int; `default` when none is."""
    for key in keys:
        value = c.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UnsupportedArchitecture(f"{key} must be a non-negative integer, got {value!r}")
        return value
    if default is None:
        raise UnsupportedArchitecture(f"config has no {' or '.join(keys)}")
    return default
