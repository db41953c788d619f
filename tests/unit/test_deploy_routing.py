"""Routing gRPC calls over replicas (issue 16): the Inference Extension and the plain alternatives.

components/inference-pool (InferencePool + llm-d's endpoint picker + HTTPRoute)
and components/grpc-route (a GRPCRoute, no extension) are stacked on every
overlay, single-node and multi-node, rendered, validated against the Kubernetes
schema and the vendored CRDs (the picker's EndpointPickerConfig against a schema
derived from its Go types), and checked for what docs/deploy.md ("LLM-aware
routing") promises. The client-side round_robin service config runs against
two real gRPC servers; the Envoy config is checked against the rendered Services.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import jsonschema
import pytest
import yaml

from tests.manifests import (
    K8S,
    ROOT,
    flag,
    of_kind,
    one,
    render_all,
    schema_errors,
    selects,
    stack,
    validate,
)

OVERLAYS = ("gpu-dense-gqa", "gpu-moe", "cpu-tiny", "gpu-llama-405b-multinode", "gpu-deepseek-v3-ep")
POOL = K8S / "components" / "inference-pool"
GRPC_ROUTE = K8S / "components" / "grpc-route"
SERVICE_CONFIG = ROOT / "deploy" / "grpc" / "service-config.json"
ENVOY = ROOT / "deploy" / "envoy" / "envoy.yaml"
PROTO = ROOT / "proto" / "llmgrpc" / "v1" / "llm_service.proto"
H2C = "kubernetes.io/h2c"
# What llmgrpc exports on /metrics under vLLM's names, and the picker must read.
PICKER_METRICS = {
    "queuedRequestsSpec": "vllm:num_requests_waiting",
    "kvUsageSpec": "vllm:kv_cache_usage_perc",
    "loraSpec": "vllm:lora_requests_info",
}


def _llm_service() -> str:
    text = PROTO.read_text()
    package = re.search(r"^package\s+([\w.]+);", text, re.M)
    service = re.search(r"^service\s+(LLMService)\b", text, re.M)
    assert package and service
    return f"{package.group(1)}.{service.group(1)}"


LLM_SERVICE = _llm_service()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each overlay with each component stacked on it, as docs/deploy.md says to."""
    directories = {
        f"{kind}/{name}": stack(tmp_path_factory.mktemp(f"{kind}-{name}"), [K8S / "overlays" / name], [component])
        for kind, component in (("pool", POOL), ("route", GRPC_ROUTE))
        for name in OVERLAYS
    }
    return render_all(directories)


