"""GetModelInfo: the engine's facts plus the architecture facts of the config.

The architecture arithmetic (attention kind, parameters, KV bytes per token)
lives in `llmgrpc.architecture`, which the planner builds on, so `llmgrpc plan` and a running
server always agree.
"""

from __future__ import annotations

import logging

from llmgrpc import architecture
from llmgrpc.v1 import llm_service_pb2 as pb

from llmgrpc_server import domain

log = logging.getLogger(__name__)

STRUCTURED_OUTPUT_KINDS = ("json_schema", "regex", "choice", "grammar")

_ATTENTION = {
    "MHA": pb.ATTENTION_KIND_MHA,
    "GQA": pb.ATTENTION_KIND_GQA,
    "MQA": pb.ATTENTION_KIND_MQA,
    "MLA": pb.ATTENTION_KIND_MLA,
}


def architecture_facts(info: domain.ModelInfo) -> architecture.ArchitectureFacts | None:
    try:
        return architecture.facts_from_config(info.hf_config)
    except Exception:  # an exotic config must not break GetModelInfo
        log.warning("architecture facts unavailable for %s", info.model_name, exc_info=True)
        return None


def to_architecture(facts: architecture.ArchitectureFacts, kv_dtype: str) -> pb.Architecture:
    msg = pb.Architecture(
        model_type=facts.model_type,
        architectures=list(facts.architectures),
        num_layers=facts.num_layers,
        hidden_size=facts.hidden_size,
        intermediate_size=facts.intermediate_size,
        num_attention_heads=facts.num_attention_heads,
        num_kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        attention_kind=_ATTENTION.get(facts.attention_kind, pb.ATTENTION_KIND_UNSPECIFIED),
        gqa_group_size=facts.gqa_group_size,
        position_encoding=facts.position_encoding,
        num_experts=facts.num_experts,
        experts_per_token=facts.experts_per_token,
        num_shared_experts=facts.num_shared_experts,
        total_parameters=facts.total_parameters,
        active_parameters=facts.active_parameters,
        kv_cache_bytes_per_token=facts.kv_cache_bytes_per_token(kv_dtype),
        kv_cache_dtype=kv_dtype,
        vocab_size=facts.vocab_size,
        max_position_embeddings=facts.max_position_embeddings,
    )
    if facts.rope_theta is not None:
        msg.rope_theta = facts.rope_theta
    if facts.sliding_window is not None:
        msg.sliding_window = facts.sliding_window
    return msg


def to_model_info_response(info: domain.ModelInfo, service_version: str) -> pb.GetModelInfoResponse:
    facts = architecture_facts(info)
    kv = info.kv_cache
    per_token = facts.kv_cache_bytes_per_token(info.kv_cache_dtype) if facts else 0
    return pb.GetModelInfoResponse(
        model_name=info.model_name,
        model_path=info.model_path,
        max_model_len=info.max_model_len,
        dtype=info.dtype,
        vocab_size=info.vocab_size,
        engine_version=info.engine_version,
        service_version=service_version,
        architecture=to_architecture(facts, info.kv_cache_dtype) if facts else None,
        kv_cache=pb.KvCache(
            block_size=kv.block_size,
            num_blocks=kv.num_blocks,
            token_capacity=kv.token_capacity,
            memory_bytes=kv.memory_bytes,
            predicted_token_capacity=kv.memory_bytes // per_token if per_token else 0,
        ),
        capabilities=pb.Capabilities(
            chat_template=info.has_chat_template,
            structured_output=list(STRUCTURED_OUTPUT_KINDS),
            max_logprobs=info.max_logprobs,
            priority_scheduling=info.priority_scheduling,
            max_n=info.max_n,
        ),
        lora=pb.LoraSupport(
            enabled=info.lora.enabled, max_loras=info.lora.max_loras,
            max_lora_rank=info.lora.max_lora_rank, max_cpu_loras=info.lora.max_cpu_loras,
        ),
        adapters=[
            pb.Adapter(
                name=a.name, base_model=a.base_model, rank=a.rank,
                target_modules=list(a.target_modules), loaded=a.loaded, source=a.source,
            )
            for a in info.adapters
        ],
    )  # fmt: skip


def info_metric_labels(info: domain.ModelInfo) -> dict[str, str]:
    """Labels of the llmgrpc_model_info metric."""
    facts = architecture_facts(info)
    if facts is None:
        return {k: "" for k in _INFO_LABELS} | {
            "max_model_len": str(info.max_model_len),
            "dtype": info.dtype,
        }
    return {
        "architecture": ",".join(facts.architectures),
        "model_type": facts.model_type,
        "attention_kind": facts.attention_kind,
        "num_layers": str(facts.num_layers),
        "num_attention_heads": str(facts.num_attention_heads),
        "num_kv_heads": str(facts.num_kv_heads),
        "gqa_group_size": str(facts.gqa_group_size),
        "num_experts": str(facts.num_experts),
        "experts_per_token": str(facts.experts_per_token),
        "max_model_len": str(info.max_model_len),
        "dtype": info.dtype,
        "kv_cache_bytes_per_token": str(facts.kv_cache_bytes_per_token(info.kv_cache_dtype)),
        "total_parameters": str(facts.total_parameters),
        "active_parameters": str(facts.active_parameters),
    }


_INFO_LABELS = (
    "architecture", "model_type", "attention_kind", "num_layers", "num_attention_heads",
    "num_kv_heads", "gqa_group_size", "num_experts", "experts_per_token", "max_model_len",
    "dtype", "kv_cache_bytes_per_token", "total_parameters", "active_parameters",
)  # fmt: skip
