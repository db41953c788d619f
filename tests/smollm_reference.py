"""Hugging Face transformers' greedy answers on the embedded default model: the oracle
that tests/integration/test_real_text.py compares the service with (float32).

The prompt is rendered the way the server renders it (the model's chat template,
then the tokenizer without added special tokens), so any difference in the
service's chat handling, tokenization, sampling or detokenization shows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 32
# Ten fixed prompts: chat turns (the template's system prompt, turn markers)
# and two plain-text continuations.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 plus 7?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
)
TEXT_PROMPTS = ("The quick brown fox", "def fibonacci(n):\n")


# Most likely alternatives kept per prompt position (prompt logprobs).
PROMPT_TOP = 5


@dataclass(frozen=True)
class PromptPosition:
    """A prompt token after the first: its logprob given the tokens before it,
    its 1-based rank, and the position's PROMPT_TOP best (id, logprob)."""

    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Greedy:
    prompt_ids: list[int]
    token_ids: list[int]  # without the end-of-sequence token
    logprobs: list[float]  # of each chosen token, raw (before any processing)
    top2_gaps: list[float]  # best minus second-best logprob at each step
    text: str
    # One per prompt token but the first (vLLM's prompt_logprobs).
    prompt: list[PromptPosition]


def prompt_ids(tokenizer: object, prompt: str, chat: bool) -> list[int]:
    if chat:
        prompt = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return list(tokenizer.encode(prompt, add_special_tokens=False))  # type: ignore[attr-defined]


def greedy_answers(model_dir: Path) -> dict[str, Greedy]:
    """Prompt -> transformers' greedy continuation, MAX_TOKENS at most, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [(p, True) for p in CHAT_PROMPTS] + [(p, False) for p in TEXT_PROMPTS]
    return greedy(model, tokenizer, prompts, MAX_TOKENS)


def greedy(
    model: Any, tokenizer: Any, prompts: Iterable[tuple[str, bool]], max_tokens: int
) -> dict[str, Greedy]:
    """Prompt -> the model's greedy continuation; `prompts` are (text, chat) pairs."""
    import torch

    eos = tokenizer.eos_token_id
    answers = {}
    with torch.inference_mode():
        for prompt, chat in prompts:
            ids = prompt_ids(tokenizer, prompt, chat)
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
                eos_token_id=eos, pad_token_id=eos,
            )  # fmt: skip
            chosen = out.sequences[0, len(ids):].tolist()
            logprobs, gaps = [], []
            for step, token in enumerate(chosen):
                lp = torch.log_softmax(out.logits[step][0].float(), dim=-1)
                top = torch.topk(lp, 2).values
                logprobs.append(float(lp[token]))
                gaps.append(float(top[0] - top[1]))
            if chosen and chosen[-1] == eos:
                chosen, logprobs, gaps = chosen[:-1], logprobs[:-1], gaps[:-1]
            text = tokenizer.decode(chosen, skip_special_tokens=True)
            answers[prompt] = Greedy(ids, chosen, logprobs, gaps, text, _prompt(model, ids))
    return answers


def _prompt(model: Any, ids: list[int]) -> list[PromptPosition]:
    """The prompt's own logprobs, from one forward pass over it."""
    import torch

    logits = model(torch.tensor([ids])).logits[0].float()
    positions = []
    for lp, token in zip(torch.log_softmax(logits, dim=-1)[:-1], ids[1:], strict=True):
        top = torch.topk(lp, PROMPT_TOP)
        rank = int((lp > lp[token]).sum()) + 1
        best = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        positions.append(PromptPosition(float(lp[token]), rank, best))
    return positions
