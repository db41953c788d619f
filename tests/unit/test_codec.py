"""vllm_adapter/codec.py: the Rust tokenizer's batch calls, which release the
GIL, give exactly what transformers' own calls give (ids, offsets, text), on
both embedded tokenizers (Llama's SentencePiece-style BPE and SmolLM2's
byte-level BPE), with and without special tokens."""

from __future__ import annotations

import random
from typing import Any

import pytest
from llmgrpc_server.models import EMBEDDED, default_models_dir, ensure_built
from llmgrpc_server.vllm_adapter.codec import Codec
from transformers import AutoTokenizer


def _texts() -> list[str]:
    rng = random.Random(3)
    return [
        "",
        " ",
        "Hello, world! What is the capital of France?",
        "  leading and trailing spaces  \n\n tabs\tand\r\nnewlines ",
        "<|im_start|>user\nhi<|im_end|>\n<s> </s> <unk>",  # special tokens as text
        "Ünïcödé, 日本語のテキスト, emoji 🙂🚀, combining e\u0301, zero-width\u200b",
        "".join(chr(rng.randrange(33, 127)) for _ in range(20_000)),
        "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(3_000)),
    ]


@pytest.fixture(scope="module", params=["tiny-llama-gqa", "smollm2-135m-instruct"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    path = ensure_built(EMBEDDED[request.param], default_models_dir())
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_equals_transformers(tokenizer: Any, add_special: bool) -> None:
    codec = Codec(tokenizer)
    assert codec._rust is not None  # the fast path is the one under test
    for text in _texts():
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = codec.encode(text, add_special)
        assert ids == enc["input_ids"], text[:40]
        assert [tuple(o) for o in offsets] == [tuple(o) for o in enc["offset_mapping"]]
        assert codec.tokens(ids) == tokenizer.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_equals_transformers(tokenizer: Any, skip: bool) -> None:
    codec = Codec(tokenizer)
    assert codec._rust_decode
    rng = random.Random(5)
    vocab = len(tokenizer)
    special = tokenizer.all_special_ids
    cases = [[], special, [rng.randrange(vocab) for _ in range(5_000)]]
    cases += [tokenizer(t)["input_ids"] + special for t in _texts()]
    for ids in cases:
        assert codec.decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_without_a_rust_backend_keeps_transformers_calls() -> None:
    class Slow:
        clean_up_tokenization_spaces = False

        def __call__(self, text: str, **kwargs: Any) -> dict[str, Any]:
            return {"input_ids": [len(text)], "offset_mapping": [(0, len(text))]}

        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            return f"{ids}{skip_special_tokens}"

        def __len__(self) -> int:
            return 2

        def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
            return [f"t{i}" for i in ids]

    codec = Codec(Slow())
    assert codec.encode("abc", True) == ([3], [(0, 3)])
    assert codec.decode([1], False) == "[1]False"
    assert codec.tokens([1, 0, 1]) == ["t1", "t0", "t1"]


def test_decode_with_clean_up_keeps_transformers_decode(tokenizer: Any) -> None:
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer.name_or_path, clean_up_tokenization_spaces=True
    )
    assert not Codec(tokenizer)._rust_decode
