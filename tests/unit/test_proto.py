"""The contract: buf lint, buf breaking against the last release, generated code not committed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools/node_modules/.bin/buf"


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), "buf is missing: run `make install` (npm @bufbuild/buf)"
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean() -> None:
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


RELEASES = ROOT / "proto/releases"


def _last_release() -> Path:
    """The newest release's image (proto/releases/vX.Y.Z.binpb, from `buf build -o`)."""
    images = sorted(RELEASES.glob("v*.binpb"),
                    key=lambda p: tuple(int(x) for x in p.stem[1:].split(".")))  # fmt: skip
    assert images, f"no release image in {RELEASES}"
    return images[-1]


def test_no_breaking_change_against_the_last_release() -> None:
    # Against a committed image, not a branch: in a clean clone the local main
    # is the commit under test, and a comparison with itself cannot fail.
    result = _buf("breaking", "--against", str(_last_release()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_removed_field(tmp_path: Path) -> None:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    proto = tmp_path / "proto/llmgrpc/v1/llm_service.proto"
    text = proto.read_text()
    broken = re.sub(r"\n  optional float temperature = 3;", "", text)
    assert broken != text
    proto.write_text(broken)
    result = _buf("breaking", str(tmp_path), "--against", str(_last_release()))
    assert result.returncode != 0
    assert "temperature" in result.stdout + result.stderr


def test_generated_code_is_not_committed_but_built() -> None:
    tracked = subprocess.run(["git", "ls-files", "client/llmgrpc/v1"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert not [f for f in tracked if "_pb2" in f]
    from llmgrpc.v1 import llm_service_pb2, llm_service_pb2_grpc  # noqa: F401

    assert (ROOT / "client/llmgrpc/v1/llm_service_pb2.pyi").exists()
