"""The in-process benchmark backend: AsyncLLM driven as llmgrpc-server drives it.

`llmgrpc bench --backend inprocess` measures the limit a front end can reach:
the same engine with no network and no gRPC. The caller builds the
engine's arguments with llmgrpc-server's own flag parsing (`main.parse`:
embedded-model defaults, KV cache size, served name; llmgrpc.bench_backends
does), its settings are cached as the server caches them, and prompts are
tokenized here and passed as ids, rendered on the event loop, as the adapter
does (engine.engine_input).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from llmgrpc.bench_backends import Lifecycle, Recorder, RequestResult
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from llmgrpc_server.vllm_adapter.engine import engine_input
from llmgrpc_server.vllm_adapter.settings import cache_vllm_settings, use_working_compile_cache


class InProcessBackend(Lifecycle):
    """vLLM's AsyncLLM in this process, streaming DELTA outputs."""

    def __init__(self, engine_args: AsyncEngineArgs):
        self.name = "inprocess"
        self.engine_args = engine_args
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None

    async def start(self) -> None:
        use_working_compile_cache()  # as the server does: compared like for like
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args)
        cache_vllm_settings()
        self._llm, self._tokenizer = llm, llm.get_tokenizer()

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def count_tokens(self, text: str) -> int | None:
        return len(self._tokenizer.encode(text))

    async def send(self, prompt: str, max_tokens: int, ignore_eos: bool) -> RequestResult:
        assert self._llm is not None, "start() first"
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, temperature=0.0,
                                output_kind=RequestOutputKind.DELTA)  # fmt: skip
        rec = Recorder()
        try:
            ids = self._tokenizer.encode(prompt)
            async for out in self._llm.generate(
                engine_input(self._llm, ids), params, uuid.uuid4().hex
            ):
                rec.message(len(out.outputs[0].token_ids))
            return rec.done(len(ids))
        except Exception as e:
            return rec.failed(type(e).__name__)
