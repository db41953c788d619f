"""The Kubernetes patch that deploys a planned topology.

One node: a strategic-merge patch of the `llmgrpc` Deployment, shaped like the GPU
overlays' deployment-patch.yaml (deploy/k8s/overlays/gpu-*), applied on
deploy/k8s/base with components/nvidia-gpu. Several nodes: a kustomize `patches:`
entry for the `llmgrpc` LeaderWorkerSet of deploy/k8s/multinode, in JSON6902 form
(a CRD has no strategic-merge keys, so a merge patch would replace whole container
lists): the group size and each container's topology flags.

The engine flags are vLLM's own; `vllm_args` is what `llmgrpc plan` prints.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmgrpc.gpus import GpuType
from llmgrpc.topology import EP_DP, Topology

GPU_RESOURCE = "nvidia.com/gpu"
MODEL_CONFIGMAP = "llmgrpc-model"  # the overlays' configMapGenerator: MODEL_ID, SERVED_MODEL_NAME
LWS_NAME = "llmgrpc"
LEADER_CONTAINER = "llmgrpc-server"
WORKER_CONTAINER = "vllm-worker"
# What the base's server container already runs with (deploy/k8s/base/deployment.yaml).
MODEL_ARGS = ("--model=$(MODEL_ID)", "--served-model-name=$(SERVED_MODEL_NAME)")
SERVER_ARGS = ("--port=50051", "--metrics-port=9400", "--drain-timeout=30")
# Host memory per GPU for loading shards and the engine's buffers, as the gpu-moe overlay.
CPU_PER_GPU = (6, 12)  # request, limit
MEMORY_GIB_PER_GPU = 32
DSHM_GIB = 16  # NCCL and vLLM's message queues use shared memory once there is more than one rank


def vllm_args(t: Topology, native_weight_dtype: str) -> list[str]:
    """vLLM's engine flags for the topology, as the leader (node rank 0) takes them."""
    layout = t.layout
    args = []
    if layout.tp > 1:
        args.append(f"--tensor-parallel-size={layout.tp}")
    if layout.pp > 1:
        args.append(f"--pipeline-parallel-size={layout.pp}")
    if layout.kind == EP_DP:
        args += [f"--data-parallel-size={layout.dp}", "--enable-expert-parallel"]
    if t.weight_dtype == "fp8" and native_weight_dtype != "fp8":
        args.append("--quantization=fp8")  # vLLM quantizes a 16-bit checkpoint as it loads
    if t.kv_dtype not in ("auto", "bfloat16", "bf16"):
        args.append(f"--kv-cache-dtype={t.kv_dtype}")
    args += [
        f"--max-model-len={t.context_len}",
        f"--gpu-memory-utilization={t.gpu_memory_utilization:g}",
    ]
    return args


def multinode_args(t: Topology) -> tuple[list[str], list[str]]:
    """(leader, worker) flags that join the nodes: vLLM's --nnodes/--node-rank launch,
    wired to LeaderWorkerSet's LWS_LEADER_ADDRESS and LWS_WORKER_INDEX."""
    common = [f"--nnodes={t.nodes}", "--master-addr=$(LWS_LEADER_ADDRESS)"]
    return [*common, "--node-rank=0"], [*common, "--node-rank=$(LWS_WORKER_INDEX)", "--headless"]


def patch(t: Topology, gpu: GpuType, native_weight_dtype: str) -> dict[str, Any]:
    """{"kind": "Deployment" | "LeaderWorkerSet", "target": where it applies, "yaml": text}."""
    engine = vllm_args(t, native_weight_dtype)
    if t.nodes == 1:
        return {
            "kind": "Deployment",
            "target": "deploy/k8s/base with components/nvidia-gpu "
            "(an overlay's deployment-patch.yaml)",
            "yaml": to_yaml(deployment_patch(t, gpu, engine)),
        }
    return {
        "kind": "LeaderWorkerSet",
        "target": "deploy/k8s/multinode (an overlay's kustomization.yaml `patches:`)",
        "yaml": to_yaml({"patches": [leaderworkerset_patch(t, gpu, engine)]}),
    }


