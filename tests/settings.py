"""How long the suite's long tests run: CI's defaults, overridden by environment.

`make test` uses the defaults (the whole suite within 15 minutes on a 2-core
machine); `make test-long` sets the longer values (docs/reliability.md).
"""

from __future__ import annotations

import os

# test_load.py: seconds of mixed traffic while memory and fds are sampled.
SOAK_SECONDS = float(os.environ.get("LLMGRPC_SOAK_SECONDS", "30"))
# test_fuzz.py: hypothesis examples of 8 calls each.
FUZZ_EXAMPLES = int(os.environ.get("LLMGRPC_FUZZ_EXAMPLES", "300"))
# An engine server's start, model load included.
STARTUP_TIMEOUT = float(os.environ.get("LLMGRPC_TEST_STARTUP_TIMEOUT", "300"))
