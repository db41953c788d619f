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


def test_masked_lora_ops_leave_tokens_without_an_adapter_alone() -> None:
    """vLLM's CPU LoRA ops index adapter slots with each token's index, and -1 (no
    adapter) reads the last slot; the masked ops apply adapters to the other
    tokens only, exactly as before for them."""
    import torch
    from llmgrpc_server.vllm_plugin import masked_lora_op
    from vllm.lora.ops.torch_ops import lora_ops

    torch.manual_seed(0)
    tokens, hidden, rank, slots = 5, 8, 2, 2
    x = torch.randn(tokens, hidden)
    a = torch.randn(slots, 1, rank, hidden)  # shrink weights: [slots, 1, rank, in]
    b = torch.randn(slots, 1, hidden, rank)  # expand weights: [slots, 1, out, rank]
    indices = torch.tensor([0, -1, 1, -1, 0])
    shrunk = torch.zeros(tokens, rank)
    masked_lora_op(lora_ops.bgmv_shrink)(x, a, shrunk, indices, 0.5)
    y = torch.ones(tokens, hidden)
    masked_lora_op(lora_ops.bgmv_expand)(shrunk, b, y, indices, add_inputs=True)
    base = indices < 0
    assert torch.equal(shrunk[base], torch.zeros(2, rank)) and torch.equal(y[base], torch.ones(2, hidden))
    # The adapter rows: what the unmasked ops give them.
    ref_shrunk = torch.zeros(tokens, rank)
    lora_ops.bgmv_shrink(x, a, ref_shrunk, indices.clamp(min=0), 0.5)
    ref_y = torch.ones(tokens, hidden)
    lora_ops.bgmv_expand(ref_shrunk, b, ref_y, indices.clamp(min=0), add_inputs=True)
    assert torch.equal(y[~base], ref_y[~base]) and not torch.equal(ref_y[base], torch.ones(2, hidden))
    # The unmasked op is the bug: index -1 takes the last slot's adapter.
    # (unwrapped: an earlier test in this process may have installed the fix)
    leaky = torch.zeros(tokens, rank)
    unpatched = getattr(lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink)
    unpatched(x, a, leaky, indices, 0.5)
    assert not torch.equal(leaky[base], torch.zeros(2, rank))


def test_lora_swaps_count_activations_into_a_slot_and_answer_the_rpc() -> None:
    """An activation counts when vLLM copies an adapter into a slot, not when it
    was there already; a failed disk load counts nothing; every executor's
    worker wrapper answers the front end's collective_rpc with the counts."""
    from types import SimpleNamespace

    import pytest
    from llmgrpc_server.vllm_plugin import (
        LORA_SWAPS_RPC,
        count_lora_swaps,
        counting_lora_swaps,
        lora_swaps,
    )
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    count_lora_swaps()
    count_lora_swaps()  # vLLM may run a plugin twice: still one count per swap
    assert counting_lora_swaps()
    manager = SimpleNamespace(_active_adapters={}, lora_index_to_id=[None],
                              _registered_adapters={3: SimpleNamespace(id=3)}, modules={})  # fmt: skip
    activations, loads = lora_swaps()
    assert LoRAModelManager.activate_adapter(manager, 3)  # type: ignore[arg-type]
    assert manager.lora_index_to_id == [3]
    assert not LoRAModelManager.activate_adapter(manager, 3)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):  # no model to load into
        WorkerLoRAManager._load_adapter(SimpleNamespace(), SimpleNamespace())  # type: ignore[arg-type]
    assert lora_swaps() == (activations + 1, loads)
    wrapper = WorkerWrapperBase(rpc_rank=0)
    assert getattr(wrapper, LORA_SWAPS_RPC)() == lora_swaps()
