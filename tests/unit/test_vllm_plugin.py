"""llmgrpc's vLLM plugin grants the AMX tile state that eager CPU kernels need.

Without it an eager engine (the cpu image's) died with SIGILL on AMX CPUs;
the container test runs that engine end to end.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from llmgrpc_server import vllm_plugin

# Ask the kernel which extended states this process may use (arch_prctl
# ARCH_GET_XCOMP_PERM); bit 18 is AMX tile data. Then run the plugin, ask again.
PROBE = """
import ctypes, torch
from llmgrpc_server.vllm_plugin import enable_amx
libc = ctypes.CDLL(None, use_errno=True)
def xtile() -> bool:
    mask = ctypes.c_uint64()
    assert libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0, ctypes.get_errno()
    return bool(mask.value >> 18 & 1)
before = xtile()
enable_amx()
print(torch.cpu._is_amx_tile_supported(), before, xtile())
"""


def test_vllm_loads_the_plugin_from_the_installed_package() -> None:
    (plugin,) = [p for p in entry_points(group="vllm.general_plugins") if p.name == "llmgrpc_amx"]
    assert plugin.load() is vllm_plugin.enable_amx


def test_the_plugin_grants_amx_tiles_where_the_cpu_has_them() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    supported, before, after = (word == "True" for word in out)
    assert not before, "a fresh process already had AMX: the test proves nothing here"
    assert after == supported
