"""The Dockerfile's `cpu` target builds and serves, run the way cpu-tiny runs it.

deploy/podman/build-cpu-image.sh builds the image with podman on a Debian base
made by debootstrap (no image registry is reachable here). The container then
gets the rendered cpu-tiny overlay's args, env and hardening (read-only root,
no capabilities, no privilege escalation, uid 10001, tmpfs for the emptyDirs,
a volume for the model-cache PVC, /dev/shm sized like the overlay), must turn
SERVING through the image's own HEALTHCHECK, answer a question with the
embedded default model (SmolLM2-135M-Instruct) for a client on the host,
export vLLM metrics, and exit cleanly on SIGTERM.

Runtime here (2 cores): ~5-10 min to build from scratch (debootstrap ~40 s,
pip most of the rest; ~1 min after a change to our code only, whose layer is
the only one rebuilt), under a minute from start to
SERVING (the image runs the engine eagerly: it has no compiler), seconds for
the rest.
Needs root, podman, debootstrap and runc: installed with apt-get when missing.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import pytest

from tests.manifests import K8S, env_value, expanded_args, pod_spec, render, server

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "deploy" / "podman" / "build-cpu-image.sh"
IMAGE = "localhost/llmgrpc:test-cpu"
BIN = pathlib.Path(sys.executable).parent
SERVING_TIMEOUT = 15 * 60
pytestmark = [pytest.mark.engine, pytest.mark.container]
ULIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=16384:16384"]


def _ensure_tools() -> None:
    missing = [t for t in ("podman", "debootstrap", "runc") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.fail(f"missing {missing}: apt-get install podman debootstrap runc (needs root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "podman", "debootstrap", "runc"]):
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """podman's environment; on hybrid cgroup hosts crun refuses to start, runc works."""
    _ensure_tools()
    env = dict(os.environ)
    controllers = pathlib.Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if "CONTAINERS_CONF" not in env and controllers.exists() and controllers.read_text().strip():
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        conf.write_text('[engine]\nruntime = "runc"\n')
        env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> str:
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env={**podman_env, "IMAGE": IMAGE},
        capture_output=True, text=True, timeout=3600, check=False,
    )
    assert result.returncode == 0, f"image build failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    print(f"built {IMAGE} in {time.monotonic() - started:.0f}s")
    return IMAGE


def _size_mib(quantity: str) -> int:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    number, unit = re.fullmatch(r"(\d+)([KMG]i)", quantity).groups()  # type: ignore[union-attr]
    return int(int(number) * units[unit])


def run_flags(objs: list[dict[str, Any]], volume: str) -> tuple[list[str], list[str]]:
    """podman flags and server args equivalent to the cpu-tiny pod."""
    spec = pod_spec(objs)
    c = server(objs)
    sc, pod_sc = c["securityContext"], spec["securityContext"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    flags = [
        "--user", f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}",
        "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        *(["--read-only"] if sc.get("readOnlyRootFilesystem") else []),
    ]
    assert "ALL" in sc["capabilities"]["drop"] and sc["allowPrivilegeEscalation"] is False
    for mount in c["volumeMounts"]:
        source = volumes[mount["name"]]
        if "persistentVolumeClaim" in source:
            flags += ["--volume", f"{volume}:{mount['mountPath']}"]
        elif mount["mountPath"] == "/dev/shm":
            flags += ["--shm-size", f"{_size_mib(source['emptyDir']['sizeLimit'])}m"]
        else:  # an emptyDir: world-writable like the kubelet makes it
            flags += ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-mode=1777"]
    for var in c["env"]:
        if "secretKeyRef" in var.get("valueFrom", {}):
            continue  # the optional hub token: no Secret here, as on kind
        flags += ["--env", f"{var['name']}={env_value(objs, c, var['name'])}"]
    return flags, expanded_args(objs, c)


def _published(env: dict[str, str], name: str, port: int) -> int:
    out = podman(env, "port", name, f"{port}/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


# Covers the image build in the fixture: the suite's 600 s default is too short.
@pytest.mark.timeout(3600)
def test_cpu_image_serves_like_cpu_tiny(podman_env: dict[str, str], image: str) -> None:
    objs = render(K8S / "overlays" / "cpu-tiny")
    name = f"llmgrpc-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-cache"
    flags, args = run_flags(objs, volume)
    podman(podman_env, "volume", "create", volume)
    try:
        podman(
            podman_env, "run", "--detach", "--name", name, *ULIMITS,
            "--publish", "127.0.0.1::50051", "--publish", "127.0.0.1::9400",
            *flags, image, *args,
        )
        grpc_port = _published(podman_env, name, 50051)
        metrics_port = _published(podman_env, name, 9400)

        # 1. SERVING, asked by the image's HEALTHCHECK (llmgrpc-healthcheck
        #    for llmgrpc.v1.LLMService inside the container).
        deadline = time.monotonic() + SERVING_TIMEOUT
        while True:
            state = podman(podman_env, "inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert state == "true", "container exited:\n" + podman(podman_env, "logs", name, check=False).stderr[-8000:]
            if podman(podman_env, "healthcheck", "run", name, check=False).returncode == 0:
                break
            assert time.monotonic() < deadline, "not SERVING in time:\n" + podman(podman_env, "logs", name).stderr[-8000:]
            time.sleep(3)
        health = subprocess.run(
            [str(BIN / "llmgrpc-healthcheck"), "--target", f"127.0.0.1:{grpc_port}", "--service", "llmgrpc.v1.LLMService"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert health.returncode == 0, health.stdout + health.stderr

        # 2. The embedded default model answers a question, for a client
        #    outside the container (bfloat16, eager, as the image serves it; a
        #    question whose greedy answer is no near-tie in bfloat16: France's
        #    first token is, 0.08 nats in float32, and flips to "L'Étoile" here).
        gen = subprocess.run(
            [str(BIN / "llmgrpc"), "generate", "--chat", "What is the capital of Japan?",
             "--max-tokens", "16", "--temperature", "0", "--target", f"127.0.0.1:{grpc_port}"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        logs = podman(podman_env, "logs", name, check=False)
        assert gen.returncode == 0 and "Tokyo" in gen.stdout, (
            f"generate failed: {gen.stdout}{gen.stderr}\n{(logs.stdout + logs.stderr)[-8000:]}"
        )

        # 3. vLLM's metrics on the metrics port.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            body = response.read().decode()
        assert re.search(r"^vllm:num_requests_waiting\{", body, re.M)
        assert re.search(r"^vllm:generation_tokens_total\{.*\} [1-9]", body, re.M)

        # 4. SIGTERM drains and exits 0 well within the pod's grace period.
        grace = pod_spec(objs)["terminationGracePeriodSeconds"]
        started = time.monotonic()
        podman(podman_env, "stop", "--time", str(grace), name, timeout=grace + 60)
        took = time.monotonic() - started
        code = podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", f"exit code {code} after SIGTERM"
        assert took < grace, f"took {took:.0f}s to stop, grace is {grace}s"
    finally:
        podman(podman_env, "rm", "--force", name, check=False)
        podman(podman_env, "volume", "rm", "--force", volume, check=False)
