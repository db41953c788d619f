"""Architecture facts from a Hugging Face `config.json`: what a model costs to serve.

Pure functions over the config dict (stdlib only, no torch/vLLM/transformers):
`facts_from_config` reads the attention kind, parameters and KV cache bytes per
token. The server's GetModelInfo needs only this module; the planner
(`capacity.plan`) builds on it. A config this module cannot price honestly
raises `UnsupportedArchitecture` rather than getting a plausible wrong answer.
docs/capacity.md has the formulas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmgrpc import params
from llmgrpc.params import (
    FALCON,
    GPT2,
    SUPPORTED_MODEL_TYPES,
    MlaDims,
    UnsupportedArchitecture,
    config_int,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureFacts",
    "UnsupportedArchitecture",
    "facts_from_config",
    "kv_dtype_bytes",
    "weight_bits",
    "weight_bytes",
]

KV_DTYPE_BYTES: dict[str, int] = {
    "auto": 2,  # the model's dtype; the planner assumes a 16-bit model
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,  # vLLM's CPU backend keeps the KV cache in the model's dtype
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "int8": 1,
}
WEIGHT_DTYPE_BITS: dict[str, int] = {"bfloat16": 16, "float16": 16, "fp8": 8, "int8": 8, "int4": 4}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}

ATTENTION_KINDS = ("MHA", "GQA", "MQA", "MLA")
POSITION_ENCODINGS = ("rope", "alibi", "learned", "none")


@dataclass(frozen=True)
class ArchitectureFacts:
    """What a model's architecture costs to serve. MLA reports vLLM's view of it:
    one shared latent "KV head" of size kv_lora_rank + qk_rope_head_dim."""

    model_type: str
    architectures: tuple[str, ...]
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    attention_kind: str
    gqa_group_size: int  # query heads per KV head
    position_encoding: str
    rope_theta: float | None
    sliding_window: int | None
    num_sliding_window_layers: int
    num_experts: int
    experts_per_token: int
    num_shared_experts: int
    moe_intermediate_size: int
    num_moe_layers: int
    total_parameters: int
    active_parameters: int
    embedding_parameters: int
    lm_head_parameters: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    mla: MlaDims | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.attention_kind not in ATTENTION_KINDS:
            raise ValueError(f"attention_kind {self.attention_kind!r} not in {ATTENTION_KINDS}")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding {self.position_encoding!r} is unknown")
        if (self.attention_kind == "MLA") != (self.mla is not None):
            raise ValueError("MLA facts need MlaDims, and only MLA has them")
        if self.num_kv_heads * self.gqa_group_size != self.num_attention_heads:
            raise ValueError("gqa_group_size * num_kv_heads must equal num_attention_heads")
        if not 0 <= self.num_sliding_window_layers <= self.num_layers:
            raise ValueError("num_sliding_window_layers must be in 0..num_layers")
        if (self.sliding_window is None) != (self.num_sliding_window_layers == 0):
            raise ValueError("a sliding window needs sliding layers, and they need a window")
        if self.max_position_embeddings <= 0:
            raise ValueError("max_position_embeddings must be positive")

    def kv_cache_bytes_per_layer_token(self, kv_dtype: str = "bfloat16") -> int:
        """Bytes one token adds to one layer's cache (all KV heads, before TP splits them)."""
        size = kv_dtype_bytes(kv_dtype)
        if self.mla is not None:
            return self.mla.latent_size * size  # one latent serves as K and V
        return 2 * self.num_kv_heads * self.head_dim * size

    def kv_cache_bytes_per_token(self, kv_dtype: str = "bfloat16") -> int:
        """Bytes one token costs across all layers while it is inside every window."""
        return self.kv_cache_bytes_per_layer_token(kv_dtype) * self.num_layers

    def kv_cache_bytes(self, context_len: int, kv_dtype: str = "bfloat16") -> int:
        """Bytes one sequence of `context_len` tokens holds: a sliding layer keeps at most
        `sliding_window` of them."""
        if context_len < 0:
            raise ValueError(f"context_len must not be negative, got {context_len}")
        full_layers = self.num_layers - self.num_sliding_window_layers
        held = full_layers * context_len
        if self.sliding_window is not None:
            held += self.num_sliding_window_layers * min(context_len, self.sliding_window)
        return self.kv_cache_bytes_per_layer_token(kv_dtype) * held


