"""GetModelInfo facts on both embedded models, and the planner's KV prediction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from llmgrpc import Client
from llmgrpc.v1 import llm_service_pb2 as pb

from tests.server_process import ServerProcess

pytestmark = pytest.mark.engine
CLI = str(Path(sys.executable).parent / "llmgrpc")


def test_llama_gqa_facts(llama: ServerProcess) -> None:
    with Client(llama.target) as client:
        info = client.model_info()
    a, kv = info.architecture, info.kv_cache
    assert info.model_name == "tiny-llama-gqa" and info.max_model_len == 2048
    assert info.dtype == "bfloat16" and info.vocab_size == 512
    assert info.engine_version.startswith("vllm 0.32")
    assert a.attention_kind == pb.ATTENTION_KIND_GQA
    assert (a.num_attention_heads, a.num_kv_heads, a.gqa_group_size, a.head_dim) == (4, 2, 2, 64)
    assert a.position_encoding == "rope" and a.rope_theta == 10000.0
    assert not a.HasField("sliding_window") and a.num_experts == 0
    assert a.total_parameters == a.active_parameters > 0
    # 2 (K and V) x 2 KV heads x 64 dims x 2 layers x 2 bytes (bf16)
    assert a.kv_cache_bytes_per_token == 2 * 2 * 64 * 2 * 2 == 1024
    # The engine got 64 MiB: the planner predicts the tokens it can hold, and
    # vLLM allocates whole blocks of that (tolerance: one block).
    assert kv.memory_bytes == 64 * 1024 * 1024
    assert kv.predicted_token_capacity == 65536
    assert abs(kv.token_capacity - kv.predicted_token_capacity) <= kv.block_size
    assert kv.token_capacity == kv.num_blocks * kv.block_size
    assert info.capabilities.chat_template


def test_mixtral_moe_facts_and_cli(moe: ServerProcess) -> None:
    with Client(moe.target) as client:
        info = client.model_info()
        a = info.architecture
        assert (a.num_experts, a.experts_per_token) == (4, 2)
        assert a.active_parameters < a.total_parameters
        # Each token uses 2 of 4 experts: the routed MLP weights count half.
        mlp_per_expert = 3 * 256 * 256
        assert a.total_parameters - a.active_parameters == 2 * 2 * mlp_per_expert
        resp = client.generate("Hello", max_tokens=8, temperature=0.0)
        assert len(resp.token_ids) == 8
    out = subprocess.run([CLI, "info", "--target", moe.target], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert "4 routed, 2 per token" in out and "active per token" in out


def test_chat_on_the_base_model_is_failed_precondition(moe: ServerProcess) -> None:
    """tiny-mixtral-moe is built as a base model, with no chat template."""
    chat = [("user", "Hello")]
    with Client(moe.target) as client:
        assert client.model_info().capabilities.chat_template is False
        calls = {
            "Generate": lambda: client.generate(messages=chat, max_tokens=2),
            "GenerateStream": lambda: list(client.stream(messages=chat, max_tokens=2)),
            "Tokenize": lambda: client.tokenize(messages=chat),
        }
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, method
            assert "chat template" in (e.value.details() or ""), method
        # Prompts are served as ever.
        assert len(client.generate("Hello", max_tokens=2, ignore_eos=True).token_ids) == 2
        assert client.tokenize("Hello").token_ids
