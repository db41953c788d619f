"""What the engine reports about the model and itself: `GetModelInfo`'s facts
read from vLLM's config once the engine is up, and the tokenizer's and
scheduler's facts the request limits need."""

from __future__ import annotations

import logging
from typing import Any

import vllm

from llmgrpc_server import domain
from llmgrpc_server.domain import Limits

log = logging.getLogger(__name__)


def model_info(vllm_config: Any, model_path: str, limits: Limits, lora: domain.LoraSupport,
               adapters: tuple[domain.AdapterInfo, ...]) -> domain.ModelInfo:  # fmt: skip
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    return domain.ModelInfo(
        model_name=domain.served_names(mc.served_model_name, mc.model)[0],
        model_path=model_path,
        max_model_len=mc.max_model_len,
        dtype=str(mc.dtype).removeprefix("torch."),
        vocab_size=mc.get_vocab_size(),
        engine_version=f"vllm {vllm.__version__}",
        kv_cache_dtype=kv_dtype(str(cc.cache_dtype), str(mc.dtype)),
        kv_cache=domain.KvCacheInfo(
            block_size=int(cc.block_size),
            num_blocks=int(cc.num_gpu_blocks or 0),
            memory_bytes=int(getattr(cc, "kv_cache_memory_bytes", None) or 0),
        ),
        hf_config=hf_config(mc),
        has_chat_template=limits.has_chat_template,
        max_logprobs=limits.max_logprobs,
        lora=lora,
        priority_scheduling=limits.priority_scheduling,
        max_n=limits.caps.max_n_sequences,
        adapters=adapters,
    )


def max_token_bytes(tokenizer: Any) -> int:
    """What one id can cost in a Detokenize answer: the longest token string's
    UTF-8 bytes (a decoded token is never longer: "Ġ" becomes one space, "<0x41>"
    one byte), plus a space some decoders put between tokens."""
    return max(len(token.encode()) for token in tokenizer.get_vocab()) + 1


def scheduling_policy(vllm_config: Any) -> str:
    """vLLM's --scheduling-policy ("fcfs" or "priority")."""
    scheduler = getattr(vllm_config, "scheduler_config", None)  # absent from test stubs
    return str(getattr(scheduler, "policy", "fcfs"))


def kv_dtype(cache_dtype: str, model_dtype: str) -> str:
    return model_dtype.removeprefix("torch.") if cache_dtype == "auto" else cache_dtype


def hf_config(model_config: Any) -> dict[str, Any]:
    try:
        return dict(model_config.hf_config.to_dict())
    except Exception:
        log.warning("could not read the model's config", exc_info=True)
        return {}
