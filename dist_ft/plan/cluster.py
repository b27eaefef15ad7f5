"""The cluster a plan is made for: ranks, device and host memory, links, and the GPUs `--gpu` knows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .constants import CPU_GLOO_GBPS, DEFAULT_MFU, GIB, INTER_NODE_GBPS, INTRA_NODE_GBPS, PlanError

# Usable device memory as CUDA reports it (approximate: pass --gpu-memory-gib for your card), GiB.
GPU_MEMORY_GIB = {"H100": 79.1, "H200": 139.8, "A100-80G": 79.2, "A100-40G": 39.4, "L40S": 44.4, "L4": 22.0,
                  "A10": 22.0, "4090": 23.6, "V100": 31.7, "T4": 14.6}
NO_BF16 = ("V100", "T4")
GPU_CHOICES = [*GPU_MEMORY_GIB, "cpu"]


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 1
    gpu: str = "H100"                   # a GPU_MEMORY_GIB key, or "cpu"
    device_memory_gib: float = 79.1     # per rank
    cpu_memory_gib: Optional[float] = None   # per node (None: not checked)
    mfu: float = DEFAULT_MFU
    intra_gbps: float = INTRA_NODE_GBPS
    inter_gbps: float = INTER_NODE_GBPS
    peak_flops: Optional[float] = None  # per device (None: the datasheet / a CPU measurement)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def is_cpu(self) -> bool:
        return self.gpu == "cpu"


def make_cluster(*, nodes: int = 1, gpus_per_node: int = 1, gpu: Optional[str] = None,
                 gpu_memory_gib: Optional[float] = None, cpu_memory_gib: Optional[float] = None,
                 mfu: float = DEFAULT_MFU, intra_gbps: Optional[float] = None, inter_gbps: float = INTER_NODE_GBPS,
                 peak_tflops: Optional[float] = None) -> Cluster:
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError("--nodes and --gpus-per-node must be at least 1")
    if gpu is None:
        gpu = _local_gpu() or "H100"
    canon = {k.lower(): k for k in GPU_CHOICES}
    if gpu.lower() not in canon:
        raise PlanError(f"--gpu {gpu}: not one of {', '.join(GPU_CHOICES)} (pass --gpu-memory-gib for another)")
    gpu = canon[gpu.lower()]
    if gpu_memory_gib is None:
        if gpu == "cpu":
            node = cpu_memory_gib if cpu_memory_gib is not None else _machine_memory_gib()
            gpu_memory_gib = node / gpus_per_node
        else:
            gpu_memory_gib = GPU_MEMORY_GIB[gpu]
    if intra_gbps is None:  # CPU ranks of one machine talk over gloo through memory, not NVLink
        intra_gbps = CPU_GLOO_GBPS if gpu == "cpu" else INTRA_NODE_GBPS
    if not 0 < mfu <= 1:
        raise PlanError("--mfu must be in (0, 1]")
    return Cluster(nodes, gpus_per_node, gpu, float(gpu_memory_gib), cpu_memory_gib, mfu, intra_gbps, inter_gbps,
                   peak_tflops * 1e12 if peak_tflops else None)


def _local_gpu() -> Optional[str]:
    try:
        import torch
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            for key in GPU_MEMORY_GIB:
                if key.split("-")[0].lower() in name.lower():
                    if key.startswith("A100"):
                        return "A100-80G" if torch.cuda.get_device_properties(0).total_memory > 50 * GIB else "A100-40G"
                    return key
    except Exception:  # noqa: BLE001
        pass
    return None


def _machine_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 16.0
