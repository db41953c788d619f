"""`llmgrpc plan` as a user runs it: arguments in, a table or JSON out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from llmgrpc import plan


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmgrpc")
    plan.add_parser(parser.add_subparsers(dest="command"))
    return plan.run(parser.parse_args(["plan", *argv]))


def test_json_output_parses_and_carries_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["llama-3.1-70b", "--tp", "2", "--context-len", "8192", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "llama-3.1-70b"
    assert out["architecture"]["attention_kind"] == "GQA"
    assert out["architecture"]["kv_cache_bytes_per_token"] == 327_680
    assert out["weight_bytes"]["bfloat16"] == 2 * out["architecture"]["total_parameters"]
    assert set(out["weight_bytes"]) == {"bfloat16", "fp8", "int8", "int4"}
    assert out["plan"]["num_gpus_tp"] == 2
    assert out["plan"]["kv_bytes_per_token_per_gpu"] == 163_840
    assert out["plan"]["fits"] is True and out["plan"]["shortfall_bytes"] == 0


def test_json_reports_mla_and_kv_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["deepseek-v2-lite", "--kv-dtype", "fp8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["architecture"]["attention_kind"] == "MLA"
    assert out["architecture"]["mla"]["kv_lora_rank"] == 512
    assert out["architecture"]["kv_cache_bytes_per_token"] == 576 * 27


def test_table_shows_facts_weights_and_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["mixtral-8x7b"]) == 0  # 87 GiB of bf16 weights on one 80 GiB GPU
    out = capsys.readouterr().out
    assert "46.70 B total, 12.88 B active per token" in out
    assert "8 routed + 0 shared, 2 routed per token" in out
    assert "131,072 B" in out
    for dtype in ("bfloat16", "fp8", "int8", "int4"):
        assert f"  {dtype}" in out
    assert "fits                    no: short by" in out


def test_table_for_a_model_that_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["mistral-7b", "--gpu-memory-gib", "24", "--weight-dtype", "int4"]) == 0
    out = capsys.readouterr().out
    assert "4,096 tokens in 32 of 32 layers" in out
    assert "fits                    yes" in out


def test_model_directory_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_positions": 128}))
    assert run([str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["position_encoding"] == "learned"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["no-such-model"], "not a model directory"),
        (["falcon-7b", "--tp", "2"], "71 attention heads"),
        (["gpt2", "--context-len", "4096"], "max_position_embeddings"),
    ],
)
def test_errors_exit_1_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_unsupported_architecture_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert run([str(tmp_path)]) == 1
    assert "not supported" in capsys.readouterr().err
