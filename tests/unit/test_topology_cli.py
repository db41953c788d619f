"""`llmgrpc plan MODEL --gpu NAME` as a user runs it: the table, --json, and the printed
Kubernetes patch rendered with kustomize onto the bases it names (deploy/k8s/base for
one node, deploy/k8s/multinode's LeaderWorkerSet for several) and validated."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
from typing import Any

import pytest
import yaml
from llmgrpc import plan
from llmgrpc.gpus import GPUS

from tests.manifests import K8S, flag, one, render, schema_errors

NEW_MODELS = ("deepseek-v3", "llama-3.1-405b")
# Flags that differ by role in a LeaderWorkerSet group; every other flag must match.
LEADER_ONLY = {"--port", "--metrics-port", "--drain-timeout", "--node-rank"}
WORKER_ONLY = {"--headless", "--node-rank"}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmgrpc")
    plan.add_parser(parser.add_subparsers(dest="command"))
    return plan.run(parser.parse_args(["plan", *argv]))


def planned(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert run([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def table(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert run(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("model", NEW_MODELS)
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_table_and_json_agree_for_the_new_models(
    model: str, gpu: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = planned(capsys, model, "--gpu", gpu)
    t = out["topology"]
    assert out["fits"] is True and t["fits"] is True
    assert t["tp"] * t["pp"] * t["dp"] == t["gpus"] == t["nodes"] * t["gpus_per_node"]
    assert t["tp"] <= GPUS[gpu].gpus_per_node
    assert out["weight_dtype"] == t["weight_dtype"]
    assert out["deployment"]["kind"] == ("Deployment" if t["nodes"] == 1 else "LeaderWorkerSet")
    assert out["architecture"]["num_layers"] == {"deepseek-v3": 61, "llama-3.1-405b": 126}[model]
    text = table(capsys, model, "--gpu", gpu)
    assert f"Topology on {gpu}" in text
    assert f"nodes                     {t['nodes']} x {t['gpus_per_node']} GPUs" in text
    assert f"KV tokens per replica     {t['kv_token_capacity']:,}" in text
    assert f"full-context seqs         {t['max_concurrent_sequences']:,} per replica" in text
    assert " ".join(t["vllm_args"]) in text
    assert "<- chosen" in text


def test_deepseek_v3_on_h100_takes_two_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    out = planned(capsys, "deepseek-v3", "--gpu", "H100-80GB")
    t = out["topology"]
    assert (t["nodes"], t["gpus_per_node"]) == (2, 8)
    assert t["expert_parallel"] and (t["dp"], t["tp"], t["ep"]) == (16, 1, 16)
    assert out["weight_dtype"] == "fp8"  # as released: no --quantization flag
    assert "--quantization=fp8" not in t["vllm_args"]
    assert "--enable-expert-parallel" in t["vllm_args"]
    text = table(capsys, "deepseek-v3", "--gpu", "H100-80GB")
    assert "nodes                     2 x 8 GPUs (16 in all)" in text
    assert "parallelism               EP 16 (DP 16 x TP 1)" in text


def test_llama_405b_on_h100_is_tp8_pp2_in_bf16(capsys: pytest.CaptureFixture[str]) -> None:
    out = planned(capsys, "llama-3.1-405b", "--gpu", "H100-80GB")
    t = out["topology"]
    assert (t["nodes"], t["gpus_per_node"], t["tp"], t["pp"]) == (2, 8, 8, 2)
    assert out["weight_dtype"] == "bfloat16"
    assert out["weight_dtype_reason"] == "the checkpoint's own"
    alternative = out["fp8_alternative"]  # shown, not chosen: quantizing is the user's call
    assert (alternative["nodes"], alternative["tp"], alternative["weight_dtype"]) == (1, 8, "fp8")
    assert "--quantization=fp8" in alternative["vllm_args"]
    asked = planned(capsys, "llama-3.1-405b", "--gpu", "H100-80GB", "--weight-dtype", "fp8")
    assert (asked["topology"]["nodes"], asked["topology"]["tp"]) == (1, 8)


def test_a100_plans_deepseek_v3_in_bf16(capsys: pytest.CaptureFixture[str]) -> None:
    out = planned(capsys, "deepseek-v3", "--gpu", "A100-80GB")
    assert out["weight_dtype"] == "bfloat16"
    assert "cannot run" in out["weight_dtype_reason"]
    assert all(t["weight_dtype"] == "bfloat16" for t in out["considered"])
    assert out["fp8_alternative"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["deepseek-v3", "--gpu", "A100-80GB", "--weight-dtype", "fp8"], "no fp8 support"),
        (["llama-3.1-70b", "--gpu", "H100-80GB", "--tp", "2"], "--gpu picks the TP size"),
        (["llama-3.1-70b", "--gpu", "B200"], "unknown GPU"),
    ],
)
def test_errors_exit_1(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_nothing_fitting_exits_1_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["deepseek-v3", "--gpu", "H100-80GB", "--max-nodes", "1", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["topology"] is None and out["deployment"] is None
    assert run(["deepseek-v3", "--gpu", "H100-80GB", "--max-nodes", "1"]) == 1
    assert "nothing fits in up to 1 nodes" in capsys.readouterr().out


def test_concurrency_grows_the_topology(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["llama-3.1-405b", "--gpu", "H100-80GB"]
    assert planned(capsys, *base, "--concurrency", "5")["topology"]["nodes"] == 2
    assert planned(capsys, *base, "--concurrency", "6")["topology"]["nodes"] == 3


def test_four_gpu_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    out = planned(capsys, "llama-3.1-405b", "--gpu", "L40S-48GB", "--gpus-per-node", "4")
    t = out["topology"]
    assert out["gpu"]["gpus_per_node"] == 4
    assert (t["tp"], t["gpus_per_node"], t["gpus"]) == (4, 4, 4 * t["nodes"])
    assert all(c["tp"] <= 4 for c in out["considered"])
    assert run(["gpt2", "--gpu", "L40S-48GB", "--gpus-per-node", "0"]) == 1
    assert "GPUs per node must be positive" in capsys.readouterr().err


# --------------------------------------------------------------------------- the printed patch


def _relative(directory: pathlib.Path, path: pathlib.Path) -> str:
    return os.path.relpath(path, directory)  # kustomize takes relative paths only


def _deployment(patch: dict[str, Any], directory: pathlib.Path) -> list[dict[str, Any]]:
    """base + components/nvidia-gpu + the printed patch, as an overlay would have them."""
    (directory / "deployment-patch.yaml").write_text(patch["yaml"])
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "llmgrpc",
        "resources": [_relative(directory, K8S / "base")],
        "components": [_relative(directory, K8S / "components" / "nvidia-gpu")],
        "patches": [{"path": "deployment-patch.yaml"}],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(directory)


def _leaderworkerset(patch: dict[str, Any], directory: pathlib.Path) -> list[dict[str, Any]]:
    """deploy/k8s/multinode + the printed `patches:` entry."""
    printed = yaml.safe_load(patch["yaml"])
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "llmgrpc",
        "resources": [_relative(directory, K8S / "multinode")],
        "patches": printed["patches"],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(directory)


def _gpus(container: dict[str, Any]) -> int:
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    return int(resources["limits"]["nvidia.com/gpu"])


@pytest.mark.parametrize(
    ("model", "gpu", "gpus"),
    [
        ("llama-3.1-70b", "H100-80GB", 4),
        ("deepseek-v3", "H200-141GB", 8),
        ("mistral-7b", "L40S-48GB", 1),
    ],
)
def test_one_node_patch_renders_onto_the_base(
    model: str, gpu: str, gpus: int, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    out = planned(capsys, model, "--gpu", gpu)
    assert out["topology"]["nodes"] == 1 and out["deployment"]["kind"] == "Deployment"
    objs = _deployment(out["deployment"], tmp_path)
    assert not schema_errors(objs), schema_errors(objs)
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    server = next(c for c in spec["containers"] if c["name"] == "server")
    printed = yaml.safe_load(out["deployment"]["yaml"])["spec"]["template"]["spec"]
    assert server["args"] == printed["containers"][0]["args"]
    assert set(out["topology"]["vllm_args"]) <= set(server["args"])
    assert _gpus(server) == gpus
    assert flag(server["args"], "--model") is not None and server["image"] == "llmgrpc"
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    products = terms["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert products["values"] == list(GPUS[gpu].products)
    assert server["startupProbe"]["grpc"]["port"] == 50051  # the base's container is kept


def _role_flags(args: list[str], role_only: set[str]) -> list[str]:
    return [a for a in args if a.split("=", 1)[0] not in role_only]


@pytest.mark.parametrize(
    ("model", "gpu"),
    [("llama-3.1-405b", "H100-80GB"), ("deepseek-v3", "H100-80GB"), ("deepseek-v3", "A100-80GB")],
)
def test_multinode_patch_renders_onto_the_leaderworkerset(
    model: str, gpu: str, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    out = planned(capsys, model, "--gpu", gpu)
    t = out["topology"]
    assert t["nodes"] > 1 and out["deployment"]["kind"] == "LeaderWorkerSet"
    objs = _leaderworkerset(out["deployment"], tmp_path)
    assert not schema_errors(objs), schema_errors(objs)  # includes the vendored LWS CRD
    template = one(objs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    assert template["size"] == t["nodes"]
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    for container in (leader, worker):
        assert set(t["vllm_args"]) <= set(container["args"])
        assert _gpus(container) == t["gpus_per_node"]
        assert container["image"] == "llmgrpc"  # the base's container, only patched
    assert _role_flags(leader["args"], LEADER_ONLY) == _role_flags(worker["args"], WORKER_ONLY)
    assert "--headless" in worker["args"] and "--headless" not in leader["args"]
    if t["expert_parallel"]:
        # vLLM's data-parallel launch (its EP guide; the gpu-deepseek-v3-ep overlay):
        # no --nnodes, which counts TP x PP ranks and would refuse TP 1 over 2 nodes.
        local = t["dp"] // t["nodes"]
        for container in (leader, worker):
            assert flag(container["args"], "--data-parallel-size-local") == str(local)
            assert flag(container["args"], "--data-parallel-address") == "$(LWS_LEADER_ADDRESS)"
            assert flag(container["args"], "--nnodes") is None
        shell, dash_c, script, _ = worker["command"]
        assert (shell, dash_c) == ("/bin/sh", "-c")
        assert f"--data-parallel-start-rank=$((LWS_WORKER_INDEX * {local}))" in script
        assert script.startswith('exec python3 -m vllm.entrypoints.cli.main serve "$@" ')
    else:
        assert flag(leader["args"], "--node-rank") == "0"
        assert flag(worker["args"], "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert flag(leader["args"], "--nnodes") == "$(LWS_GROUP_SIZE)"
    for pod in (template["leaderTemplate"], template["workerTemplate"]):
        dshm = pod["spec"]["volumes"][1]
        assert (dshm["name"], dshm["emptyDir"]["sizeLimit"]) == ("dshm", "64Gi")
    check = worker["livenessProbe"]["exec"]["command"]
    processes = t["gpus_per_node"] // (t["tp"] if t["expert_parallel"] else 1)
    assert f"--min-workers={processes}" in check


@pytest.mark.parametrize(
    ("model", "overlay"),
    [("llama-3.1-405b", "gpu-llama-405b-multinode"), ("deepseek-v3", "gpu-deepseek-v3-ep")],
)
def test_plan_agrees_with_the_multinode_overlays(
    model: str, overlay: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hand-written overlays deploy what the planner recommends on H100s at their
    65,536-token context: the same group size and parallel layout."""
    t = planned(capsys, model, "--gpu", "H100-80GB", "--context-len", "65536")["topology"]
    lws = one(render(K8S / "overlays" / overlay), "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    args = lws["leaderTemplate"]["spec"]["containers"][0]["args"]
    assert lws["size"] == t["nodes"]
    parallel = re.compile(
        r"--(tensor|pipeline|data)-parallel-size=|--enable-expert-parallel|--max-model-len="
    )
    planned_flags = {a for a in t["vllm_args"] if parallel.match(a)}
    overlay_flags = {a for a in args if parallel.match(a)}
    # vLLM's defaults: TP 1 and PP 1 may be written out or left implicit.
    implicit = {"--tensor-parallel-size=1", "--pipeline-parallel-size=1"}
    assert planned_flags == overlay_flags - implicit


def test_data_parallel_worker_command_runs_vllm_with_its_first_rank(tmp_path: pathlib.Path) -> None:
    """The worker's shell computes --data-parallel-start-rank from LWS_WORKER_INDEX and
    execs vLLM with the container's args (a stand-in python3 echoes what it got)."""
    import subprocess

    from llmgrpc.deployment_patch import worker_dp_command

    fake = tmp_path / "python3"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    command = [*worker_dp_command(8), "--data-parallel-size=24", "--headless"]
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LWS_WORKER_INDEX": "2"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["-m", "vllm.entrypoints.cli.main", "serve", "--data-parallel-size=24",
                           "--headless", "--data-parallel-start-rank=16"]  # fmt: skip
