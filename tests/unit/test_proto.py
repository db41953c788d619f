"""The contract: buf lint, buf breaking against main, generated code not committed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools/node_modules/.bin/buf"


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), "buf is missing: run `make install` (npm @bufbuild/buf)"
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean() -> None:
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def _against_main() -> str:
    """The main branch: origin/main in a clone of a fork, else the local main."""
    for ref in ("refs/remotes/origin/main", "refs/heads/main"):
        if subprocess.run(["git", "rev-parse", "--verify", "-q", ref], cwd=ROOT,
                          capture_output=True).returncode == 0:  # fmt: skip
            return ref.split("/", 2)[2]
    pytest.fail("no main branch to compare the proto against")


def test_no_breaking_change_against_main() -> None:
    ref = _against_main()
    against = f".git#ref={ref}" if "/" in ref else f".git#branch={ref}"
    result = _buf("breaking", "--against", against)
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_removed_field(tmp_path: Path) -> None:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    proto = tmp_path / "proto/llmgrpc/v1/llm_service.proto"
    text = proto.read_text()
    broken = re.sub(r"\n  optional float temperature = 3;", "", text)
    assert broken != text
    proto.write_text(broken)
    result = _buf("breaking", str(tmp_path), "--against", str(ROOT))
    assert result.returncode != 0
    assert "temperature" in result.stdout + result.stderr


def test_generated_code_is_not_committed_but_built() -> None:
    tracked = subprocess.run(["git", "ls-files", "client/llmgrpc/v1"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert not [f for f in tracked if "_pb2" in f]
    from llmgrpc.v1 import llm_service_pb2, llm_service_pb2_grpc  # noqa: F401

    assert (ROOT / "client/llmgrpc/v1/llm_service_pb2.pyi").exists()
