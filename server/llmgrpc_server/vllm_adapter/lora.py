"""LoRA adapters on vLLM: the registry's adapters as LoRARequests, loaded into
the engine (`AsyncLLM.add_lora`) so the first request naming one does not
wait for its weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vllm.lora.request import LoRARequest
from vllm.v1.engine.async_llm import AsyncLLM

from llmgrpc_server import domain
from llmgrpc_server.adapters import Adapter, Registry
from llmgrpc_server.errors import FailedPrecondition

log = logging.getLogger(__name__)


def lora_request(adapter: Adapter | None) -> LoRARequest | None:
    if adapter is None:
        return None
    return LoRARequest(adapter.name, adapter.lora_id, str(adapter.path))


def support(vllm_config: Any) -> domain.LoraSupport:
    lc = vllm_config.lora_config
    if lc is None:
        return domain.LoraSupport()
    return domain.LoraSupport(
        enabled=True, max_loras=int(lc.max_loras), max_lora_rank=int(lc.max_lora_rank),
        max_cpu_loras=int(lc.max_cpu_loras or lc.max_loras),
    )  # fmt: skip


async def load(llm: AsyncLLM, registry: Registry, name: str, path: Path, source: str
               ) -> tuple[Adapter, bool]:  # fmt: skip
    """Register and load one adapter; a broken one is FailedPrecondition and
    changes nothing. (adapter, already loaded)."""
    adapter, existing = registry.prepare(name, path, source)
    if existing:
        return adapter, True
    try:
        await llm.add_lora(lora_request(adapter))  # type: ignore[arg-type]
    except Exception as e:  # vLLM raises ValueError/RuntimeError subclasses of its own
        log.warning("adapter %s from %s failed to load", name, path, exc_info=True)
        raise FailedPrecondition(f"adapter {name!r} did not load: {e}") from e
    registry.add(adapter)
    log.info("adapter %s loaded from %s (rank %d, %s)", name, path, adapter.rank,
             ", ".join(adapter.target_modules))  # fmt: skip
    return adapter, False
