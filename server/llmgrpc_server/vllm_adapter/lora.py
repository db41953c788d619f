"""LoRA adapters on vLLM: the registry's adapters as LoRARequests, loaded into
the engine (`AsyncLLM.add_lora`) so the first request naming one does not
wait for its weights; and the engine's adapter swaps on /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from vllm.lora.request import LoRARequest
from vllm.v1.engine.async_llm import AsyncLLM

from llmgrpc_server import domain
from llmgrpc_server.adapters import Adapter, Registry
from llmgrpc_server.errors import FailedPrecondition
from llmgrpc_server.metrics import LoraSwapMetrics
from llmgrpc_server.vllm_plugin import LORA_SWAPS_RPC, counting_lora_swaps

log = logging.getLogger(__name__)
# A scrape waits this long for the workers' counts, then serves the last ones.
SWAPS_READ_TIMEOUT = 1.0


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


async def export_swaps(llm: AsyncLLM, model_name: str) -> None:
    """llmgrpc_lora_adapter_{activations,loads}_total, counted from now on: the
    warm-up's dummy adapters and the startup loads are not swaps that requests
    caused. The counts are kept by our vLLM plugin in the workers."""
    if llm.vllm_config.lora_config is None:
        return
    if not counting_lora_swaps():  # asking the workers would log vLLM's traces
        log.warning("LoRA adapter swaps are not counted: VLLM_PLUGINS leaves out "
                    "llmgrpc's vLLM plugin llmgrpc_cpu_lora")  # fmt: skip
        return
    try:
        baseline = await _swaps(llm)
    except Exception:  # NotImplementedError's message, from the engine process
        log.warning("LoRA adapter swaps are not counted: the engine's workers do not answer "
                    "%s", LORA_SWAPS_RPC, exc_info=True)  # fmt: skip
        return
    loop = asyncio.get_running_loop()

    def read() -> tuple[int, int] | None:
        """From the /metrics thread: the counts, read on the event loop."""
        if loop.is_closed():  # the server has stopped
            return None
        with contextlib.suppress(RuntimeError):  # no loop running in this thread
            if asyncio.get_running_loop() is loop:
                return None  # waiting here would stall the loop that must answer
        future = asyncio.run_coroutine_threadsafe(_swaps(llm), loop)
        try:
            activations, loads = future.result(timeout=SWAPS_READ_TIMEOUT)
        except Exception:  # a busy or stopped engine: the last counts stay
            future.cancel()
            log.debug("LoRA swap counts not read", exc_info=True)
            return None
        return activations - baseline[0], loads - baseline[1]

    LoraSwapMetrics(model_name, read)


async def _swaps(llm: AsyncLLM) -> tuple[int, int]:
    first, *_ = await llm.collective_rpc(LORA_SWAPS_RPC)
    # Tensor- and pipeline-parallel workers swap the same adapters: the first
    # worker's counts are the engine's.
    return int(first[0]), int(first[1])
