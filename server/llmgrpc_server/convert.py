"""Pure conversion of protobuf requests into domain types (answers: responses.py).

Validation of everything a request can get wrong on its own (ranges, NaN,
empty input, ids outside the vocabulary) happens here, so that the engine
adapter only ever sees well-formed requests. Prompt *length* needs the
tokenizer and is checked by the engine adapter.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import replace

from llmgrpc.v1 import llm_service_pb2 as pb

from llmgrpc_server import call_metadata, domain
from llmgrpc_server.convert_sampling import to_sampling, to_structured_output
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
        domain.check_token_ids("prompt_token_ids.ids", ids, limits.vocab_size)
        return None, ids, None
    return None, None, to_chat(msg.chat, limits, "chat")


def to_chat(msg: pb.ChatInput, limits: Limits, field: str) -> domain.Chat:
    if not limits.has_chat_template:
        raise FailedPrecondition(f"{field}: this model has no chat template; send a prompt")
    if not msg.messages:
        raise InvalidArgument(f"{field}.messages", "must not be empty")
    domain.check_count(f"{field}.messages", len(msg.messages), "messages",
                       limits.caps.max_chat_messages, "--max-chat-messages")  # fmt: skip
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
        domain.check_count("chat.messages", chars, "characters", cap, "--max-tokenize-chars")
        return None, chat, add_special
    domain.check_count("text", len(msg.text), "characters", cap, "--max-tokenize-chars")
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


def to_detokenize_ids(msg: pb.DetokenizeRequest, limits: Limits) -> list[int]:
    """The ids to decode, refused before any work when there are more than
    --max-detokenize-tokens, their text might not be sendable, or one is
    outside the vocabulary."""
    count = len(msg.token_ids)
    domain.check_count("token_ids", count, "token ids", limits.caps.max_detokenize_tokens,
                       "--max-detokenize-tokens")  # fmt: skip
    bound = count * limits.max_token_bytes + domain.ANSWER_OVERHEAD_BYTES
    limits.check_answer_fits(
        "token_ids", bound, f"{count} ids, up to {limits.max_token_bytes} bytes each"
    )
    ids = list(msg.token_ids)
    domain.check_token_ids("token_ids", ids, limits.vocab_size)
    return ids
