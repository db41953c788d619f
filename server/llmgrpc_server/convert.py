"""Pure conversion of protobuf requests into domain types (answers: responses.py).

Validation of everything a request can get wrong on its own (ranges, NaN,
empty input, ids outside the vocabulary) happens here, so that the engine
adapter only ever sees well-formed requests. Prompt *length* needs the
tokenizer and is checked by the engine adapter.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from llmgrpc.v1 import llm_service_pb2 as pb

from llmgrpc_server import call_metadata, domain
from llmgrpc_server.domain import Limits, check_prompt_length
from llmgrpc_server.errors import FailedPrecondition, InvalidArgument

# Roles are names ("system", "user", "tool"...); a longer one is a mistake.
MAX_ROLE_CHARS = 64

# --- requests -----------------------------------------------------------------


def requested_adapter(name: str, limits: Limits) -> str | None:
    """The adapter `model` names: None for the base model (empty or one of its
    names); any other name goes to the engine's adapters, which know them all."""
    if len(name) > limits.max_request_id_len:  # the NOT_FOUND message would echo it
        raise InvalidArgument("model", f"at most {limits.max_request_id_len} characters")
    return name if name and name not in limits.model_names else None


def to_generation_request(
    msg: pb.GenerateRequest, limits: Limits, deadline: float | None = None,
    received: float | None = None, metadata: Iterable[tuple[str, str | bytes]] = (),
) -> domain.GenerationRequest:
    """The domain request; `metadata` is the call's (x-request-id, trace context)."""
    adapter = requested_adapter(msg.model, limits)
    metadata = tuple(metadata)
    request_id = msg.request_id or call_metadata.value(metadata, call_metadata.REQUEST_ID_KEY)
    if len(request_id) > limits.max_request_id_len:
        field = "request_id" if msg.request_id else call_metadata.REQUEST_ID_KEY
        raise InvalidArgument(
            field, f"at most {limits.max_request_id_len} characters, got {len(request_id)}"
        )
    truncate = _truncation(msg, limits)
    prompt, token_ids, chat = _input(msg, limits, truncate)
    return domain.GenerationRequest(
        request_id=request_id or uuid.uuid4().hex,
        prompt=prompt,
        prompt_token_ids=token_ids,
        chat=chat,
        sampling=to_sampling(msg.sampling, limits),
        structured_output=to_structured_output(msg.structured_output, limits)
        if msg.HasField("structured_output")
        else None,
        deadline=deadline,
        received=received,
        adapter=adapter,
        truncate_prompt_tokens=truncate,
        trace_headers=call_metadata.engine_trace_headers(metadata),
        priority=_priority(msg, limits),
    )


def _priority(msg: pb.GenerateRequest, limits: Limits) -> int:
    if msg.priority and not limits.priority_scheduling:
        raise InvalidArgument(
            "priority", "this server schedules first come, first served; a priority needs it "
            "started with vLLM's --scheduling-policy priority",
        )  # fmt: skip
    return msg.priority


def _truncation(msg: pb.GenerateRequest | pb.TokenizeRequest, limits: Limits | None) -> int | None:
    """truncate_prompt_tokens, checked: >= 1 and, for generation, within the prompt limit."""
    if not msg.HasField("truncate_prompt_tokens"):
        return None
    keep = msg.truncate_prompt_tokens
    if keep < 1:
        raise InvalidArgument(
            "truncate_prompt_tokens", "must be >= 1; leave it unset to keep the whole prompt"
        )
    if limits is not None and keep > limits.max_prompt_tokens:
        raise InvalidArgument(
            "truncate_prompt_tokens",
            f"{keep} exceeds {domain.prompt_limit_source(limits)} of "
            f"{limits.max_prompt_tokens} prompt tokens",
        )
    return keep


def _input(
    msg: pb.GenerateRequest, limits: Limits, truncate: int | None
) -> tuple[str | None, tuple[int, ...] | None, domain.Chat | None]:
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input", "one of prompt, prompt_token_ids or chat is required")
    if kind == "prompt":
        if not msg.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        return msg.prompt, None, None
    if kind == "prompt_token_ids":
        ids = tuple(msg.prompt_token_ids.ids)
        if not ids:
            raise InvalidArgument("prompt_token_ids.ids", "must not be empty")
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]  # before the length check, as for text and chat
        check_prompt_length("prompt_token_ids", len(ids), limits)
        check_token_ids("prompt_token_ids.ids", ids, limits.vocab_size)
        return None, ids, None
    return None, None, to_chat(msg.chat, limits, "chat")


def to_chat(msg: pb.ChatInput, limits: Limits, field: str) -> domain.Chat:
    if not limits.has_chat_template:
        raise FailedPrecondition(f"{field}: this model has no chat template; send a prompt")
    if not msg.messages:
        raise InvalidArgument(f"{field}.messages", "must not be empty")
    _check_count(f"{field}.messages", len(msg.messages), "messages", limits.caps.max_chat_messages,
                 "--max-chat-messages")  # fmt: skip
    for i, turn in enumerate(msg.messages):
        if not turn.role:
            raise InvalidArgument(f"{field}.messages[{i}].role", "must not be empty")
        if len(turn.role) > MAX_ROLE_CHARS:
            raise InvalidArgument(
                f"{field}.messages[{i}].role", f"at most {MAX_ROLE_CHARS} characters"
            )
    return domain.Chat(
        turns=tuple(domain.ChatTurn(t.role, t.content) for t in msg.messages),
        add_generation_prompt=msg.add_generation_prompt
        if msg.HasField("add_generation_prompt")
        else True,
    )


