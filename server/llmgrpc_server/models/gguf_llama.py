"""A Llama-architecture GGUF file into a Hugging Face checkpoint, offline.

vLLM 0.32 cannot read GGUF; this writes what it reads: config.json,
generation_config.json, model.safetensors (float32), tokenizer.json and
tokenizer_config.json with the chat template. Pure Python (the `gguf`
package's numpy dequantizers, `tokenizers`, `safetensors`), deterministic:
the same file gives byte-identical output. docs/spikes/smollm2-gguf-conversion.md
has the evidence behind each step (bit-equal to transformers' GGUF loader).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

# GGUF tensor names -> Hugging Face Llama names.
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


class Gguf:
    """Typed access to one GGUF file's metadata and tensors."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.reader = GGUFReader(path)

    def get(self, key: str, default: Any = None) -> Any:
        from gguf import GGUFValueType

        f = self.reader.fields.get(key)
        if f is None:
            return default
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            if f.types[-1] == GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if kind == GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        value = f.parts[f.data[0]].tolist()[0]
        if kind == GGUFValueType.FLOAT32:
            # The shortest float32 repr: 9.9999997e-06 is written 1e-05.
            value = float(str(np.float32(value)))
        return value

    def arch(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.get('general.architecture')}.{key}", default)


def hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _LAYER:
        raise ValueError(f"GGUF tensor {name!r} has no Llama counterpart")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order on a q or k projection.

    llama.cpp's converter interleaves each head's rotary halves
    (`reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)`); this is its
    inverse. k uses the KV head count, not the query head count.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights(g: Gguf) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, named and laid out as Hugging Face's."""
    from gguf.quants import dequantize

    n_head, n_kv = g.arch("attention.head_count"), g.arch("attention.head_count_kv")
    out = {}
    for t in g.reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists dims innermost first
        if ".attn_q." in t.name:
            w = unpermute(w, n_head)
        elif ".attn_k." in t.name:
            w = unpermute(w, n_kv)
        out[hf_name(t.name)] = np.ascontiguousarray(w)
    return out


def config(g: Gguf, torch_dtype: str) -> dict[str, Any]:
    """config.json for LlamaForCausalLM; `torch_dtype` is what vLLM serves by default."""
    if g.get("general.architecture") != "llama":
        raise ValueError(f"GGUF architecture {g.get('general.architecture')!r} is not llama")
    if g.arch("rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF rope scaling is not converted")
    n_head, hidden = g.arch("attention.head_count"), g.arch("embedding_length")
    names = {t.name for t in g.reader.tensors}
    theta = g.arch("rope.freq_base", 10000.0)
    eos = g.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": g.arch("feed_forward_length"),
        "num_hidden_layers": g.arch("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": g.arch("attention.head_count_kv"),
        "head_dim": g.arch("attention.key_length", hidden // n_head),
        "max_position_embeddings": g.arch("context_length"),
        "rms_norm_eps": g.arch("attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_scaling": None,
        "vocab_size": g.arch("vocab_size", len(g.get("tokenizer.ggml.tokens"))),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id", eos),
        "torch_dtype": torch_dtype,
    }


def write_tokenizer(g: Gguf, out: Path) -> None:
    """A byte-level BPE tokenizer with the GGUF's vocabulary, merges, specials and template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if g.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"GGUF tokenizer {g.get('tokenizer.ggml.model')!r} is not byte-level BPE")
    tokens: list[str] = g.get("tokenizer.ggml.tokens")
    types: list[int] = g.get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = g.get("tokenizer.ggml.pre")
    if pre == "smollm":  # llama.cpp: each digit alone ("\p{N}"), then the GPT-2 split
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in (None, "gpt2", "default"):
        tk.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not converted")
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED]
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")

    def token(key: str) -> str | None:
        i = g.get(key)
        return None if i is None else tokens[i]

    template = g.get("tokenizer.chat_template")
    PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=specials,
        model_max_length=g.arch("context_length"),
        clean_up_tokenization_spaces=False,
        chat_template=template,
    ).save_pretrained(out)
    # transformers 5 keeps the template in chat_template.jinja and names a
    # class of its own; older loaders read both from tokenizer_config.json.
    path = out / "tokenizer_config.json"
    tc = json.loads(path.read_text())
    tc["chat_template"] = template
    tc["add_bos_token"] = bool(g.get("tokenizer.ggml.add_bos_token", False))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(path, tc)
    write_json(out / "tokenizer.json", json.loads((out / "tokenizer.json").read_text()))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def convert(gguf_path: Path, out: Path, torch_dtype: str = "bfloat16") -> None:
    """Write the checkpoint into `out` (an existing, empty directory)."""
    from safetensors.numpy import save_file

    g = Gguf(gguf_path)
    cfg = config(g, torch_dtype)
    save_file(weights(g), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600
    write_json(out / "config.json", cfg)
    write_json(
        out / "generation_config.json",
        {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    write_tokenizer(g, out)
