"""The curated ruff rule set and mypy stay clean on server/, client/, scripts/ and deploy/;
ruff on tests/ too. Every script at least starts (`--help`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRIPTS_CHECKED = ("scripts", "deploy/k8s/sync_monitoring.py")
CHECKED = ("server", "client", *SCRIPTS_CHECKED)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    result = _run(str(BIN / "ruff"), "check", *CHECKED, "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_scripts() -> None:
    # Apart from the packages: checked together, mypy resolves `llmgrpc` from
    # client/ by path and the installed package by name, and mixes them up.
    result = _run(str(BIN / "mypy"), *SCRIPTS_CHECKED)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_starts(script: str) -> None:
    result = _run(sys.executable, f"scripts/{script}", "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage:" in result.stdout
