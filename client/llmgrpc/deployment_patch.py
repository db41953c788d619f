"""The Kubernetes patch that deploys a planned topology.

One node: a strategic-merge patch of the `llmgrpc` Deployment, shaped like the GPU
overlays' deployment-patch.yaml (deploy/k8s/overlays/gpu-*), for deploy/k8s/base
with components/nvidia-gpu. Several nodes: a kustomize `patches:` entry for the
`llmgrpc-lws` LeaderWorkerSet of deploy/k8s/multinode, in the JSON6902 shape that
base documents (a custom resource has no strategic-merge keys: a merge patch would
replace whole container lists): the group size, both containers' args, resources
and node affinity, and the worker check's process count.

The engine flags are vLLM's own; `vllm_args` is what `llmgrpc plan` prints.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmgrpc.gpus import GpuType
from llmgrpc.topology import EP_DP, Topology

GPU_RESOURCE = "nvidia.com/gpu"
LWS_NAME = "llmgrpc-lws"  # deploy/k8s/multinode/leaderworkerset.yaml
MASTER_PORT = 29501  # the multinode base's rendezvous port
DP_RPC_PORT = 13345  # the leader's data-parallel handshake port (the EP overlay's)
# The server flags each base runs with; their drain timeouts match the bases'
# terminationGracePeriodSeconds (70 s single node, 160 s for a LeaderWorkerSet leader).
DEPLOYMENT_SERVER_ARGS = ("--port=50051", "--metrics-port=9400", "--drain-timeout=30")
LEADER_SERVER_ARGS = ("--port=50051", "--metrics-port=9400", "--drain-timeout=120")
GRPC_PORT = 50051
# Host resources per GPU, as the multi-node overlays size an 8-GPU node.
CPU_PER_GPU = (8, 12)  # request, limit
MEMORY_GIB_PER_GPU = (64, 128)
DSHM_GIB = (16, 64)  # /dev/shm for NCCL and vLLM's queues: one node, a node of a group


def vllm_args(t: Topology, native_weight_dtype: str) -> list[str]:
    """vLLM's engine flags for the topology; every node of a group takes the same."""
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
        f"--gpu-memory-utilization={t.gpu_memory_utilization:.2f}",
    ]
    return args


def multinode_args(t: Topology) -> tuple[list[str], list[str]]:
    """(leader, worker) flags joining the group, wired to LeaderWorkerSet's env.

    TP x PP: vLLM's --nnodes/--node-rank launch (one engine spanning the nodes).
    EP/DP: vLLM's data-parallel launch, as its expert-parallel deployment guide and
    the gpu-deepseek-v3-ep overlay do: each node runs --data-parallel-size-local ranks
    and the remote ones register with the leader on --data-parallel-rpc-port; a
    worker's first rank comes from its index (WORKER_DP_COMMAND)."""
    if t.layout.kind == EP_DP:
        common = [
            f"--data-parallel-size-local={t.layout.dp // t.nodes}",
            "--data-parallel-address=$(LWS_LEADER_ADDRESS)",
            f"--data-parallel-rpc-port={DP_RPC_PORT}",
        ]
        return common, [*common, "--headless"]
    common = [
        "--nnodes=$(LWS_GROUP_SIZE)",
        "--master-addr=$(LWS_LEADER_ADDRESS)",
        f"--master-port={MASTER_PORT}",
    ]
    leader = [common[0], "--node-rank=0", *common[1:]]
    worker = [common[0], "--node-rank=$(LWS_WORKER_INDEX)", *common[1:], "--headless"]
    return leader, worker


def worker_dp_command(local_ranks: int) -> list[str]:
    """The worker's command for a data-parallel group: vLLM serve with its args and
    --data-parallel-start-rank = LWS_WORKER_INDEX x ranks per node (arithmetic that a
    Kubernetes $(VAR) reference cannot do, so a shell does it, then execs vLLM)."""
    script = (
        'exec python3 -m vllm.entrypoints.cli.main serve "$@" '
        f"--data-parallel-start-rank=$((LWS_WORKER_INDEX * {local_ranks}))"
    )
    return ["/bin/sh", "-c", script, "vllm-worker"]


