"""The multi-node manifests (issue 16): a LeaderWorkerSet per model replica.

deploy/k8s/multinode and the two overlays on it are rendered with kustomize,
validated against the Kubernetes schema and the vendored LeaderWorkerSet CRD
(its pod templates also as core PodTemplates), and checked for what
docs/deploy.md ("Beyond one node") promises: the group's pods as LWS creates
them (the labels and LWS_* variables its controller adds, read from
kubernetes-sigs/lws) get the right multi-node wiring, Services and the
ServiceMonitor reach leaders only, leader and worker agree on every engine
flag, the GPUs add up, and both roles are probed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
import pytest
import yaml

from tests.manifests import (
    K8S,
    flag,
    kubectl,
    of_kind,
    one,
    render_all,
    schema_errors,
    selects,
    validate,
)

MULTINODE = {
    "multinode": K8S / "multinode",
    "gpu-llama-405b-multinode": K8S / "overlays" / "gpu-llama-405b-multinode",
    "gpu-deepseek-v3-ep": K8S / "overlays" / "gpu-deepseek-v3-ep",
}
LWS_KIND = ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
GPU = "nvidia.com/gpu"
ENGINE_SERVICE = "llmgrpc.v1.LLMService"
# Labels LWS puts on every pod it creates (api/leaderworkerset/v1/leaderworkerset_types.go).
SET_NAME = "leaderworkerset.sigs.k8s.io/name"
GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
WORKER_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
# Flags that differ by role on purpose; every other flag must match.
LEADER_ONLY = {"--port", "--metrics-port", "--drain-timeout", "--node-rank"}
WORKER_ONLY = {"--headless", "--node-rank", "--data-parallel-start-rank"}
WORKER_COMMAND = ["python3", "-m", "vllm.entrypoints.cli.main", "serve"]
WORKER_CHECK = "worker-check.py"
MIN_DRAIN_MARGIN = 30
MIN_LEADER_STARTUP = 60 * 60


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl()
    return render_all(MULTINODE)


@pytest.fixture(params=sorted(MULTINODE))
def layout(request: pytest.FixtureRequest) -> str:
    return request.param


@dataclass(frozen=True)
class Pod:
    """One pod of group 0 as the LWS controller creates it."""

    role: str  # "leader" or "worker"
    index: int
    labels: dict[str, str]
    spec: dict[str, Any]
    env: dict[str, str]

    @property
    def container(self) -> dict[str, Any]:
        return self.spec["containers"][0]

    @property
    def args(self) -> list[str]:
        """The first container's args with $(VAR) expanded as the kubelet does."""

        def expand(match: re.Match[str]) -> str:
            assert match.group(1) in self.env, f"{self.role} arg uses $({match.group(1)}), which it does not define"
            return self.env[match.group(1)]

        return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, a) for a in self.container.get("args", [])]


def lws(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "LeaderWorkerSet")


def group(objs: list[dict[str, Any]]) -> list[Pod]:
    """Leader and workers of group 0: template labels and env plus what LWS adds
    (pkg/utils/pod/pod_utils.go AddLWSVariables: <lws>-<group>.<lws>.<ns>)."""
    obj = lws(objs)
    name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
    template = obj["spec"]["leaderWorkerTemplate"]
    size = template["size"]
    pods = []
    for index in range(size):
        role = "leader" if index == 0 else "worker"
        tmpl = template["leaderTemplate"] if index == 0 else template["workerTemplate"]
        env = {e["name"]: str(e["value"]) for e in tmpl["spec"]["containers"][0].get("env", []) if "value" in e}
        env |= {
            "LWS_LEADER_ADDRESS": f"{name}-0.{name}.{namespace}",
            "LWS_GROUP_SIZE": str(size),
            "LWS_WORKER_INDEX": str(index),
        }
        labels = {**tmpl["metadata"]["labels"], SET_NAME: name, GROUP_INDEX: "0", WORKER_INDEX: str(index)}
        pods.append(Pod(role, index, labels, tmpl["spec"], env))
    return pods


def _data_parallel(args: list[str]) -> bool:
    return flag(args, "--data-parallel-size") is not None


def _gpus(container: dict[str, Any]) -> int:
    res = container["resources"]
    request, limit = res["requests"].get(GPU), res["limits"].get(GPU)
    assert limit is not None and str(request) == str(limit), f"GPU request {request} != limit {limit}"
    return int(limit)


# --------------------------------------------------------------------------- schemas

