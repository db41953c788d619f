"""scripts/microbench_transport.py runs and times both paths (its figures are
in docs/benchmarks.md; nothing here checks a time)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_it_times_both_paths() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "microbench_transport.py"),
         "--messages", "500", "--rounds", "2"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["h2 send_data", "hand-written DATA frame"]
    assert all(line.count("us/message") == 1 and line.count(",") == 1 for line in lines)
