"""Domain types shared by the conversion layer and the engine adapter.

Plain frozen dataclasses: no protobuf, no vLLM. The servicer turns protobuf
into these (see convert.py), the engine adapter turns these into vLLM calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from llmgrpc_server.errors import InvalidArgument, PromptTooLong


class FinishReason(Enum):
    """How a request that succeeded ended; every other end is an error status."""

    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Chat:
    turns: tuple[ChatTurn, ...]
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; None means "the engine's default"."""

    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # (token id, bias) pairs, ids in the vocabulary, biases finite.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: any token may be generated.
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    # Completions of the prompt (vLLM's n).
    n: int = 1
    # Alternatives per prompt token; None: no prompt logprobs.
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of the fields is set."""

    # The schema as parsed (once, by the conversion layer).
    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    chat: Chat | None = None
    sampling: Sampling = field(default_factory=Sampling)
    structured_output: StructuredOutput | None = None
    # Absolute time.monotonic() after which the request is pointless.
    deadline: float | None = None
    # time.monotonic() when the server received the request: TTFT counts from here.
    received: float | None = None
    # The LoRA adapter the request names in `model` (None: the base model).
    adapter: str | None = None
    # Keep only the last k prompt tokens, before any length check (None: all).
    truncate_prompt_tokens: int | None = None
    # The caller's W3C trace context (traceparent, tracestate), for the engine.
    trace_headers: tuple[tuple[str, str], ...] = ()
    # vLLM's scheduling priority: lower runs first.
    priority: int = 0


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    rank: int
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens, and the logprobs of all but the first (no context)."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    time_to_first_token: float
    total: float


@dataclass
class Delta:
    """New output since the previous Delta of the same request.

    The last Delta of each completion (`index`) has `finish_reason`; the last
    Delta of the request also has `usage` (all completions) and `timing`.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_string: str | None = None
    stop_token_id: int | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    # Which of the request's n completions this extends.
    index: int = 0
    # On the request's first delta only, when asked for.
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Tokenized:
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    text: str
    max_model_len: int


@dataclass(frozen=True)
class KvCacheInfo:
    block_size: int
    num_blocks: int
    memory_bytes: int

    @property
    def token_capacity(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True)
class LoraSupport:
    enabled: bool = False
    max_loras: int = 0
    max_lora_rank: int = 0
    max_cpu_loras: int = 0


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    base_model: str
    rank: int
    target_modules: tuple[str, ...]
    loaded: bool
    source: str


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    model_path: str
    max_model_len: int
    dtype: str
    vocab_size: int
    engine_version: str
    kv_cache_dtype: str
    kv_cache: KvCacheInfo
    # The model's Hugging Face config.json, for the architecture facts.
    hf_config: dict[str, object]
    has_chat_template: bool
    max_logprobs: int
    lora: LoraSupport = field(default_factory=LoraSupport)
    priority_scheduling: bool = False
    max_n: int = 1
    adapters: tuple[AdapterInfo, ...] = ()


# --- limits -------------------------------------------------------------------


@dataclass(frozen=True)
class SizeCaps:
    """The operator's caps on inputs whose cost grows with their size (one flag
    each, validated in config.ServerConfig), and the largest message gRPC
    sends, which every answer must fit in."""

    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 256
    max_structured_output_chars: int = 65_536
    max_chat_messages: int = 1_024
    max_tokenize_chars: int = 131_072
    max_detokenize_tokens: int = 65_536
    # OpenAI's own cap on logit_bias entries.
    max_logit_bias: int = 300
    max_allowed_token_ids: int = 4_096
    # vLLM bans each word with and without a leading space: 64 words stay
    # within its VLLM_MAX_NUM_BAD_WORDS of 128 token sequences.
    max_bad_words: int = 64
    max_bad_word_chars: int = 256
    # Completions per request (vLLM's own cap, VLLM_MAX_N_SEQUENCES, is 16,384).
    max_n_sequences: int = 16
    max_message_bytes: int = 16 * 1024 * 1024


# Bounds on an answer's size, so that a request whose answer cannot be sent
# is refused before the work. A TokenizeResponse costs at most this much per
# UTF-8 byte of the text tokenized: a token never covers less than one byte
# (byte-level BPE, SentencePiece byte fallback) and costs at most 5 bytes of
# id, 14 of offsets and 8 of string ("<0xE4>" and its header); plus the text.
TOKENIZE_ANSWER_BYTES_PER_BYTE = 28
# Headers, a few special tokens (BOS, EOS) and max_model_len.
ANSWER_OVERHEAD_BYTES = 1024