def deployment_patch(t: Topology, gpu: GpuType, engine: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "server",
        "args": [*MODEL_ARGS, *engine, *SERVER_ARGS],
        "env": _model_env(),
        "resources": _resources(t.gpus_per_node),
    }
    spec: dict[str, Any] = {"affinity": _gpu_affinity(gpu), "containers": [container]}
    if t.gpus > 1:
        spec["volumes"] = [_dshm()]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llmgrpc"},
        "spec": {"template": {"spec": spec}},
    }


def leaderworkerset_patch(t: Topology, gpu: GpuType, engine: list[str]) -> dict[str, Any]:
    leader, worker = multinode_args(t)
    lwt = "/spec/leaderWorkerTemplate"
    ops: list[dict[str, Any]] = [{"op": "replace", "path": f"{lwt}/size", "value": t.nodes}]
    for template, args in (
        ("leaderTemplate", [*MODEL_ARGS, *engine, *leader, *SERVER_ARGS]),
        ("workerTemplate", ["$(MODEL_ID)", *engine, *worker]),
    ):
        pod = f"{lwt}/{template}/spec"
        resources = _resources(t.gpus_per_node)
        ops += [
            {"op": "replace", "path": f"{pod}/containers/0/args", "value": args},
            {"op": "replace", "path": f"{pod}/containers/0/resources", "value": resources},
            {"op": "replace", "path": f"{pod}/affinity", "value": _gpu_affinity(gpu)},
        ]
    target = {"group": "leaderworkerset.x-k8s.io", "kind": "LeaderWorkerSet", "name": LWS_NAME}
    return {"target": target, "patch": to_yaml(ops)}


def _model_env() -> list[dict[str, Any]]:
    return [
        {"name": key, "valueFrom": {"configMapKeyRef": {"name": MODEL_CONFIGMAP, "key": key}}}
        for key in ("MODEL_ID", "SERVED_MODEL_NAME")
    ]


def _resources(gpus: int) -> dict[str, Any]:
    cpu_request, cpu_limit = CPU_PER_GPU
    memory = f"{MEMORY_GIB_PER_GPU * gpus + (DSHM_GIB if gpus > 1 else 0)}Gi"
    return {
        "requests": {"cpu": str(cpu_request * gpus), "memory": memory, GPU_RESOURCE: gpus},
        "limits": {"cpu": str(cpu_limit * gpus), "memory": memory, GPU_RESOURCE: gpus},
    }


def _gpu_affinity(gpu: GpuType) -> dict[str, Any]:
    term = {
        "matchExpressions": [
            {"key": "nvidia.com/gpu.product", "operator": "In", "values": list(gpu.products)}
        ]
    }
    required = {"nodeSelectorTerms": [term]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}


def _dshm() -> dict[str, Any]:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{DSHM_GIB}Gi"}}


# --- a small YAML emitter (the client has no YAML dependency) ---------------------------------

_PLAIN = re.compile(r"[A-Za-z_/$.-][A-Za-z0-9_./=$()-]*\Z")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists, strings, ints and bools; strings that YAML could
    read as something else are written as JSON strings (valid YAML double-quoted scalars)."""
    return "\n".join(_lines(value, indent)) + "\n"


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if _is_scalar(item) or item in ({}, []):
                lines.append(f"{pad}{key}: {_scalar(item)}")
            elif isinstance(item, str):
                lines.append(f"{pad}{key}: |-")
                lines += [f"{pad}  {line}" for line in item.splitlines()]
            else:
                lines.append(f"{pad}{key}:")
                lines += _lines(item, indent + 2)
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            if _is_scalar(item):
                lines.append(f"{pad}- {_scalar(item)}")
            else:
                inner = _lines(item, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
        return lines
    return [f"{pad}{_scalar(value)}"]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float) or (isinstance(value, str) and "\n" not in value)


def _scalar(value: Any) -> str:
    if value == {}:
        return "{}"
    if value == []:
        return "[]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)
