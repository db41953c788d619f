"""A small fake engine behind the same interface as the vLLM adapter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llmgrpc_server import domain
from llmgrpc_server.adapters import Registry
from llmgrpc_server.domain import Limits
from llmgrpc_server.errors import DeadlineExceeded, PromptTooLong

VOCAB = 128


class FakeEngine:
    """Echoes: token i of the output is the i-th prompt byte (mod VOCAB)."""

    def __init__(self, step_delay: float = 0.0, max_model_len: int = 64) -> None:
        self._limits = Limits(vocab_size=VOCAB, max_model_len=max_model_len, model_names=("fake",))
        self.step_delay = step_delay
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.fail_with: BaseException | None = None
        self.dead = False
        self.adapters = Registry(self._limits.model_names, enabled=False)
        # Every request that reached generate(), as the servicer handed it over.
        self.requests: list[domain.GenerationRequest] = []

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def is_dead(self) -> bool:
        return self.dead

    def num_unfinished_requests(self) -> int:
        return len(self.running)

    def model_info(self) -> domain.ModelInfo:
        return domain.ModelInfo(
            model_name="fake", model_path="/fake", max_model_len=self._limits.max_model_len,
            dtype="bfloat16", vocab_size=VOCAB, engine_version="fake 0",
            kv_cache_dtype="bfloat16",
            kv_cache=domain.KvCacheInfo(block_size=16, num_blocks=8, memory_bytes=8 * 16 * 1024),
            hf_config={
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                "max_position_embeddings": 64, "vocab_size": VOCAB,
                "rope_theta": 10000.0,
            },
            has_chat_template=True, max_logprobs=20,
            priority_scheduling=self._limits.priority_scheduling,
            max_n=self._limits.caps.max_n_sequences,
        )  # fmt: skip

    def check_model(self, adapter: str | None) -> None:
        self.adapters.lookup(adapter)

    def _ids(self, request: domain.GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.chat is not None:
            text = "".join(f"<{t.role}>{t.content}" for t in request.chat.turns)
        else:
            text = request.prompt or ""
        return domain.truncate_prompt([b % VOCAB for b in text.encode()],
                                      request.truncate_prompt_tokens)  # fmt: skip

    async def generate(self, request: domain.GenerationRequest) -> AsyncIterator[domain.Delta]:
        if request.deadline is not None and asyncio.get_running_loop().time() < 0:
            raise DeadlineExceeded("never")
        self.check_model(request.adapter)
        self.requests.append(request)
        ids = self._ids(request)
        if len(ids) >= self._limits.max_model_len:
            raise PromptTooLong("prompt", self._limits.max_model_len - 1, len(ids))
        if self.fail_with is not None:
            raise self.fail_with
        n = request.sampling.max_tokens or 16
        completions = request.sampling.n
        self.running.add(request.request_id)
        try:
            # With n > 1 the completions interleave; completion c is the echo shifted by c.
            for i in range(n):
                await asyncio.sleep(self.step_delay)
                for c in range(completions):
                    token = (ids[i % len(ids)] + c) % VOCAB
                    delta = domain.Delta(request.request_id, text=chr(32 + token % 90),
                                         token_ids=[token], index=c)  # fmt: skip
                    if i == 0 and c == 0 and request.sampling.prompt_logprobs is not None:
                        delta.prompt_logprobs = _prompt_logprobs(ids)
                    if i == n - 1:
                        delta.finish_reason = domain.FinishReason.LENGTH
                    if i == n - 1 and c == completions - 1:
                        delta.usage = domain.Usage(len(ids), n * completions)
                        delta.timing = domain.Timing(0.0, 0.0)
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request.request_id)
            raise
        finally:
            self.running.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def tokenize(self, text, chat, add_special_tokens):  # type: ignore[no-untyped-def]
        text = text or ""
        ids = tuple(b % VOCAB for b in text.encode())
        return domain.Tokenized(
            token_ids=ids, tokens=tuple(text), offsets=tuple((i, i + 1) for i in range(len(text))),
            text=text, max_model_len=self._limits.max_model_len,
        )  # fmt: skip

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        return "".join(chr(32 + t % 90) for t in token_ids)

    async def shutdown(self) -> None:
        pass


def _prompt_logprobs(ids: list[int]) -> domain.PromptLogprobs:
    """Made up: every prompt token after the first at logprob -1, rank 1."""
    tokens = tuple(chr(32 + t % 90) for t in ids)
    return domain.PromptLogprobs(tuple(ids), tokens, tuple(
        domain.TokenLogprob(t, s, -1.0, 1) for t, s in zip(ids[1:], tokens[1:], strict=True)))
