"""The whole path on real text: the embedded default model (SmolLM2-135M-Instruct,
float32) through the service against Hugging Face transformers on the same
checkpoint (tests/smollm_reference.py), and the features that only a trained
model can show working: chat turn markers, stop strings, JSON schema, choice.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from llmgrpc import Client
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.server_process import ServerProcess
from tests.smollm_reference import CHAT_PROMPTS, MAX_TOKENS, TEXT_PROMPTS, Greedy

pytestmark = pytest.mark.engine

LOGPROB_TOLERANCE = 1e-3
NEAR_TIE = 1e-3
MIN_EQUAL = 8  # of the 10 prompts, token for token


def _input(prompt: str) -> dict[str, object]:
    return {"messages": [("user", prompt)]} if prompt in CHAT_PROMPTS else {"prompt": prompt}


def _unary(client: Client, prompt: str) -> pb.GenerateResponse:
    return client.generate(**_input(prompt), max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)


def _streamed(client: Client, prompt: str) -> tuple[list[int], str, list[pb.GenerateStreamResponse]]:
    messages = list(client.stream(**_input(prompt), max_tokens=MAX_TOKENS, temperature=0.0))
    ids = [t for m in messages for t in m.token_ids]
    return ids, "".join(m.text for m in messages), messages


def _without_eos(ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] == 2 else ids  # <|im_end|>


def test_greedy_equals_transformers_token_for_token(
    smollm: ServerProcess, smollm_reference: dict[str, Greedy]
) -> None:
    """Tokenization, the chat template, sampling, logprobs, detokenization and
    streaming against transformers: equal ids on at least 8 of 10 prompts; a
    prompt that diverges must do so at a near-tie of transformers' two best."""
    prompts = [*CHAT_PROMPTS, *TEXT_PROMPTS]
    with Client(smollm.target, timeout=300) as client, ThreadPoolExecutor(len(prompts)) as pool:
        unary = dict(zip(prompts, pool.map(lambda p: _unary(client, p), prompts), strict=True))
        streamed = dict(zip(prompts, pool.map(lambda p: _streamed(client, p), prompts), strict=True))
        tokenized = {p: client.tokenize(**({"messages": [("user", p)]} if p in CHAT_PROMPTS
                                           else {"text": p, "add_special_tokens": False}))
                     for p in prompts}  # fmt: skip
    equal = []
    for prompt in prompts:
        ref, got = smollm_reference[prompt], unary[prompt]
        assert list(tokenized[prompt].token_ids) == ref.prompt_ids, prompt
        assert got.usage.prompt_tokens == len(ref.prompt_ids), prompt
        ids = _without_eos(list(got.token_ids))
        assert got.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert (got.finish_reason == pb.FINISH_REASON_STOP) == (len(ref.token_ids) < MAX_TOKENS)
        # Streamed: the same ids and text as unary, in deltas.
        stream_ids, stream_text, messages = streamed[prompt]
        assert stream_ids == list(got.token_ids) and stream_text == got.text, prompt
        assert len(messages) > 1, prompt
        same = 0
        while same < min(len(ids), len(ref.token_ids)) and ids[same] == ref.token_ids[same]:
            same += 1
        for step in range(same):
            assert got.logprobs[step].token_id == ids[step]
            assert abs(got.logprobs[step].logprob - ref.logprobs[step]) < LOGPROB_TOLERANCE, (
                prompt, step, got.logprobs[step].logprob, ref.logprobs[step])  # fmt: skip
        if ids == ref.token_ids:
            assert got.text == ref.text and "<|im_end|>" not in got.text, prompt
            equal.append(prompt)
        else:
            assert ref.top2_gaps[same] < NEAR_TIE, (
                f"{prompt!r} diverges at token {same} where transformers' two best are "
                f"{ref.top2_gaps[same]:.4f} apart: service {got.text!r}, transformers {ref.text!r}"
            )
    assert len(equal) >= MIN_EQUAL, f"only {len(equal)} of {len(prompts)} equal: {equal}"
    assert "Paris" in unary["What is the capital of France?"].text