@dataclass(frozen=True)
class Limits:
    """What the served model and the operator allow."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int = 20
    max_request_id_len: int = 256
    # The model's longest token, decoded, in UTF-8 bytes (+1 for a space some
    # decoders put between tokens): what one id can cost in a Detokenize answer.
    max_token_bytes: int = 64
    caps: SizeCaps = field(default_factory=SizeCaps)
    has_chat_template: bool = True
    # The names a request may ask for (vLLM's served model names); a request
    # that names none is served too.
    model_names: tuple[str, ...] = ()
    # The operator's caps (--max-prompt-tokens, --max-tokens-limit); None: the
    # model's context is the only bound.
    max_prompt_tokens_cap: int | None = None
    max_tokens_cap: int | None = None
    # The engine schedules by request priority (vLLM's --scheduling-policy priority).
    priority_scheduling: bool = False

    @property
    def max_prompt_tokens(self) -> int:
        # At least one token of the context must be left to generate.
        return _smaller(self.max_model_len - 1, self.max_prompt_tokens_cap)

    @property
    def max_tokens(self) -> int:
        return _smaller(self.max_model_len, self.max_tokens_cap)

    def capped(self, max_prompt_tokens: int | None, max_tokens: int | None) -> Limits:
        """These limits with the operator's caps (None leaves a cap unset)."""
        return replace(self, max_prompt_tokens_cap=max_prompt_tokens, max_tokens_cap=max_tokens)

    def check_answer_fits(self, field: str, answer_bytes: int, per_unit: str) -> None:
        """InvalidArgument, before the work, when an answer of up to
        `answer_bytes` could not be sent (`per_unit`: how that bound is made)."""
        limit = self.caps.max_message_bytes
        if answer_bytes > limit:
            raise InvalidArgument(
                field,
                f"the answer could reach {answer_bytes} bytes ({per_unit}), over the "
                f"server's --max-message-bytes of {limit}; send less or raise --max-message-bytes",
            )


def check_tokenize_answer(field: str, text: str, limits: Limits) -> None:
    """Refuse, before tokenizing, a text whose TokenizeResponse might not be sendable."""
    text_bytes = len(text.encode())
    bound = text_bytes * TOKENIZE_ANSWER_BYTES_PER_BYTE + ANSWER_OVERHEAD_BYTES
    per_unit = f"{text_bytes} bytes of text, up to {TOKENIZE_ANSWER_BYTES_PER_BYTE} each"
    limits.check_answer_fits(field, bound, per_unit)


# A unary GenerateResponse costs at most, per generated token: its text and id,
# and with logprobs one TokenLogprob (its token's string plus 23 bytes of id,
# logprob, rank and framing) holding up to k + 1 TopLogprobs (string + 18).
_ID_BYTES, _LOGPROB_BYTES, _TOP_BYTES = 5, 23, 18


def check_generate_answer(request: GenerationRequest, limits: Limits, default_max_tokens: int
                          ) -> None:  # fmt: skip
    """Refuse, before the work, a unary Generate whose answer might not be sendable
    (GenerateStream sends the same tokens in many messages)."""
    s, token = request.sampling, limits.max_token_bytes
    max_tokens = min(s.max_tokens or default_max_tokens, limits.max_tokens) * s.n
    per_token = token + _ID_BYTES
    if s.logprobs is not None:
        per_token += token + _LOGPROB_BYTES + (s.logprobs + 1) * (token + _TOP_BYTES)
    completions = f" ({s.n} completions)" if s.n > 1 else ""
    limits.check_answer_fits(
        "sampling.max_tokens", max_tokens * per_token + ANSWER_OVERHEAD_BYTES,
        f"{max_tokens} tokens{completions}, up to {per_token} bytes each with their "
        "logprobs; GenerateStream sends them in many messages",
    )  # fmt: skip


def check_prompt_logprobs_answer(prompt_len: int, k: int, limits: Limits) -> None:
    """Refuse, before the work, prompt logprobs that might not fit in one message
    (they come whole, in the first one): per prompt token its id and string, and
    one TokenLogprob with up to k + 1 alternatives."""
    token = limits.max_token_bytes
    per_token = 2 * token + _ID_BYTES + _LOGPROB_BYTES + (k + 1) * (token + _TOP_BYTES)
    limits.check_answer_fits(
        "sampling.prompt_logprobs", prompt_len * per_token + ANSWER_OVERHEAD_BYTES,
        f"{prompt_len} prompt tokens, up to {per_token} bytes each with {k} alternatives",
    )  # fmt: skip


def _smaller(model_limit: int, cap: int | None) -> int:
    return model_limit if cap is None else min(model_limit, cap)


def truncate_prompt(ids: list[int], keep: int | None) -> list[int]:
    """The last `keep` of `ids` (vLLM's truncate_prompt_tokens); all when None."""
    return ids if keep is None or len(ids) <= keep else ids[-keep:]


def check_prompt_length(field: str, num_tokens: int, limits: Limits) -> None:
    """PromptTooLong (with the limit and the actual length) past the prompt limit."""
    if num_tokens > limits.max_prompt_tokens:
        limit = limits.max_prompt_tokens
        raise PromptTooLong(field, limit, num_tokens, by=prompt_limit_source(limits))


def prompt_limit_source(limits: Limits) -> str:
    """What sets the prompt limit: the operator's flag or the model's context."""
    capped = limits.max_prompt_tokens_cap is not None and (
        limits.max_prompt_tokens_cap < limits.max_model_len - 1
    )
    return "the server's --max-prompt-tokens" if capped else "the model's limit"


def served_names(served: str | Sequence[str] | None, model: str) -> tuple[str, ...]:
    """The names a model answers to: vLLM's --served-model-name, else its path or id."""
    if not served:
        return (model,)
    return (served,) if isinstance(served, str) else tuple(served)


def check_token_ids(field: str, ids: tuple[int, ...] | list[int], vocab_size: int) -> None:
    # max() runs in C: a Python loop over a long list would hold the event loop.
    if not ids or max(ids) < vocab_size:
        return
    i, token = next((i, t) for i, t in enumerate(ids) if t >= vocab_size)
    raise InvalidArgument(
        f"{field}[{i}]", f"token id {token} is outside the vocabulary (size {vocab_size})"
    )


def check_count(field: str, count: int, what: str, cap: int, flag: str) -> None:
    if count > cap:
        raise InvalidArgument(field, f"{count} {what} exceed the server's {flag} of {cap}")