def kv_dtype_bytes(kv_dtype: str) -> int:
    name = _DTYPE_ALIASES.get(kv_dtype, kv_dtype)
    if name not in KV_DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; use one of {list(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[name]


def weight_bits(weight_dtype: str) -> int:
    """Bits per parameter of a linear layer's weight in `weight_dtype`."""
    name = _DTYPE_ALIASES.get(weight_dtype, weight_dtype)
    if name not in WEIGHT_DTYPE_BITS:
        raise ValueError(f"unknown weight dtype {weight_dtype!r}; use {list(WEIGHT_DTYPE_BITS)}")
    return WEIGHT_DTYPE_BITS[name]


def weight_bytes(facts: ArchitectureFacts, weight_dtype: str = "bfloat16") -> int:
    """Bytes of all weights in `weight_dtype`. Quantized formats quantize the linear layers;
    vLLM keeps the token embedding and LM head in 16 bits (scales are not counted)."""
    bits = weight_bits(weight_dtype)
    kept = facts.embedding_parameters + facts.lm_head_parameters if bits < 16 else 0
    return math.ceil(((facts.total_parameters - kept) * bits + kept * 16) / 8)


# --- reading a config -------------------------------------------------------------------------


def facts_from_config(config: Mapping[str, Any]) -> ArchitectureFacts:
    """Read a Hugging Face config dict (transformers 4 or 5 style) into ArchitectureFacts."""
    text, notes = _text_config(config)
    model_type = str(text.get("model_type") or "")
    # 1. The layer shapes, family by family, and what they cost in parameters.
    layout = params.layout_from_config(text, model_type)
    counts = params.count_parameters(layout)
    # 2. What attention caches per token, as vLLM stores it.
    heads = layout.num_attention_heads
    if layout.mla is not None:
        kind, kv_heads, head_dim = "MLA", 1, layout.mla.latent_size
    else:
        kv_heads, head_dim = layout.num_kv_heads, layout.head_dim
        if heads % kv_heads:
            raise UnsupportedArchitecture(f"{heads} heads do not split into {kv_heads} KV groups")
        kind = "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else "GQA"
    window, sliding_layers = _sliding_window(text, model_type, layout.num_layers)
    position = _position_encoding(text, model_type)
    # 3. Caveats a reader of the numbers should know.
    moe = layout.moe
    if moe is not None:
        notes.append(
            f"active parameters include the {counts.embedding:,}-parameter input embedding; "
            f"without it (DeepSeek's convention): {counts.active - counts.embedding:,}"
        )
    if window is not None:
        notes.append(
            f"{sliding_layers} of {layout.num_layers} layers attend over a {window}-token "
            "sliding window; their KV cache stops growing there"
        )
    return ArchitectureFacts(
        model_type=model_type,
        architectures=tuple(str(a) for a in text.get("architectures") or ()),
        num_layers=layout.num_layers,
        hidden_size=layout.hidden_size,
        intermediate_size=layout.intermediate_size,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        attention_kind=kind,
        gqa_group_size=heads // kv_heads,
        position_encoding=position,
        rope_theta=_rope_theta(text) if position == "rope" else None,
        sliding_window=window,
        num_sliding_window_layers=sliding_layers,
        num_experts=moe.num_experts if moe else 0,
        experts_per_token=moe.experts_per_token if moe else 0,
        num_shared_experts=moe.num_shared_experts if moe else 0,
        moe_intermediate_size=moe.expert_intermediate_size if moe else 0,
        num_moe_layers=moe.num_moe_layers if moe else 0,
        total_parameters=counts.total,
        active_parameters=counts.active,
        embedding_parameters=counts.embedding,
        lm_head_parameters=counts.lm_head,
        vocab_size=layout.vocab_size,
        max_position_embeddings=_max_positions(text, model_type),
        tie_word_embeddings=layout.tie_word_embeddings,
        mla=layout.mla,
        notes=tuple(notes),
    )


def _text_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The language model's config: multimodal wrappers nest it under `text_config`."""
    inner = config.get("text_config")
    if not isinstance(inner, Mapping) or _has(config, "num_hidden_layers", "n_layer"):
        return dict(config), []
    text = dict(inner)
    text.setdefault("architectures", config.get("architectures"))
    if "tie_word_embeddings" in config:
        text.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
    return text, [
        "multimodal wrapper: counts the language model only; the vision/audio towers' "
        "weights are not included"
    ]


def _sliding_window(c: Mapping[str, Any], model_type: str, layers: int) -> tuple[int | None, int]:
    """(window, number of layers that use it)."""
    window = c.get("sliding_window")
    layer_types = c.get("layer_types")
    if layer_types is not None:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise UnsupportedArchitecture(f"layer types {sorted(unknown)} are not supported")
        if len(layer_types) != layers:
            raise UnsupportedArchitecture(f"{len(layer_types)} layer_types for {layers} layers")
        sliding = list(layer_types).count("sliding_attention")
    elif window is None:
        sliding = 0
    elif model_type.startswith("qwen"):
        # Qwen2/3 slide only when asked to, and only from layer max_window_layers on.
        first = config_int(c, "max_window_layers", default=layers)
        sliding = max(0, layers - first) if c.get("use_sliding_window") else 0
    else:
        sliding = layers  # Mistral: every layer slides
    if sliding == 0:
        return None, 0
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise UnsupportedArchitecture(f"sliding layers need a positive sliding_window: {window!r}")
    return window, sliding


def _has(c: Mapping[str, Any], *keys: str) -> bool:
    return any(c.get(k) is not None for k in keys)


def _position_encoding(c: Mapping[str, Any], model_type: str) -> str:
    if model_type in GPT2:
        return "learned"
    if model_type in FALCON and c.get("alibi"):
        return "alibi"
    return "rope"


def _rope_theta(c: Mapping[str, Any]) -> float:
    """transformers 4 keeps `rope_theta` at the top; 5 moves it into `rope_parameters`."""
    if c.get("rope_theta") is not None:
        return float(c["rope_theta"])
    rope = c.get("rope_parameters")
    if isinstance(rope, Mapping):
        if isinstance(rope.get("full_attention"), Mapping):  # parameters per layer type
            rope = rope["full_attention"]
        if rope.get("rope_theta") is not None:
            return float(rope["rope_theta"])
    return 10000.0  # every supported family's transformers default


def _max_positions(c: Mapping[str, Any], model_type: str) -> int:
    if model_type in FALCON:
        return config_int(c, "max_position_embeddings", default=2048)  # FalconConfig's default
    return config_int(c, "max_position_embeddings", "n_positions")


# --- fitting a model onto GPUs ----------------------------------------------------------------
