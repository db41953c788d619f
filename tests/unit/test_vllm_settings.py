"""The server freezes vLLM's settings in its own process once the engine is up.

vLLM re-reads os.environ on every `vllm.envs` access until `enable_envs_cache()`,
which it calls in its engine core and workers but not in the front end, whose
output processor reads a setting per request per step (docs/benchmarks.md).
"""

from __future__ import annotations

import subprocess
import sys

# In a fresh process: the test process's vllm.envs stays as it was.
PROBE = """
import os
import vllm.envs as envs
from llmgrpc_server.vllm_adapter.settings import cache_vllm_settings
os.environ["VLLM_COMPUTE_NANS_IN_LOGITS"] = "0"
before = envs.VLLM_COMPUTE_NANS_IN_LOGITS
os.environ["VLLM_COMPUTE_NANS_IN_LOGITS"] = "1"
live = envs.VLLM_COMPUTE_NANS_IN_LOGITS
cache_vllm_settings()
os.environ["VLLM_COMPUTE_NANS_IN_LOGITS"] = "0"
print(before, live, envs.VLLM_COMPUTE_NANS_IN_LOGITS)
"""


def test_vllm_settings_are_read_once_after_cache_vllm_settings() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    # Read live before (the change is seen), frozen after (it is not).
    assert out == ["False", "True", "True"]