def test_every_rendered_object_validates(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    errors = schema_errors(rendered[layout])
    assert not errors, "\n".join(errors)
    assert {o["metadata"].get("namespace") for o in rendered[layout] if o["kind"] != "Namespace"} == {"llmgrpc"}


def test_pod_templates_validate_as_core_pod_templates(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    """The CRD embeds PodTemplateSpec; the core schema checks it too, strictly."""
    template = lws(rendered[layout])["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": template[role]})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o["spec"]["leaderWorkerTemplate"].__setitem__("restartPolicy", "RecreateGroupOnRestart"),
        lambda o: o["spec"]["leaderWorkerTemplate"].__setitem__("size", "2"),
        lambda o: o["spec"].__setitem__("startupPolicy", "LeaderStarted"),
        lambda o: o["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0].__setitem__("argz", []),
    ],
)
def test_lws_validation_rejects_broken_objects(rendered: dict[str, list[dict[str, Any]]], mutate: Any) -> None:
    broken = copy.deepcopy(lws(rendered["multinode"]))
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_core_pod_template_validation_is_strict(rendered: dict[str, list[dict[str, Any]]]) -> None:
    template = copy.deepcopy(lws(rendered["multinode"])["spec"]["leaderWorkerTemplate"]["workerTemplate"])
    template["spec"]["containers"][0]["livenessProbe"]["exec"]["comand"] = []
    with pytest.raises(jsonschema.ValidationError):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"}, "template": template})


# --------------------------------------------------------------------------- the group

