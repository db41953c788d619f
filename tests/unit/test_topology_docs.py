"""docs/capacity.md's topology tables are the planner's output, not typed by hand:
scripts/render_topology_tables.py --check fails when they differ."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "capacity.md"
SCRIPT = ROOT / "scripts" / "render_topology_tables.py"


def check(doc: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--doc", str(doc)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_tables_in_the_docs_are_the_planners() -> None:
    result = check(DOC)
    assert result.returncode == 0, result.stderr


def test_both_new_models_have_a_row_per_gpu_type() -> None:
    text = DOC.read_text(encoding="utf-8")
    for model in ("deepseek-v3", "llama-3.1-405b"):
        block = text.split(f"<!-- topology:{model}:full:begin -->")[1].split("end -->")[0]
        gpus = re.findall(r"^\| (\S+) \| \d+ x \d+ \|", block, re.M)
        assert gpus == ["A100-80GB", "H100-80GB", "H200-141GB", "L40S-48GB"]


def test_a_hand_edit_is_caught(tmp_path: pathlib.Path) -> None:
    text = DOC.read_text(encoding="utf-8")
    edited = text.replace("| H100-80GB | 2 x 8 | EP 16", "| H100-80GB | 1 x 8 | EP 16", 1)
    assert edited != text
    (tmp_path / "capacity.md").write_text(edited, encoding="utf-8")
    result = check(tmp_path / "capacity.md")
    assert result.returncode == 1 and "stale" in result.stderr
