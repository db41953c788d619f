"""Pure conversion of a request's SamplingParams and StructuredOutput into
domain types (the rest of a request: convert.py), with every check of their
ranges, counts and sizes."""

from __future__ import annotations

import json
import math
from typing import Any

from llmgrpc.v1 import llm_service_pb2 as pb

from llmgrpc_server import domain
from llmgrpc_server.domain import Limits, check_count, check_token_ids
from llmgrpc_server.errors import InvalidArgument

# Objects and arrays inside each other in a JSON schema: real schemas stay far
# below; the grammar compiler recurses over them (and json.loads raises
# RecursionError, not ValueError, past about a thousand).
MAX_JSON_SCHEMA_DEPTH = 64


def _json_depth(value: dict[str, Any] | list[Any]) -> int:
    """How deep objects and arrays nest in `value` (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = list(node.values()) if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _finite(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidArgument(field, f"must be in {bracket}{low}, {high}], got {value}")
    return value


def to_sampling(msg: pb.SamplingParams, limits: Limits) -> domain.Sampling:  # noqa: PLR0912
    s = domain.Sampling()
    kw: dict[str, object] = {}
    if msg.HasField("max_tokens"):
        if msg.max_tokens < 1:
            raise InvalidArgument("sampling.max_tokens", "must be >= 1")
        if msg.max_tokens > limits.max_tokens:
            source = (
                "the model's limit" if limits.max_tokens == limits.max_model_len
                else "the server's --max-tokens-limit"
            )  # fmt: skip
            raise InvalidArgument(
                "sampling.max_tokens",
                f"{msg.max_tokens} exceeds {source} of {limits.max_tokens} tokens",
            )
        kw["max_tokens"] = msg.max_tokens
    if msg.HasField("min_tokens"):
        kw["min_tokens"] = msg.min_tokens
        if msg.HasField("max_tokens") and msg.min_tokens > msg.max_tokens:
            raise InvalidArgument("sampling.min_tokens", "must be <= max_tokens")
    if msg.HasField("temperature"):
        kw["temperature"] = _finite("sampling.temperature", msg.temperature, 0.0, 2.0)
    if msg.HasField("top_p"):
        kw["top_p"] = _finite("sampling.top_p", msg.top_p, 0.0, 1.0, low_open=True)
    if msg.HasField("top_k"):
        if msg.top_k < 1:
            raise InvalidArgument("sampling.top_k", "must be >= 1; leave it unset to disable top-k")
        kw["top_k"] = msg.top_k
    if msg.HasField("min_p"):
        kw["min_p"] = _finite("sampling.min_p", msg.min_p, 0.0, 1.0)
    if msg.HasField("seed"):
        kw["seed"] = msg.seed
    if msg.HasField("presence_penalty"):
        kw["presence_penalty"] = _finite("sampling.presence_penalty", msg.presence_penalty, -2, 2)
    if msg.HasField("frequency_penalty"):
        kw["frequency_penalty"] = _finite(
            "sampling.frequency_penalty", msg.frequency_penalty, -2, 2
        )
    if msg.HasField("repetition_penalty"):
        kw["repetition_penalty"] = _finite(
            "sampling.repetition_penalty", msg.repetition_penalty, 0.0, 2.0, low_open=True
        )
    kw["stop"] = _stop_strings(msg, limits)
    check_count("sampling.stop_token_ids", len(msg.stop_token_ids), "stop token ids",
                limits.caps.max_stop_token_ids, "--max-stop-token-ids")  # fmt: skip
    check_token_ids("sampling.stop_token_ids", list(msg.stop_token_ids), limits.vocab_size)
    kw["stop_token_ids"] = tuple(msg.stop_token_ids)
    for name in ("logprobs", "prompt_logprobs"):  # vLLM's --max-logprobs caps both
        if msg.HasField(name):
            if getattr(msg, name) > limits.max_logprobs:
                raise InvalidArgument(
                    f"sampling.{name}", f"at most {limits.max_logprobs}, got {getattr(msg, name)}"
                )
            kw[name] = getattr(msg, name)
    for flag in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        if msg.HasField(flag):
            kw[flag] = getattr(msg, flag)
    kw.update(_token_constraints(msg, limits))
    if msg.HasField("n"):
        kw["n"] = _completions(msg, limits)
    return domain.Sampling(**{**s.__dict__, **kw})  # type: ignore[arg-type]


# vLLM samples greedily below this temperature (its _SAMPLING_EPS).
GREEDY_BELOW = 1e-5


def _completions(msg: pb.SamplingParams, limits: Limits) -> int:
    """sampling.n, checked: >= 1, within --max-n-sequences, 1 when greedy (as vLLM)."""
    if msg.n < 1:
        raise InvalidArgument("sampling.n", "must be >= 1")
    check_count("sampling.n", msg.n, "completions", limits.caps.max_n_sequences,
                "--max-n-sequences")  # fmt: skip
    if msg.n > 1 and msg.HasField("temperature") and msg.temperature < GREEDY_BELOW:
        raise InvalidArgument(
            "sampling.n", f"must be 1 with greedy sampling (temperature 0), got {msg.n}: "
            "the completions would be identical (vLLM refuses it)",
        )  # fmt: skip
    return msg.n


# vLLM's OpenAI server clamps logit_bias values to this range (OpenAI's own).
MAX_LOGIT_BIAS = 100.0


def _token_constraints(msg: pb.SamplingParams, limits: Limits) -> dict[str, object]:
    """logit_bias, allowed_token_ids and bad_words, within the server's caps."""
    caps = limits.caps
    kw: dict[str, object] = {}
    check_count("sampling.logit_bias", len(msg.logit_bias), "entries", caps.max_logit_bias,
                "--max-logit-bias")  # fmt: skip
    bias = []
    for token, value in sorted(msg.logit_bias.items()):
        field = f"sampling.logit_bias[{token}]"
        if token >= limits.vocab_size:
            raise InvalidArgument(
                field, f"token id {token} is outside the vocabulary (size {limits.vocab_size})"
            )
        if not math.isfinite(value):
            raise InvalidArgument(field, f"must be a finite number, got {value}")
        bias.append((token, min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, value))))
    kw["logit_bias"] = tuple(bias)
    allowed = list(msg.allowed_token_ids)
    check_count("sampling.allowed_token_ids", len(allowed), "token ids",
                caps.max_allowed_token_ids, "--max-allowed-token-ids")  # fmt: skip
    check_token_ids("sampling.allowed_token_ids", allowed, limits.vocab_size)
    kw["allowed_token_ids"] = tuple(allowed) if allowed else None
    check_count("sampling.bad_words", len(msg.bad_words), "bad words", caps.max_bad_words,
                "--max-bad-words")  # fmt: skip
    for i, word in enumerate(msg.bad_words):
        if not word.strip():
            raise InvalidArgument(f"sampling.bad_words[{i}]", "must not be empty or blank")
        check_count(f"sampling.bad_words[{i}]", len(word), "characters",
                    caps.max_bad_word_chars, "--max-bad-word-chars")  # fmt: skip
    kw["bad_words"] = tuple(msg.bad_words)
    return kw


