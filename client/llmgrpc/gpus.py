"""The GPU types `llmgrpc plan --gpu` knows: memory, fp8, GPUs per node, interconnect.

Memory is the total the driver reports (nvidia-smi, `torch.cuda.mem_get_info`), which
is what vLLM multiplies by `--gpu-memory-utilization`; marketing "80 GB" is not. The
product names are the `nvidia.com/gpu.product` node labels NVIDIA's GPU feature
discovery sets, which the printed Kubernetes patch selects nodes by.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
NVLINK = "nvlink"  # GPUs of a node all-reduce over NVLink/NVSwitch
PCIE = "pcie"  # no NVLink: tensor parallel all-reduces cross PCIe


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_mib: int  # as nvidia-smi reports it
    fp8: bool  # fp8 tensor cores (Ada, Hopper): vLLM serves fp8 weights there
    gpus_per_node: int
    interconnect: str
    products: tuple[str, ...]  # nvidia.com/gpu.product label values
    note: str = ""

    def __post_init__(self) -> None:
        if self.memory_mib <= 0 or self.gpus_per_node < 1:
            raise ValueError(f"{self.name}: memory and GPUs per node must be positive")
        if self.interconnect not in (NVLINK, PCIE):
            raise ValueError(f"{self.name}: unknown interconnect {self.interconnect!r}")

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


GPUS: dict[str, GpuType] = {
    gpu.name: gpu
    for gpu in (
        GpuType(
            "A100-80GB",
            memory_mib=81_920,
            fp8=False,  # Ampere: no fp8 tensor cores, so no fp8 weights in a plan
            gpus_per_node=8,
            interconnect=NVLINK,
            products=("NVIDIA-A100-SXM4-80GB",),
        ),
        GpuType(
            "H100-80GB",
            memory_mib=81_559,
            fp8=True,
            gpus_per_node=8,
            interconnect=NVLINK,
            products=("NVIDIA-H100-80GB-HBM3",),
        ),
        GpuType(
            "H200-141GB",
            memory_mib=143_771,
            fp8=True,
            gpus_per_node=8,
            interconnect=NVLINK,
            products=("NVIDIA-H200",),
        ),
        GpuType(
            "L40S-48GB",
            memory_mib=46_068,
            fp8=True,
            gpus_per_node=8,  # 8-GPU servers (AWS g6e.48xlarge); 4-GPU nodes exist too
            interconnect=PCIE,
            products=("NVIDIA-L40S",),
            note="no NVLink: tensor parallel all-reduces cross PCIe, so TP beyond 2-4 "
            "costs latency; pipeline parallel moves far less data",
        ),
    )
}


def gpu_type(name: str) -> GpuType:
    """A GPU type by name, case-insensitively."""
    for gpu in GPUS.values():
        if gpu.name.lower() == name.lower():
            return gpu
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
