"""Domain generation requests to vLLM SamplingParams."""

from __future__ import annotations

import re

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from llmgrpc_server import domain, policy
from llmgrpc_server.errors import InvalidArgument, PromptTooLong


def to_sampling_params(
    request: domain.GenerationRequest, prompt_len: int, limits: domain.Limits,
    stream_interval: int,
) -> SamplingParams:  # fmt: skip
    """vLLM's sampling parameters for `request`, its prompt `prompt_len` tokens long.

    `stream_interval` is the tokens per streamed message (policy.tokens_per_message).
    """
    s = request.sampling
    if s.prompt_logprobs is not None:  # they come whole, in one message
        domain.check_prompt_logprobs_answer(prompt_len, s.prompt_logprobs, limits)
    room = limits.max_model_len - prompt_len
    if s.max_tokens is None:
        max_tokens = policy.default_max_tokens(room, limits.max_tokens)
    elif s.max_tokens > room:
        raise PromptTooLong(
            "sampling.max_tokens",
            limit=limits.max_model_len,
            actual=prompt_len + s.max_tokens,
            what="prompt + max_tokens",
        )
    else:
        max_tokens = s.max_tokens
    if s.min_tokens > max_tokens:
        raise InvalidArgument(
            "sampling.min_tokens",
            f"{s.min_tokens} exceeds max_tokens ({max_tokens}, the default when unset)",
        )
    try:
        return _vllm_sampling_params(request, max_tokens, stream_interval)
    except VLLMClientError as e:
        # vLLM's own checks, should a version tighten one convert.py knows;
        # any other exception is a bug (ours or vLLM's): INTERNAL, not the caller's.
        field = getattr(e, "parameter", None)
        raise InvalidArgument(f"sampling.{field}" if field else "sampling",
                              client_message(e)) from e  # fmt: skip


def _vllm_sampling_params(
    request: domain.GenerationRequest, max_tokens: int, stream_interval: int
) -> SamplingParams:
    s = request.sampling
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=s.min_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k or 0,
        min_p=s.min_p,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        stop=list(s.stop) or None,
        stop_token_ids=list(s.stop_token_ids) or None,
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        prompt_logprobs=s.prompt_logprobs,
        n=s.n,
        include_stop_str_in_output=s.include_stop_str_in_output,
        skip_special_tokens=s.skip_special_tokens,
        logit_bias=dict(s.logit_bias) or None,
        allowed_token_ids=None if s.allowed_token_ids is None else list(s.allowed_token_ids),
        bad_words=list(s.bad_words) or None,
        structured_outputs=_structured(request.structured_output),
        output_kind=RequestOutputKind.DELTA,
        stream_interval=stream_interval,
    )


# xgrammar prefixes its errors with a time and a C++ source location.
_NATIVE_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")


def client_message(error: Exception) -> str:
    """vLLM's message for a rejected request, without native-code noise."""
    return _NATIVE_PREFIX.sub("", str(error)).strip()


def _structured(spec: domain.StructuredOutput | None) -> StructuredOutputsParams | None:
    if spec is None:
        return None
    if spec.json_schema is not None:
        # Compact JSON: free whitespace lets a weak model pad forever and costs
        # tokens; the output still validates against the schema.
        return StructuredOutputsParams(json=spec.json_schema, disable_any_whitespace=True)
    if spec.choice is not None:
        return StructuredOutputsParams(choice=list(spec.choice))
    return StructuredOutputsParams(regex=spec.regex, grammar=spec.grammar)