def test_chat_turns_end_at_the_template_marker(smollm: ServerProcess) -> None:
    """A multi-turn chat: the answer ends at the template's <|im_end|> (the
    model's EOS: finish STOP, no stop condition named): its id ends token_ids,
    its text is not in the answer (as in vLLM), Detokenize shows it on request."""
    history = [("system", "You are a concise assistant."),
               ("user", "What is the capital of France?"),
               ("assistant", "The capital of France is Paris."),
               ("user", "And what is the capital of Italy?")]  # fmt: skip
    with Client(smollm.target, timeout=300) as client:
        plain = client.generate(messages=history, max_tokens=64, temperature=0.0)
        raw = client.detokenize(plain.token_ids, skip_special_tokens=False)
    assert plain.finish_reason == pb.FINISH_REASON_STOP
    assert plain.WhichOneof("stop_reason") is None and plain.token_ids[-1] == 2
    assert "<|im_end|>" not in plain.text and "<|im_start|>" not in plain.text
    assert "Rome" in plain.text
    assert raw == plain.text + "<|im_end|>"


def test_stop_strings_stop_on_real_text(smollm: ServerProcess) -> None:
    """A word from the greedy answer as a stop string: the answer ends right
    before it, finish STOP naming it; kept with include_stop_str_in_output."""
    ask = {"messages": [("user", "Write a haiku about the sea.")], "max_tokens": 32,
           "temperature": 0.0}  # fmt: skip
    with Client(smollm.target, timeout=300) as client:
        full = client.generate(**ask).text
        stop = "gentle"
        assert stop in full, full
        cut = client.generate(**ask, stop=[stop, "never-appears"])
        kept = client.generate(**ask, stop=[stop], include_stop_str_in_output=True)
    assert cut.finish_reason == pb.FINISH_REASON_STOP and cut.stop_string == stop
    assert cut.text == full[: full.index(stop)]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_json_schema_answer_parses_and_validates(smollm: ServerProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    with Client(smollm.target, timeout=300) as client:
        r = client.generate(messages=[("user", "Describe Alice, who is 30, as JSON.")],
                            json_schema=json.dumps(schema), max_tokens=64, temperature=0.0)  # fmt: skip
    assert r.finish_reason == pb.FINISH_REASON_STOP, r.text
    jsonschema.validate(json.loads(r.text), schema)


def test_choice_answers_one_of_the_choices(smollm: ServerProcess) -> None:
    choices = ["Paris", "London", "Berlin"]
    with Client(smollm.target, timeout=300) as client:
        r = client.generate(messages=[("user", "What is the capital of France?")],
                            choice=choices, max_tokens=16, temperature=0.0)  # fmt: skip
    assert r.text in choices and r.finish_reason == pb.FINISH_REASON_STOP


def test_plan_predicts_the_kv_cache_the_engine_allocates(smollm: ServerProcess) -> None:
    """`llmgrpc plan` knows the server's sizing rule for its embedded models:
    its token capacity (float32 here, as this server runs) is the engine's."""
    plan = subprocess.run(
        [sys.executable, "-m", "llmgrpc.cli", "plan", "smollm2-135m-instruct",
         "--kv-dtype", "float32", "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    embedded = json.loads(plan.stdout)["embedded"]
    with Client(smollm.target) as client:
        info = client.model_info()
    assert info.dtype == "float32" and info.max_model_len == embedded["context_len"] == 2048
    assert info.kv_cache.token_capacity == embedded["kv_token_capacity"]
    assert info.kv_cache.memory_bytes == embedded["kv_cache_bytes"]
    assert info.kv_cache.token_capacity // info.max_model_len == embedded["sequences"] == 16


def test_cli_chat_answers_and_keeps_the_history(smollm: ServerProcess) -> None:
    """`llmgrpc chat`, as a new user tries it after `make serve`, driven through
    stdin: two turns, the second answered with the first in its history."""
    chat = subprocess.run(
        [sys.executable, "-m", "llmgrpc.cli", "chat", "--target", smollm.target,
         "--temperature", "0", "--max-tokens", "48", "--verbose"],
        input="What is the capital of France?\nAnd what is the capital of Italy?\n",
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    first, second, *_ = chat.stdout.splitlines()
    assert first == "The capital of France is Paris."
    assert "Rome" in second
    # --verbose prints each turn's usage: the second prompt holds the first turn.
    prompts = [int(n) for n in re.findall(r"(\d+) prompt tokens", chat.stderr)]
    assert len(prompts) == 2 and prompts[1] > prompts[0] + 8, chat.stderr