def test_one_leaderworkerset_replaces_the_deployment(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    objs = rendered[layout]
    assert not of_kind(objs, "Deployment")
    spec = lws(objs)["spec"]
    assert spec["startupPolicy"] == "LeaderCreated"
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert spec["leaderWorkerTemplate"]["size"] >= 2
    # LWS makes a headless Service named after the set for the pods' DNS
    # names, unless a Service of that name exists already.
    assert lws(objs)["metadata"]["name"] not in {s["metadata"]["name"] for s in of_kind(objs, "Service")}


def test_size_equals_nnodes_and_gpus_add_up(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    pods = group(rendered[layout])
    size = len(pods)
    leader_args = pods[0].args
    gpus = {_gpus(p.container) for p in pods}
    assert len(gpus) == 1, f"leader and workers ask for different GPU counts: {gpus}"
    per_node = gpus.pop()
    tp = int(flag(leader_args, "--tensor-parallel-size") or 1)
    if _data_parallel(leader_args):
        dp, local = int(flag(leader_args, "--data-parallel-size") or 1), int(flag(leader_args, "--data-parallel-size-local") or 0)
        assert dp * tp == per_node * size, f"DP {dp} x TP {tp} != {per_node} GPUs x {size} nodes"
        assert local * tp == per_node and dp == local * size
        assert flag(leader_args, "--nnodes") is None
    else:
        pp = int(flag(leader_args, "--pipeline-parallel-size") or 1)
        for pod in pods:
            assert int(flag(pod.args, "--nnodes") or 1) == size, f"{pod.role}: --nnodes is not the group size"
        assert tp * pp == per_node * size, f"TP {tp} x PP {pp} != {per_node} GPUs x {size} nodes"


def test_leader_is_llmgrpc_server_wired_from_lws_env(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    leader = group(rendered[layout])[0]
    c, args = leader.container, leader.args
    assert "command" not in c, "the leader runs the image's entrypoint, llmgrpc-server"
    assert "--headless" not in args
    address = leader.env["LWS_LEADER_ADDRESS"]
    if _data_parallel(args):
        assert flag(args, "--data-parallel-address") == address
        assert int(flag(args, "--data-parallel-start-rank") or 0) == 0
    else:
        assert flag(args, "--node-rank") == "0"
        assert flag(args, "--master-addr") == address
        assert flag(args, "--master-port")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == int(flag(args, "--port") or 50051)
    assert ports["metrics"] == int(flag(args, "--metrics-port") or 9400)


def test_workers_are_headless_vllm_wired_from_lws_env(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    leader, *workers = group(rendered[layout])
    assert workers
    for worker in workers:
        c, args = worker.container, worker.args
        assert c["image"] == leader.container["image"], "workers run vLLM from the leader's image"
        assert c["command"] == WORKER_COMMAND
        assert "--headless" in args
        if _data_parallel(leader.args):
            local = int(flag(args, "--data-parallel-size-local") or 0)
            assert int(flag(args, "--data-parallel-start-rank") or -1) == worker.index * local
            assert flag(args, "--data-parallel-address") == flag(leader.args, "--data-parallel-address")
            assert flag(args, "--data-parallel-rpc-port") == flag(leader.args, "--data-parallel-rpc-port")
        else:
            assert flag(args, "--node-rank") == str(worker.index)
            assert flag(args, "--master-addr") == flag(leader.args, "--master-addr")
            assert flag(args, "--master-port") == flag(leader.args, "--master-port")
        assert flag(args, "--data-parallel-hybrid-lb") is None and "--data-parallel-hybrid-lb" not in args


def _engine_flags(args: list[str], role_only: set[str]) -> list[str]:
    return sorted(a for a in args if a.split("=", 1)[0] not in role_only)


def test_leader_and_workers_agree_on_engine_flags(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    leader, *workers = group(rendered[layout])
    # --flag=value or a bare switch: one word per flag, so the lists compare word by word.
    assert all(a.startswith("--") for pod in [leader, *workers] for a in pod.args)
    expected = _engine_flags(leader.args, LEADER_ONLY)
    for worker in workers:
        assert _engine_flags(worker.args, WORKER_ONLY) == expected, f"worker {worker.index}"
        assert worker.env.keys() >= {"HF_HOME", "HF_HUB_OFFLINE"}
        assert {k: worker.env[k] for k in ("HF_HOME", "HF_HUB_OFFLINE")} == {
            k: leader.env[k] for k in ("HF_HOME", "HF_HUB_OFFLINE")
        }


def test_llmgrpc_and_vllm_parse_the_flags_into_the_same_engine(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    """The leader's args through llmgrpc-server's own parser, each worker's through
    vLLM 0.32's `serve` parser: every flag exists, and the engine arguments they
    make differ only in the node's place in the group."""
    import dataclasses

    from llmgrpc_server.main import parse
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    leader, *workers = group(rendered[layout])
    _, leader_engine = parse(leader.args)
    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    for worker in workers:
        ns = parser.parse_args(["serve", *worker.args])
        assert ns.headless is True
        if ns.model_tag is not None:  # what `vllm serve` does before it starts (serve.py cmd)
            ns.model = ns.model_tag
        engine = AsyncEngineArgs.from_cli_args(ns)
        differ = {
            f.name for f in dataclasses.fields(AsyncEngineArgs)
            if getattr(engine, f.name) != getattr(leader_engine, f.name)
        }
        assert differ <= {"node_rank", "data_parallel_start_rank"}, differ
        if _data_parallel(leader.args):
            assert engine.data_parallel_start_rank == worker.index * int(engine.data_parallel_size_local or 0)
        else:
            assert (engine.node_rank, engine.nnodes) == (worker.index, len(workers) + 1)
            assert (leader_engine.node_rank, leader_engine.master_addr) == (0, leader.env["LWS_LEADER_ADDRESS"])


# --------------------------------------------------------------------------- who gets traffic

def test_services_and_servicemonitor_select_leaders_only(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    objs = rendered[layout]
    leader, *workers = group(objs)
    services = of_kind(objs, "Service")
    assert services
    for svc in services:
        selector = svc["spec"]["selector"]
        assert selects(selector, leader.labels), f"Service {svc['metadata']['name']} misses the leader"
        assert not any(selects(selector, w.labels) for w in workers), f"Service {svc['metadata']['name']} selects a worker"
        assert selector.get(WORKER_INDEX) == "0"
    for monitor in of_kind(objs, "ServiceMonitor"):
        matched = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        assert len(matched) == 1, "one scraped Service, or every leader is scraped twice"


def test_overlays_carry_monitoring(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("gpu-llama-405b-multinode", "gpu-deepseek-v3-ep"):
        assert of_kind(rendered[name], "ServiceMonitor") and of_kind(rendered[name], "PrometheusRule")


def test_pdb_covers_every_pod_of_the_set(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    """Evicting a worker recreates its group: the budget must count workers too."""
    objs = rendered[layout]
    pdb = one(objs, "PodDisruptionBudget")
    assert all(selects(pdb["spec"]["selector"]["matchLabels"], p.labels) for p in group(objs))
    assert pdb["spec"]["maxUnavailable"] == 1


def test_group_pods_reach_each_other_and_clients_reach_leaders(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    objs = rendered[layout]
    leader, *workers = group(objs)
    policies = of_kind(objs, "NetworkPolicy")

    def peer_rules(pod: Pod) -> list[dict[str, Any]]:
        return [
            rule for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], pod.labels)
            for rule in p["spec"]["ingress"]
            if "ports" not in rule and any(
                "namespaceSelector" not in f and selects(f.get("podSelector", {}).get("matchLabels", {}), other.labels)
                for f in rule["from"] for other in [leader, *workers] if other is not pod
            )
        ]

    for pod in [leader, *workers]:
        assert peer_rules(pod), f"{pod.role} {pod.index}: no policy lets the group's pods in on every port"
    client_ports = {
        port["port"] for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], leader.labels)
        for rule in p["spec"]["ingress"] for port in rule.get("ports", [])
    }
    assert client_ports >= {"grpc", "metrics"}


# --------------------------------------------------------------------------- probes

def _budget(probe: dict[str, Any]) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)


def test_leader_probes_are_grpc_and_sized_for_a_multinode_load(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    c = group(rendered[layout])[0].container
    assert c["startupProbe"]["grpc"].get("service") == ENGINE_SERVICE
    assert c["readinessProbe"]["grpc"].get("service") == ENGINE_SERVICE
    assert c["livenessProbe"]["grpc"].get("service", "") == ""
    assert _budget(c["startupProbe"]) >= MIN_LEADER_STARTUP
    if layout != "multinode":
        assert _budget(c["startupProbe"]) >= 90 * 60, "hundreds of GB per node from a network volume"
    # A step a hung worker never finishes must end the engine, not wait forever.
    timeout = int(group(rendered[layout])[0].env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"])
    assert 0 < timeout <= 600


def _check_args(probe: dict[str, Any]) -> list[str]:
    command = probe["exec"]["command"]
    assert command[:2] == ["python3", f"/etc/llmgrpc-worker-check/{WORKER_CHECK}"], command
    return command[2:]


def test_workers_are_probed_for_hangs(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    objs = rendered[layout]
    leader, *workers = group(objs)
    for worker in workers:
        c = worker.container
        startup, liveness = _check_args(c["startupProbe"]), _check_args(c["livenessProbe"])
        assert startup == liveness
        assert _budget(c["startupProbe"]) >= _budget(leader.container["startupProbe"]) / 2
        assert _budget(c["livenessProbe"]) >= 30
        # One worker process per GPU: TP x PP / nodes ranks, or the DP ranks (TP 1) of this node.
        args = worker.args
        if _data_parallel(args):
            procs = int(flag(args, "--data-parallel-size-local") or 0)
            expected_port = next(p["containerPort"] for p in leader.container["ports"] if p["name"] == "grpc")
        else:
            tp, pp = int(flag(args, "--tensor-parallel-size") or 1), int(flag(args, "--pipeline-parallel-size") or 1)
            procs = tp * pp // len([leader, *workers])
            expected_port = int(flag(leader.args, "--master-port") or 0)
        assert int(flag(liveness, "--min-workers") or 0) == procs == _gpus(c)
        assert int(flag(liveness, "--leader-port") or 0) == expected_port
        # The script comes from the ConfigMap the pod mounts, as in the repo.
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/llmgrpc-worker-check")
        assert mount.get("readOnly") is True
        volume = next(v for v in worker.spec["volumes"] if v["name"] == mount["name"])
        maps = {m["metadata"]["name"]: m for m in of_kind(objs, "ConfigMap")}
        script = maps[volume["configMap"]["name"]]["data"][WORKER_CHECK]
        assert script == (K8S / "multinode" / WORKER_CHECK).read_text()


def test_drain_arithmetic(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    leader = group(rendered[layout])[0]
    sleep = int(leader.container["lifecycle"]["preStop"]["sleep"]["seconds"])
    drain = int(flag(leader.args, "--drain-timeout") or 30)
    grace = leader.spec["terminationGracePeriodSeconds"]
    assert grace >= sleep + drain + MIN_DRAIN_MARGIN
    for path in [K8S / "multinode" / "leaderworkerset.yaml", *(MULTINODE[n] / "leaderworkerset-patch.yaml" for n in MULTINODE if n != "multinode")]:
        text = path.read_text()
        assert re.search(rf"terminationGracePeriodSeconds {grace} >= 10 .*?\+ {drain}\b", text, re.S), f"{path}: no drain sum"


# --------------------------------------------------------------------------- pods

RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def test_both_roles_are_hardened_gpu_pods(rendered: dict[str, list[dict[str, Any]]], layout: str) -> None:
    objs = rendered[layout]
    pvcs = {p["metadata"]["name"]: p for p in of_kind(objs, "PersistentVolumeClaim")}
    for pod in group(objs)[:2]:
        spec, c = pod.spec, pod.container
        assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
        for volume in spec["volumes"]:
            assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, volume["name"]
        assert any(t["key"] == GPU and t["effect"] == "NoSchedule" for t in spec["tolerations"])
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert all(any(e["key"] == "nvidia.com/gpu.product" for e in t["matchExpressions"]) for t in terms)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        cache = volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"]
        assert pvcs[cache]["spec"]["accessModes"] == ["ReadWriteMany"], "every node reads the same cache"
        assert pod.env["HF_HOME"].startswith("/cache/") and pod.env["HF_HUB_OFFLINE"] == "1"
        if layout != "multinode":
            assert c["image"].endswith("-cuda")


# --------------------------------------------------------------------------- the overlays

def _shm(pod: Pod) -> str:
    """/dev/shm's size: the overlays patch it by its index in the volume list."""
    name = next(m["name"] for m in pod.container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    return str(next(v for v in pod.spec["volumes"] if v["name"] == name)["emptyDir"]["sizeLimit"])


def test_llama_405b_is_bf16_tp8_pp2_on_two_nodes_of_eight(rendered: dict[str, list[dict[str, Any]]]) -> None:
    leader, worker = group(rendered["gpu-llama-405b-multinode"])
    args = leader.args
    assert flag(args, "--model") == "meta-llama/Llama-3.1-405B-Instruct"
    assert flag(args, "--dtype") == "bfloat16" and flag(args, "--quantization") is None
    assert (flag(args, "--tensor-parallel-size"), flag(args, "--pipeline-parallel-size")) == ("8", "2")
    assert _gpus(leader.container) == _gpus(worker.container) == 8
    assert [_shm(p) for p in (leader, worker)] == ["64Gi", "64Gi"]


def test_deepseek_v3_uses_expert_parallelism_across_nodes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pods = group(rendered["gpu-deepseek-v3-ep"])
    for pod in pods:
        assert "--enable-expert-parallel" in pod.args, f"{pod.role}: EP must be on in every node"
        assert flag(pod.args, "--model") == "deepseek-ai/DeepSeek-V3"
        assert flag(pod.args, "--data-parallel-size") == "16"
    assert [_shm(p) for p in pods] == ["64Gi", "64Gi"]
    ports = {p["name"]: p["containerPort"] for p in pods[0].container["ports"]}
    assert ports["dp-rpc"] == int(flag(pods[0].args, "--data-parallel-rpc-port") or 0)


def test_patch_shape_is_the_documented_one() -> None:
    """Overlays change the set only through the paths docs/deploy.md lists."""
    allowed = re.compile(
        r"^/spec/leaderWorkerTemplate/(size|(leader|worker)Template/spec/("
        r"containers/0/(args|resources|ports/\d+|(startup|liveness)Probe/(exec/command(/\d+)?|failureThreshold))"
        r"|affinity/.*|volumes/1/emptyDir/sizeLimit))$"
    )
    for name in ("gpu-llama-405b-multinode", "gpu-deepseek-v3-ep"):
        ops = yaml.safe_load((MULTINODE[name] / "leaderworkerset-patch.yaml").read_text())
        bad = [op["path"] for op in ops if op["op"] != "replace" or not allowed.match(op["path"])]
        assert not bad, f"{name}: {bad}"
        paths = {op["path"] for op in ops}
        for role in ("leader", "worker"):
            assert f"/spec/leaderWorkerTemplate/{role}Template/spec/containers/0/args" in paths
            assert f"/spec/leaderWorkerTemplate/{role}Template/spec/containers/0/resources" in paths


@pytest.mark.parametrize("overlay", ["gpu-llama-405b-multinode", "gpu-deepseek-v3-ep"])
def test_model_download_job_fills_the_cache_the_group_reads(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """Applied on its own before the overlay: the group runs offline."""
    job = yaml.safe_load((MULTINODE[overlay] / "model-download-job.yaml").read_text())
    errors = schema_errors([job])
    assert not errors, "\n".join(errors)
    leader = group(rendered[overlay])[0]
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MODEL_ID"] == flag(leader.args, "--model")
    assert env["HF_HOME"] == leader.env["HF_HOME"]
    assert c["image"] == leader.container["image"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    cache = next(m for m in c["volumeMounts"] if env["HF_HOME"].startswith(m["mountPath"].rstrip("/") + "/"))
    leader_cache = next(v for v in leader.spec["volumes"] if v["name"] == "model-cache")
    cache_claim = leader_cache["persistentVolumeClaim"]["claimName"]
    assert claims[cache["name"]] == cache_claim
    assert job["metadata"]["namespace"] == lws(rendered[overlay])["metadata"]["namespace"]
    sc = c["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert not any(e["name"] == "HF_HUB_OFFLINE" for e in c["env"])
    # docs/deploy.md applies the PVC alone first, by this label.
    labelled = [o for o in rendered[overlay] if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "model-cache"]
    assert [(o["kind"], o["metadata"]["name"]) for o in labelled] == [("PersistentVolumeClaim", cache_claim)]
