"""Hugging Face transformers + peft's greedy answers on a base model with a LoRA
adapter (float32): the oracle for the service's output with an adapter.

The adapter is loaded by peft itself (PeftModel.from_pretrained), so a key the
server's writer misnames, a shape it transposes or a config field peft reads
differently shows here. Prompts are rendered as tests/smollm_reference.py
renders them, and the greedy loop is the same one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.smollm_reference import Greedy, greedy

MAX_TOKENS = 16


def load(base_dir: Path, adapter_dir: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer): the base in float32, with the adapter applied if given.

    peft warns (rather than raising) when adapter keys are missing; that is an
    error here.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*adapter keys.*")
            model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval(), tokenizer


def greedy_with_adapter(
    base_dir: Path,
    adapter_dir: Path | None,
    prompts: Iterable[tuple[str, bool]],
    max_tokens: int = MAX_TOKENS,
) -> dict[str, Greedy]:
    """Prompt -> greedy continuation with the adapter (the base's alone if None);
    `prompts` are (text, chat) pairs, chat ones rendered with the base's template."""
    model, tokenizer = load(base_dir, adapter_dir)
    return greedy(model, tokenizer, prompts, max_tokens)