def _stop_strings(msg: pb.SamplingParams, limits: Limits) -> tuple[str, ...]:
    caps = limits.caps
    check_count("sampling.stop", len(msg.stop), "stop strings", caps.max_stop_strings,
                "--max-stop-strings")  # fmt: skip
    for i, stop in enumerate(msg.stop):
        if not stop:
            raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")
        # vLLM matches each one at every step and holds back that much streamed text.
        check_count(f"sampling.stop[{i}]", len(stop), "characters", caps.max_stop_string_chars,
                    "--max-stop-string-chars")  # fmt: skip
    return tuple(msg.stop)


def to_structured_output(msg: pb.StructuredOutput, limits: Limits) -> domain.StructuredOutput:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("structured_output", "set one of json_schema, regex, choice, grammar")
    # Before parsing: the engine compiles it into a grammar, at a cost that grows with it.
    cap = limits.caps.max_structured_output_chars
    if kind == "choice":
        field, choices = "structured_output.choice.choices", msg.choice.choices
        # A choice has at least one character: too many of them is too many characters.
        chars = len(choices) if len(choices) > cap else sum(map(len, choices))
    else:
        field, chars = f"structured_output.{kind}", len(getattr(msg, kind))
    check_count(field, chars, "characters", cap, "--max-structured-output-chars")
    if kind == "json_schema":
        field = "structured_output.json_schema"
        try:
            schema = json.loads(msg.json_schema)
        except RecursionError as e:
            raise InvalidArgument(field, f"nested over {MAX_JSON_SCHEMA_DEPTH} levels deep") from e
        except ValueError as e:
            raise InvalidArgument(field, f"not valid JSON: {e}") from e
        if not isinstance(schema, dict):
            raise InvalidArgument(field, "must be a JSON object")
        if (depth := _json_depth(schema)) > MAX_JSON_SCHEMA_DEPTH:
            limit = MAX_JSON_SCHEMA_DEPTH
            raise InvalidArgument(field, f"nested {depth} levels deep, over {limit}")
        return domain.StructuredOutput(json_schema=schema)
    if kind == "choice":
        if not msg.choice.choices or any(not c for c in msg.choice.choices):
            raise InvalidArgument(
                "structured_output.choice.choices", "needs at least one non-empty choice"
            )
        return domain.StructuredOutput(choice=tuple(msg.choice.choices))
    value = getattr(msg, kind)
    if not value:
        raise InvalidArgument(f"structured_output.{kind}", "must not be empty")
    return domain.StructuredOutput(**{kind: value})