def check_token_ids(field: str, ids: tuple[int, ...] | list[int], vocab_size: int) -> None:
    # max() runs in C: a Python loop over a long list would hold the event loop.
    if not ids or max(ids) < vocab_size:
        return
    i, token = next((i, t) for i, t in enumerate(ids) if t >= vocab_size)
    raise InvalidArgument(
        f"{field}[{i}]", f"token id {token} is outside the vocabulary (size {vocab_size})"
    )


def _check_count(field: str, count: int, what: str, cap: int, flag: str) -> None:
    if count > cap:
        raise InvalidArgument(field, f"{count} {what} exceed the server's {flag} of {cap}")


def to_tokenize_input(
    msg: pb.TokenizeRequest, limits: Limits
) -> tuple[str | None, domain.Chat | None, bool | None]:
    """The text or chat to tokenize, and add_special_tokens (None: the default).

    Refused before any work when the input is over --max-tokenize-chars or its
    answer could not be sent (the engine checks a chat's rendered text again)."""
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input", "one of text or chat is required")
    add_special = msg.add_special_tokens if msg.HasField("add_special_tokens") else None
    cap = limits.caps.max_tokenize_chars
    if kind == "chat":
        chat = to_chat(msg.chat, limits, "chat")
        chars = sum(len(t.role) + len(t.content) for t in chat.turns)
        _check_count("chat.messages", chars, "characters", cap, "--max-tokenize-chars")
        return None, chat, add_special
    _check_count("text", len(msg.text), "characters", cap, "--max-tokenize-chars")
    domain.check_tokenize_answer("text", msg.text, limits)
    return msg.text, None, add_special


def tokenize_truncation(msg: pb.TokenizeRequest) -> int | None:
    """TokenizeRequest.truncate_prompt_tokens, checked (>= 1; None: keep all)."""
    return _truncation(msg, None)


def truncate_tokenized(tokenized: domain.Tokenized, keep: int | None) -> domain.Tokenized:
    """The last `keep` tokens with their strings and offsets; the text stays whole."""
    if keep is None or len(tokenized.token_ids) <= keep:
        return tokenized
    return replace(
        tokenized, token_ids=tokenized.token_ids[-keep:], tokens=tokenized.tokens[-keep:],
        offsets=tokenized.offsets[-keep:],
    )  # fmt: skip


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


def to_detokenize_ids(msg: pb.DetokenizeRequest, limits: Limits) -> list[int]:
    """The ids to decode, refused before any work when there are more than
    --max-detokenize-tokens, their text might not be sendable, or one is
    outside the vocabulary."""
    count = len(msg.token_ids)
    _check_count("token_ids", count, "token ids", limits.caps.max_detokenize_tokens,
                 "--max-detokenize-tokens")  # fmt: skip
    bound = count * limits.max_token_bytes + domain.ANSWER_OVERHEAD_BYTES
    limits.check_answer_fits(
        "token_ids", bound, f"{count} ids, up to {limits.max_token_bytes} bytes each"
    )
    ids = list(msg.token_ids)
    check_token_ids("token_ids", ids, limits.vocab_size)
    return ids


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
    _check_count("sampling.stop_token_ids", len(msg.stop_token_ids), "stop token ids",
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
    _check_count("sampling.n", msg.n, "completions", limits.caps.max_n_sequences,
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
    _check_count("sampling.logit_bias", len(msg.logit_bias), "entries", caps.max_logit_bias,
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
    _check_count("sampling.allowed_token_ids", len(allowed), "token ids",
                 caps.max_allowed_token_ids, "--max-allowed-token-ids")  # fmt: skip
    check_token_ids("sampling.allowed_token_ids", allowed, limits.vocab_size)
    kw["allowed_token_ids"] = tuple(allowed) if allowed else None
    _check_count("sampling.bad_words", len(msg.bad_words), "bad words", caps.max_bad_words,
                 "--max-bad-words")  # fmt: skip
    for i, word in enumerate(msg.bad_words):
        if not word.strip():
            raise InvalidArgument(f"sampling.bad_words[{i}]", "must not be empty or blank")
        _check_count(f"sampling.bad_words[{i}]", len(word), "characters",
                     caps.max_bad_word_chars, "--max-bad-word-chars")  # fmt: skip
    kw["bad_words"] = tuple(msg.bad_words)
    return kw


def _stop_strings(msg: pb.SamplingParams, limits: Limits) -> tuple[str, ...]:
    caps = limits.caps
    _check_count("sampling.stop", len(msg.stop), "stop strings", caps.max_stop_strings,
                 "--max-stop-strings")  # fmt: skip
    for i, stop in enumerate(msg.stop):
        if not stop:
            raise InvalidArgument(f"sampling.stop[{i}]", "must not be empty")
        # vLLM matches each one at every step and holds back that much streamed text.
        _check_count(f"sampling.stop[{i}]", len(stop), "characters", caps.max_stop_string_chars,
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
    _check_count(field, chars, "characters", cap, "--max-structured-output-chars")
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
