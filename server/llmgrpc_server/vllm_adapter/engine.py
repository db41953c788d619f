"""The engine: AsyncLLM behind the `engine_api.Engine` interface.

It owns cancellation (a cancelled or abandoned stream aborts the engine
request, freeing its KV cache) and translates vLLM's exceptions into the
service's error vocabulary. Request preparation is sampling.py, output
processing outputs.py, flags and settings settings.py, what it reports
about the model facts.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import vllm
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens
from vllm.v1.engine.async_llm import AsyncLLM

from llmgrpc_server import cpu_placement, domain, policy
from llmgrpc_server.adapters import Registry
from llmgrpc_server.domain import Limits, check_prompt_length
from llmgrpc_server.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from llmgrpc_server.vllm_adapter import facts, failures, frontends, lora, multinode
from llmgrpc_server.vllm_adapter.codec import Codec
from llmgrpc_server.vllm_adapter.outputs import OutputStream
from llmgrpc_server.vllm_adapter.sampling import to_sampling_params
from llmgrpc_server.vllm_adapter.settings import SUPPORTED_VLLM, cache_vllm_settings

log = logging.getLogger(__name__)


class VllmEngine:
    """AsyncLLM behind the `engine_api.Engine` interface."""

    def __init__(
        self, llm: AsyncLLM, model_path: str, *,
        max_prompt_tokens: int | None, max_tokens: int | None, max_tokens_per_message: int,
        size_caps: domain.SizeCaps = domain.SizeCaps(),  # noqa: B008 (frozen)
        known_adapters: frozenset[str] = frozenset(),
        coalesce_budget_s: float = policy.DEFAULT_COALESCE_BUDGET_S,
    ) -> None:  # fmt: skip
        self._llm = llm
        self._nodes: multinode.NodeWatch | None = None  # the other nodes, if any
        self._max_tokens_per_message = max_tokens_per_message
        self._coalesce_budget_s = coalesce_budget_s
        self._pace = policy.StepPace()
        self._model_path = model_path
        # The Hugging Face tokenizer itself: vLLM's TokenizerLike protocol omits
        # offsets and chat-template typing that we rely on.
        self._tokenizer: Any = llm.get_tokenizer()
        self._codec = Codec(self._tokenizer)
        self._in_flight: set[str] = set()
        config = llm.vllm_config.model_config
        self._limits = Limits(
            vocab_size=config.get_vocab_size(),
            max_model_len=config.max_model_len,
            max_logprobs=config.max_logprobs,
            has_chat_template=bool(getattr(self._tokenizer, "chat_template", None)),
            priority_scheduling=facts.scheduling_policy(llm.vllm_config) == "priority",
            model_names=domain.served_names(config.served_model_name, config.model),
            max_token_bytes=facts.max_token_bytes(self._tokenizer),
            caps=size_caps,
        ).capped(max_prompt_tokens, max_tokens)
        self._lora = lora.support(llm.vllm_config)
        # Requests in flight per adapter id, so that unloading waits for them.
        self._using: Counter[int] = Counter()
        self._idle: dict[int, asyncio.Event] = {}
        self.adapters = Registry(
            self._limits.model_names, enabled=self._lora.enabled,
            known_elsewhere=known_adapters.__contains__,
            capacity=self._lora.max_loras + self._lora.max_cpu_loras,
        )  # fmt: skip

    @classmethod
    async def start(
        cls, args: AsyncEngineArgs, *,
        max_prompt_tokens: int | None, max_tokens: int | None, max_tokens_per_message: int,
        pin_front_end: bool, size_caps: domain.SizeCaps = domain.SizeCaps(),  # noqa: B008 (frozen)
        lora_modules: tuple[tuple[str, str], ...] = (),
        known_adapters: frozenset[str] = frozenset(),
        coalesce_budget_s: float = policy.DEFAULT_COALESCE_BUDGET_S,
        slot: frontends.Slot | None = None,
    ) -> VllmEngine:  # fmt: skip
        """Build the engine; the caps are the operator's (--max-prompt-tokens,
        --max-tokens-limit) on top of the model's context; `pin_front_end`
        keeps this process and its engine core off the CPU worker's cores
        (cpu_placement; not with --api-server-count, whose engine core is not
        ours)."""
        if not vllm.__version__.startswith(SUPPORTED_VLLM):
            log.warning("vLLM %s is untested; supported: %s", vllm.__version__, SUPPORTED_VLLM)
        # Building the engine blocks for tens of seconds (weights, KV cache,
        # warm-up): keep the event loop free so health checks answer meanwhile.
        # On a multi-node leader the start also waits for the other nodes.
        if slot is not None:  # one of several front ends: the engine runs beside us
            llm = await asyncio.to_thread(slot.connect, args)
        else:
            llm = await multinode.while_joining(
                args, lambda: asyncio.to_thread(AsyncLLM.from_engine_args, args)
            )
        cache_vllm_settings()
        if pin_front_end and slot is None:  # N front ends are meant to spread over cores
            cpu_placement.place_front_end()
        engine = cls(
            llm,
            str(args.model),
            max_prompt_tokens=max_prompt_tokens,
            max_tokens=max_tokens,
            max_tokens_per_message=max_tokens_per_message,
            size_caps=size_caps,
            known_adapters=known_adapters,
            coalesce_budget_s=coalesce_budget_s,
        )
        engine._nodes = multinode.NodeWatch(llm, multinode.topology(args))
        for name, path in lora_modules:  # before SERVING: a request finds them loaded
            await lora.load(llm, engine.adapters, name, Path(path), "startup")
        await lora.export_swaps(llm, engine.limits.model_names[0])
        return engine

    # --- Engine interface ---------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def is_dead(self) -> bool:
        return bool(self._llm.errored) or (self._nodes is not None and self._nodes.lost)

    def num_unfinished_requests(self) -> int:
        return int(self._llm.output_processor.get_num_unfinished_requests())

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def check_model(self, adapter: str | None) -> None:
        self.adapters.lookup(adapter)

    async def load_adapter(self, name: str, path: Path) -> tuple[domain.AdapterInfo, bool]:
        adapter, existing = await lora.load(self._llm, self.adapters, name, path, "admin")
        return self.adapters.info(adapter), existing

    async def unload_adapter(self, name: str) -> None:
        """New requests naming it are NOT_FOUND at once; the engine drops its
        weights once the requests running with it have finished."""
        adapter = self.adapters.remove(name)
        if self._using[adapter.lora_id]:
            idle = self._idle.setdefault(adapter.lora_id, asyncio.Event())
            await idle.wait()
            del self._idle[adapter.lora_id]
        await self._llm.remove_lora(adapter.lora_id)

    async def shutdown(self) -> None:
        if self._nodes is not None:
            self._nodes.stop()
        # AsyncLLM.shutdown stops the engine core, then cancels its output
        # handler. Run in a thread, as here, it leaves the event loop (and so
        # the handler) running meanwhile: the handler saw the engine core go
        # and logged "AsyncLLM output_handler failed" with an EngineDeadError
        # trace at every clean stop. The server has drained by now, so the
        # handler has nothing left to deliver: cancel it first.
        handler = getattr(self._llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
        await asyncio.to_thread(self._llm.shutdown)

    async def generate(self, request: domain.GenerationRequest) -> AsyncIterator[domain.Delta]:
        arrival = time.monotonic() if request.received is None else request.received
        _check_deadline(request)
        if self.is_dead:
            raise Unavailable("the engine has stopped; retry on another replica")
        adapter = lora.lora_request(self.adapters.lookup(request.adapter))
        request_id = request.request_id
        if request_id in self._in_flight:
            raise AlreadyExists(f"request_id {request_id!r} is already in flight")
        if adapter is not None:
            self._using[adapter.lora_int_id] += 1
        # Claimed before the prompt is tokenized: a duplicate costs no work.
        self._in_flight.add(request_id)
        try:
            prompt_ids, params = await self._prepare(request)
            stream = self._output_stream(request, prompt_ids, arrival)
            try:
                last = None  # when this stream's previous message came (StepPace)
                async for output in self._llm.generate(
                    engine_input(self._llm, prompt_ids), params, request_id,
                    lora_request=adapter, **self._request_options(request),
                ):
                    now = time.monotonic()
                    if last is not None and output.outputs:
                        steps = max(len(c.token_ids) for c in output.outputs)
                        self._pace.observe(now - last, steps, now)
                    last = now
                    for delta in stream.deltas(output):
                        yield delta
            except (asyncio.CancelledError, GeneratorExit):
                # The caller went away (cancel, disconnect, deadline): free the
                # request's KV cache now rather than when it would have finished.
                await self._abort_quietly(request_id)
                raise
            except ServiceError:
                # Ours, from outputs.py: a failed finish (the request is over) or
                # outputs that do not add up (it may still run: free it).
                await self._abort_quietly(request_id)
                raise
            except Exception as e:
                await self._abort_quietly(request_id)  # a no-op if vLLM already ended it
                # vLLM's own errors become ours (failures.VLLM_ERRORS); anything
                # else goes on as is: INTERNAL, with the trace in the log.
                failure = failures.translate(e)
                if failure is e:
                    raise
                raise failure from e
        finally:
            self._in_flight.discard(request_id)
            if adapter is not None:
                self._release(adapter.lora_int_id)

    def _release(self, lora_id: int) -> None:
        self._using[lora_id] -= 1
        if self._using[lora_id] <= 0:
            del self._using[lora_id]
            if lora_id in self._idle:
                self._idle[lora_id].set()

    async def _prepare(self, request: domain.GenerationRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and vLLM's sampling parameters for `request`."""
        if _input_chars(request.prompt, request.chat) > policy.INLINE_TOKENIZE_CHARS:
            # About a second per MB: off the event loop, so one huge prompt
            # does not stall every other call and the health checks.
            prompt_ids = await asyncio.to_thread(self._prompt_ids, request)
        else:
            prompt_ids = self._prompt_ids(request)
        others = len(self._in_flight) - 1  # in flight besides this request
        params = to_sampling_params(
            request, len(prompt_ids), self._limits,
            policy.tokens_per_message(others, self._max_tokens_per_message, self._pace.step_s,
                                      self._coalesce_budget_s),
        )  # fmt: skip
        _check_deadline(request)  # preparing may have taken it past its deadline
        return prompt_ids, params

    def _output_stream(self, request: domain.GenerationRequest, prompt_ids: list[int],
                       arrival: float) -> OutputStream:  # fmt: skip
        s, prompt_tokens = request.sampling, []
        if s.prompt_logprobs is not None:  # the prompt's strings, decoded as vLLM decodes logprobs
            prompt_tokens = convert_ids_list_to_tokens(self._tokenizer, prompt_ids)
        return OutputStream(
            request.request_id, len(prompt_ids), arrival, s.logprobs,
            prompt_top_n=s.prompt_logprobs, prompt_ids=prompt_ids, prompt_tokens=prompt_tokens,
        )  # fmt: skip

    def _request_options(self, request: domain.GenerationRequest) -> dict[str, Any]:
        """AsyncLLM.generate's keyword arguments beyond the prompt and sampling,
        those the request sets (the others keep vLLM's defaults)."""
        options: dict[str, Any] = {}
        if (headers := self._trace_headers(request)) is not None:
            options["trace_headers"] = headers
        if request.priority:
            options["priority"] = request.priority
        return options

    def _trace_headers(self, request: domain.GenerationRequest) -> dict[str, str] | None:
        # vLLM drops them, with a warning per request, unless it exports traces
        # itself (--otlp-traces-endpoint).
        if not request.trace_headers or not self._llm.observability_config.otlp_traces_endpoint:
            return None
        return dict(request.trace_headers)

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.shield(self._llm.abort(request_id))
        except Exception:  # the engine may already be gone
            log.debug("abort of %s failed", request_id, exc_info=True)

    async def tokenize(
        self, text: str | None, chat: domain.Chat | None, add_special_tokens: bool | None
    ) -> domain.Tokenized:
        if _input_chars(text, chat) <= policy.INLINE_TOKENIZE_CHARS:
            rendered, ids, offsets = self._encode(text, chat, add_special_tokens)
        else:
            # Encoding releases the GIL (codec.py): a thread.
            rendered, ids, offsets = await self._codec.in_background(
                self._encode, text, chat, add_special_tokens
            )
        tokens = self._codec.tokens(ids)
        # tuple() of the tokenizer's lists runs in C, not per element in Python.
        return domain.Tokenized(
            token_ids=tuple(ids),
            tokens=tuple(tokens),
            offsets=tuple(offsets),
            text=rendered,
            max_model_len=self._limits.max_model_len,
        )

    def _encode(
        self, text: str | None, chat: domain.Chat | None, add_special_tokens: bool | None
    ) -> tuple[str, list[int], list[tuple[int, int]]]:
        """The text tokenized (a chat rendered first): the text, its ids and their offsets."""
        if chat is not None:
            text = self._render_chat(chat)
            add_special = bool(add_special_tokens)  # the template writes them
            # The template adds text: the answer's bound is known only now.
            domain.check_tokenize_answer("chat", text, self._limits)
        else:
            add_special = True if add_special_tokens is None else add_special_tokens
        assert text is not None
        ids, offsets = self._codec.encode(text, add_special)
        return text, ids, offsets

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        if len(token_ids) > policy.INLINE_DETOKENIZE_IDS:
            return await self._codec.in_background(
                self._codec.decode, token_ids, skip_special_tokens
            )
        return self._codec.decode(token_ids, skip_special_tokens)

    def model_info(self) -> domain.ModelInfo:
        return facts.model_info(self._llm.vllm_config, self._model_path, self._limits,
                                self._lora, self.adapters.infos())  # fmt: skip

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
        ids = domain.truncate_prompt(ids, request.truncate_prompt_tokens)  # before the check
        check_prompt_length(field, len(ids), self._limits)
        return ids


def engine_input(llm: AsyncLLM, prompt_ids: list[int]) -> Any:
    """The prompt as vLLM's renderer makes it, made here, on the event loop.
    AsyncLLM.generate renders a raw TokensPrompt the same way but in its
    thread pool: for token ids a few checks, not worth two thread hand-offs
    a request (a fifth of the front end's busy time at c=64,
    docs/benchmarks.md). vLLM's documented way to skip that path."""
    parsed = parse_model_prompt(llm.model_config, TokensPrompt(prompt_token_ids=prompt_ids))
    (rendered,) = llm.renderer.render_cmpl([parsed], llm.renderer.default_cmpl_tok_params)
    return rendered


def _check_deadline(request: domain.GenerationRequest) -> None:
    if request.deadline is not None and time.monotonic() >= request.deadline:
        raise DeadlineExceeded("the request's deadline passed before it started")


def _input_chars(text: str | None, chat: domain.Chat | None) -> int:
    return len(text or "") + (sum(len(turn.content) for turn in chat.turns) if chat else 0)