def patch(t: Topology, gpu: GpuType, model: str, served_name: str, native: str) -> dict[str, Any]:
    """{"kind": "Deployment" | "LeaderWorkerSet", "target": where it applies, "yaml": text}."""
    engine = [f"--model={model}", f"--served-model-name={served_name}", *vllm_args(t, native)]
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
        "args": [*engine, *DEPLOYMENT_SERVER_ARGS],
        "resources": _resources(t.gpus_per_node),
    }
    spec: dict[str, Any] = {
        "affinity": {"nodeAffinity": _required([_node_term(gpu, t.gpus_per_node)])},
        "containers": [container],
    }
    if t.gpus > 1:
        spec["volumes"] = [_dshm(DSHM_GIB[0])]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "llmgrpc"},
        "spec": {"template": {"spec": spec}},
    }


def leaderworkerset_patch(t: Topology, gpu: GpuType, engine: list[str]) -> dict[str, Any]:
    leader, worker = multinode_args(t)
    # A headless node's vLLM process has one child per GPU (TP x PP) or per DP rank.
    processes = t.gpus_per_node // (t.layout.tp if t.layout.kind == EP_DP else 1)
    # vLLM closes the DP handshake port after startup; the leader's gRPC port lives
    # as long as its engine (the multinode base checks the rendezvous port).
    leader_port = GRPC_PORT if t.layout.kind == EP_DP else MASTER_PORT
    check = [
        "python3",
        "/etc/llmgrpc-worker-check/worker-check.py",
        f"--min-workers={processes}",
        f"--leader-port={leader_port}",
    ]
    lwt = "/spec/leaderWorkerTemplate"
    ops: list[dict[str, Any]] = [{"op": "replace", "path": f"{lwt}/size", "value": t.nodes}]
    for template, args in (
        ("leaderTemplate", [*engine, *leader, *LEADER_SERVER_ARGS]),
        ("workerTemplate", [*engine, *worker]),
    ):
        pod = f"{lwt}/{template}/spec"
        affinity = f"{pod}/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution"
        term = _node_term(gpu, t.gpus_per_node)
        ops += [
            _replace(f"{pod}/containers/0/args", args),
            _replace(f"{pod}/containers/0/resources", _resources(t.gpus_per_node, storage=True)),
            _replace(f"{affinity}/nodeSelectorTerms/0/matchExpressions", term["matchExpressions"]),
            _replace(f"{pod}/volumes/1/emptyDir/sizeLimit", f"{DSHM_GIB[1]}Gi"),  # dshm
        ]
    worker_probes = f"{lwt}/workerTemplate/spec/containers/0"
    if t.layout.kind == EP_DP:
        ops += [
            _replace(f"{worker_probes}/command", worker_dp_command(t.layout.dp // t.nodes)),
            _replace(f"{lwt}/leaderTemplate/spec/containers/0/ports/2",
                     {"name": "dp-rpc", "containerPort": DP_RPC_PORT, "protocol": "TCP"}),
        ]  # fmt: skip
    ops += [
        _replace(f"{worker_probes}/{probe}/exec/command", check)
        for probe in ("startupProbe", "livenessProbe")
    ]
    target = {"group": "leaderworkerset.x-k8s.io", "kind": "LeaderWorkerSet", "name": LWS_NAME}
    return {"target": target, "patch": to_yaml(ops)}


def _replace(path: str, value: Any) -> dict[str, Any]:
    return {"op": "replace", "path": path, "value": value}


def _resources(gpus: int, *, storage: bool = False) -> dict[str, Any]:
    """Requests and limits; `storage` restates the base's ephemeral storage, which a
    JSON6902 replace of the whole block would otherwise drop."""
    (cpu_request, cpu_limit), (memory_request, memory_limit) = CPU_PER_GPU, MEMORY_GIB_PER_GPU
    requests: dict[str, Any] = {
        "cpu": str(cpu_request * gpus),
        "memory": f"{memory_request * gpus}Gi",
    }
    limits: dict[str, Any] = {"cpu": str(cpu_limit * gpus), "memory": f"{memory_limit * gpus}Gi"}
    if storage:
        requests["ephemeral-storage"], limits["ephemeral-storage"] = "1Gi", "4Gi"
    requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = gpus
    return {"requests": requests, "limits": limits}


def _node_term(gpu: GpuType, gpus: int) -> dict[str, Any]:
    """Nodes of this GPU product (GPU feature discovery's labels) with enough of them."""
    expressions: list[dict[str, Any]] = [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": list(gpu.products)}
    ]
    if gpus > 1:
        expressions.append(
            {"key": "nvidia.com/gpu.count", "operator": "Gt", "values": [str(gpus - 1)]}
        )
    return {"matchExpressions": expressions}


def _required(terms: list[dict[str, Any]]) -> dict[str, Any]:
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}


def _dshm(gib: int) -> dict[str, Any]:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{gib}Gi"}}


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