@pytest.fixture(scope="module")
def pooled(stacks: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {name: stacks[f"pool/{name}"] for name in OVERLAYS}


@pytest.fixture(scope="module")
def routed(stacks: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {name: stacks[f"route/{name}"] for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


def _pods(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(role, labels, pod spec) of every model-server pod: a Deployment's, or an
    LWS group's leader and worker with the labels LWS adds."""
    pods = []
    for d in of_kind(objs, "Deployment"):
        if d["metadata"]["name"] == "llmgrpc":
            t = d["spec"]["template"]
            pods.append(("server", t["metadata"]["labels"], t["spec"]))
    for lws in of_kind(objs, "LeaderWorkerSet"):
        template = lws["spec"]["leaderWorkerTemplate"]
        for index, key in ((0, "leaderTemplate"), (1, "workerTemplate")):
            t = template[key]
            labels = {
                **t["metadata"]["labels"],
                "leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"],
                "leaderworkerset.sigs.k8s.io/worker-index": str(index),
            }
            pods.append(("server" if index == 0 else "worker", labels, t["spec"]))
    assert pods
    return pods


def _server_container(spec: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in spec["containers"] if c["name"] == "server")


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def _picker_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    epp = next(d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "llmgrpc-epp")
    c = epp["spec"]["template"]["spec"]["containers"][0]
    path = pathlib.PurePosixPath(flag(c["args"], "--config-file") or "")
    mount = next(m for m in c["volumeMounts"] if pathlib.PurePosixPath(m["mountPath"]) == path.parent)
    volume = next(v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = next(m for m in of_kind(objs, "ConfigMap") if m["metadata"]["name"] == volume["configMap"]["name"])
    loaded: dict[str, Any] = yaml.safe_load(config_map["data"][path.name])
    return loaded


# --------------------------------------------------------------------------- schemas

def test_everything_validates(pooled: dict[str, list[dict[str, Any]]], routed: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for objs in (pooled[overlay], routed[overlay]):
        errors = schema_errors(objs)
        assert not errors, "\n".join(errors)
        assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"llmgrpc"}
    errors = schema_errors([_picker_config(pooled[overlay])])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("InferencePool", lambda o: o["spec"].__setitem__("appProtocol", "grpc")),
        ("InferencePool", lambda o: o["spec"].__setitem__("targetPorts", [])),
        ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].__setitem__("failureMode", "Open")),
        ("HTTPRoute", lambda o: o["spec"]["rules"][0]["matches"][0]["path"].__setitem__("type", "Prefix")),
        ("GRPCRoute", lambda o: o["spec"]["rules"][0]["matches"][0]["method"].__setitem__("type", "Prefix")),
        ("EndpointPickerConfig", lambda o: o.__setitem__("schedulingProfile", [])),
        ("EndpointPickerConfig", lambda o: o["plugins"][1]["parameters"].__setitem__("metricsPort", 9400)),
        ("EndpointPickerConfig", lambda o: o["plugins"][1]["parameters"].__setitem__("port", "9400")),
        ("EndpointPickerConfig", lambda o: o["plugins"][2]["parameters"]["engineConfigs"][0].__setitem__("kvSpec", "x")),
        ("EndpointPickerConfig", lambda o: o["plugins"][3].__setitem__("parameters", {"threshold": 1})),
    ],
)
def test_validation_rejects_broken_objects(
    pooled: dict[str, list[dict[str, Any]]], routed: dict[str, list[dict[str, Any]]], kind: str, mutate: Any
) -> None:
    objs = [*pooled["gpu-dense-gqa"], *routed["gpu-dense-gqa"], _picker_config(pooled["gpu-dense-gqa"])]
    broken = copy.deepcopy(next(o for o in objs if o["kind"] == kind))
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


# --------------------------------------------------------------------------- the pool

def test_pool_targets_the_grpc_port_of_servers_only_over_h2c(pooled: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = pooled[overlay]
    pool = one(objs, "InferencePool")["spec"]
    assert pool["appProtocol"] == H2C, "gRPC needs HTTP/2; the pool's default is HTTP/1.1"
    selected = [(role, spec) for role, labels, spec in _pods(objs) if selects(pool["selector"]["matchLabels"], labels)]
    assert [role for role, _ in selected] == ["server"], "the pool selects the servers (multi-node: leaders) only"
    grpc_port = _port(_server_container(selected[0][1]), "grpc")
    assert pool["targetPorts"] == [{"number": grpc_port}]
    epp_pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "llmgrpc-epp"]
    assert not any(selects(pool["selector"]["matchLabels"], labels) for labels in epp_pods)


