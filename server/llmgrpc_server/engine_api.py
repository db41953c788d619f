"""The interface the servicer needs from an engine.

`vllm_adapter.engine.VllmEngine` implements it on vLLM; tests implement it with a
small fake. Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from llmgrpc_server import domain
from llmgrpc_server.domain import Limits


class Engine(Protocol):
    @property
    def limits(self) -> Limits: ...

    @property
    def is_dead(self) -> bool:
        """True once the engine cannot serve again (the process must restart)."""
        ...

    def model_info(self) -> domain.ModelInfo:
        """The model's facts, its LoRA settings and adapters."""
        ...

    async def load_adapter(self, name: str, path: Path) -> tuple[domain.AdapterInfo, bool]:
        """Register and load a LoRA adapter: (its facts, whether it was already loaded)."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """New requests naming it are NOT_FOUND; running ones finish with it."""
        ...

    def check_model(self, adapter: str | None) -> None:
        """NotFound (or FailedPrecondition without LoRA) unless None or a served adapter."""
        ...

    def generate(self, request: domain.GenerationRequest) -> AsyncIterator[domain.Delta]:
        """Stream deltas. Cancelling the iteration aborts the engine request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def tokenize(
        self, text: str | None, chat: domain.Chat | None, add_special_tokens: bool | None
    ) -> domain.Tokenized:
        """Large inputs are tokenized off the event loop."""
        ...

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool) -> str: ...

    def num_unfinished_requests(self) -> int: ...

    async def shutdown(self) -> None: ...