def test_pool_points_at_the_picker_service(pooled: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = pooled[overlay]
    ref = one(objs, "InferencePool")["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref["failureMode"] == "FailOpen"
    svc = next(s for s in of_kind(objs, "Service") if s["metadata"]["name"] == ref["name"])
    port = next(p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert port["appProtocol"] == H2C, "ext_proc is gRPC"
    epp = next(d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "llmgrpc-epp")
    assert selects(svc["spec"]["selector"], epp["spec"]["template"]["metadata"]["labels"])
    c = epp["spec"]["template"]["spec"]["containers"][0]
    assert _port(c, port["targetPort"]) == int(flag(c["args"], "--grpc-port") or 0)
    assert flag(c["args"], "--pool-name") == one(objs, "InferencePool")["metadata"]["name"]
    assert flag(c["args"], "--pool-group") == "inference.networking.k8s.io"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == int(flag(c["args"], "--grpc-health-port") or 0)


def test_picker_reads_our_metrics_on_our_metrics_port(pooled: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = pooled[overlay]
    config = _picker_config(objs)
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    # Every reference names a declared plugin.
    refs = [p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]]
    refs += [p["pluginRef"] for p in config["requestHandler"]["parsers"]]
    refs += [s["pluginRef"] for s in config["dataLayer"]["sources"]]
    refs += [e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]]
    assert set(refs) <= set(plugins), set(refs) - set(plugins)
    # The passthrough parser: the picker does not read llmgrpc's protobuf bodies.
    assert [plugins[p["pluginRef"]]["type"] for p in config["requestHandler"]["parsers"]] == ["passthrough-parser"]
    scorers = {plugins[p["pluginRef"]]["type"]: p.get("weight", 1) for p in config["schedulingProfiles"][0]["plugins"]}
    assert scorers["queue-scorer"] > 0 and scorers["kv-cache-utilization-scorer"] > 0
    (source,) = config["dataLayer"]["sources"]
    params = plugins[source["pluginRef"]]["parameters"]
    assert plugins[source["pluginRef"]]["type"] == "metrics-data-source"
    for role, _, spec in _pods(objs):
        if role == "server":
            c = _server_container(spec)
            assert params["port"] == _port(c, "metrics") == int(flag(c["args"], "--metrics-port") or 9400)
    assert params.get("path", "/metrics") == "/metrics" and params.get("scheme", "http") == "http"
    (extractor,) = source["extractors"]
    engines = plugins[extractor["pluginRef"]]["parameters"]["engineConfigs"]
    vllm = next(e for e in engines if e["name"] == "vllm")
    assert {k: vllm[k] for k in PICKER_METRICS} == PICKER_METRICS


def test_docs_name_what_the_picker_reads() -> None:
    """docs/deploy.md's routing section names the metrics and the port override key."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text[text.index("## LLM-aware routing"):text.index("## Sizing a node for a model")]
    for name in PICKER_METRICS.values():
        assert f"`{name}`" in section
    assert "`parameters.port`" in section and "port: 9400" in section


def test_picker_runs_restricted_with_read_only_rbac(pooled: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = pooled[overlay]
    epp = next(d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "llmgrpc-epp")
    spec = epp["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    account = spec["serviceAccountName"]
    bindings = [b for b in of_kind(objs, "RoleBinding") if any(s["name"] == account for s in b["subjects"])]
    roles = {r["metadata"]["name"]: r for r in of_kind(objs, "Role")}
    granted = {
        (group, resource): set(rule["verbs"])
        for b in bindings for rule in roles[b["roleRef"]["name"]]["rules"]
        for group in rule["apiGroups"] for resource in rule["resources"]
    }
    assert granted[("inference.networking.k8s.io", "inferencepools")] == {"get", "list", "watch"}
    assert granted[("", "pods")] == {"get", "list", "watch"}
    assert all(verbs <= {"get", "list", "watch"} for verbs in granted.values()), "the picker only reads"


def test_network_policy_lets_the_picker_scrape(pooled: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = pooled[overlay]
    epp_labels = next(d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "llmgrpc-epp")["spec"]["template"]["metadata"]["labels"]
    server_labels = next(labels for role, labels, _ in _pods(objs) if role == "server")
    admitted = {
        port["port"]
        for p in of_kind(objs, "NetworkPolicy") if selects(p["spec"]["podSelector"]["matchLabels"], server_labels)
        for rule in p["spec"]["ingress"]
        if any("namespaceSelector" not in f and selects(f.get("podSelector", {}).get("matchLabels", {}), epp_labels) for f in rule["from"])
        for port in rule.get("ports", [{"port": "metrics"}])
    }
    assert "metrics" in admitted


def test_httproute_sends_llmservice_to_the_pool(pooled: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = pooled[overlay]
    (rule,) = one(objs, "HTTPRoute")["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", one(objs, "InferencePool")["metadata"]["name"],
    )
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": f"/{LLM_SERVICE}/"}}]
    assert "AdminService" not in json.dumps(rule)


# --------------------------------------------------------------------------- plain alternatives

def test_grpcroute_balances_llmservice_over_the_service(routed: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = routed[overlay]
    (rule,) = one(objs, "GRPCRoute")["spec"]["rules"]
    assert rule["matches"] == [{"method": {"type": "Exact", "service": LLM_SERVICE}}]
    (backend,) = rule["backendRefs"]
    svc = next(s for s in of_kind(objs, "Service") if s["metadata"]["name"] == backend["name"])
    assert svc["spec"].get("clusterIP") != "None"
    port = next(p for p in svc["spec"]["ports"] if p["port"] == backend["port"])
    assert port["targetPort"] == "grpc" and port["appProtocol"] == H2C
    assert not of_kind(objs, "InferencePool"), "the plain route needs no Inference Extension"


def test_envoy_balances_calls_over_the_headless_service(routed: dict[str, list[dict[str, Any]]]) -> None:
    config = yaml.safe_load(ENVOY.read_text())["static_resources"]
    (cluster,) = config["clusters"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "LEAST_REQUEST"
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = next(s for s in of_kind(routed["gpu-dense-gqa"], "Service") if s["spec"].get("clusterIP") == "None")
    name, namespace = headless["metadata"]["name"], headless["metadata"]["namespace"]
    assert address["address"] == f"{name}.{namespace}.svc.cluster.local"
    assert address["port_value"] in {p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc"}
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == LLM_SERVICE
    hcm = config["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"]["prefix"] for r in routes] == [f"/{LLM_SERVICE}/"]
    assert all(r["route"]["cluster"] == cluster["name"] for r in routes)


class _Backend:
    """A gRPC server on port 0 answering LLMService/Tokenize, counting calls."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        self.calls = 0
        self._lock = threading.Lock()

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls += 1
            if code is not None:
                context.abort(code, "draining")
            return b"ok"

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(LLM_SERVICE, {"Tokenize": grpc.unary_unary_rpc_method_handler(handle)})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.fixture
def backends(request: pytest.FixtureRequest) -> Iterator[list[_Backend]]:
    started = [_Backend(code) for code in request.param]
    yield started
    for b in started:
        b.server.stop(grace=None)


def _channel(backends: list[_Backend], service_config: str | None) -> grpc.Channel:
    target = "ipv4:" + ",".join(f"127.0.0.1:{b.port}" for b in backends)
    options = [("grpc.service_config", service_config)] if service_config else []
    return grpc.insecure_channel(target, options=options)


@pytest.mark.parametrize("backends", [[None, None]], indirect=True)
def test_service_config_spreads_calls_over_every_address(backends: list[_Backend]) -> None:
    """One channel, two servers: with the shipped service config calls reach both;
    without it (pick_first, gRPC's default) one server gets them all."""
    with _channel(backends, None) as channel:
        call = channel.unary_unary(f"/{LLM_SERVICE}/Tokenize")
        for _ in range(20):
            assert call(b"x", timeout=10) == b"ok"
    assert sorted(b.calls for b in backends) == [0, 20]
    for b in backends:
        b.calls = 0
    with _channel(backends, SERVICE_CONFIG.read_text()) as channel:
        call = channel.unary_unary(f"/{LLM_SERVICE}/Tokenize")
        for _ in range(200):
            assert call(b"x", timeout=10) == b"ok"
            if all(b.calls for b in backends):
                break
    assert all(b.calls for b in backends), [b.calls for b in backends]


@pytest.mark.parametrize("backends", [[grpc.StatusCode.UNAVAILABLE, None]], indirect=True)
def test_service_config_retries_unavailable_on_another_server(backends: list[_Backend]) -> None:
    """A draining replica answers UNAVAILABLE; the client's retry lands elsewhere."""
    draining, serving = backends
    with _channel(backends, SERVICE_CONFIG.read_text()) as channel:
        call = channel.unary_unary(f"/{LLM_SERVICE}/Tokenize")
        for _ in range(200):
            assert call(b"x", timeout=10) == b"ok"
            if draining.calls:
                break
    assert draining.calls > 0 and serving.calls > 0
    config = json.loads(SERVICE_CONFIG.read_text())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["methodConfig"][0]["name"] == [{"service": LLM_SERVICE}]
