"""GPU readiness (issue 21, items 2, 3, 4, 5, 10, 12): the decisions a first GPU run depends on, pinned on CPU.

No GPU has run dist_ft; each test here gives the decision (process-group backend, device index, parameter and
buffer placement, DeepSpeed accelerator, bf16 support, memory figures) the inputs a GPU node would give it.

    .venv/bin/python -m pytest tests/test_gpu_readiness_devices.py
"""

from __future__ import annotations

import pytest
import torch

# --- item 2: the process group carries gloo beside NCCL, for CPU tensors (FSDP2 offload) -----------------------


def test_process_group_backend_has_gloo_for_cpu_tensors_on_gpus():
    from torch.distributed.distributed_c10d import BackendConfig

    from dist_ft.distributed.topology import process_group_backend

    gpu = process_group_backend(cuda_available=True)
    # torch parses it into one backend per device type: offloaded (CPU) gradients reduce over gloo.
    assert BackendConfig(gpu).get_device_backend_map() == {"cuda": "nccl", "cpu": "gloo"}
    assert process_group_backend(cuda_available=False) == "gloo"


# --- item 5: the CUDA device a rank uses, under each launcher layout ---------------------------------------------


def _visible(cuda_visible_devices: str | None, physical: int) -> int:
    """How many devices a process sees (what torch.cuda.device_count() reports) for a CUDA_VISIBLE_DEVICES value."""
    if cuda_visible_devices is None:
        return physical
    return len([d for d in cuda_visible_devices.split(",") if d.strip() not in ("", "-1")])


# (launcher, local world size, CUDA_VISIBLE_DEVICES per local rank, physical GPUs on the node, devices expected)
LAYOUTS = {
    "torchrun 8 on 8": ("torchrun", 8, [None] * 8, 8, list(range(8))),
    "torchrun 2 on 8": ("torchrun", 2, [None] * 2, 8, [0, 1]),
    "torchrun 2 with CUDA_VISIBLE_DEVICES=4,5": ("torchrun", 2, ["4,5"] * 2, 8, [0, 1]),
    "accelerate 4 on 4": ("accelerate", 4, [None] * 4, 4, [0, 1, 2, 3]),
    "deepspeed --include localhost:2,3": ("deepspeed", 2, ["2,3"] * 2, 4, [0, 1]),
    "srun 4 tasks, no GPU binding": ("srun", 4, [None] * 4, 4, [0, 1, 2, 3]),
    "srun 4 tasks, --gpus-per-task=1": ("srun", 4, ["0", "1", "2", "3"], 4, [0, 0, 0, 0]),
    "srun 2 tasks, --gpu-bind=map_gpu:6,7": ("srun", 2, ["6", "7"], 8, [0, 0]),
    "RANK/LOCAL_RANK by hand, one GPU each": ("env", 2, ["0", "1"], 2, [0, 0]),
    "one process, container given GPU 3": ("single", 1, ["3"], 8, [0]),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=list(LAYOUTS))
def test_cuda_device_index_by_launcher_layout(layout):
    from dist_ft.distributed.topology import cuda_device_index

    launcher, local_world, visible_per_rank, physical, expected = layout
    got = [cuda_device_index(local_rank=r, local_world_size=local_world, launcher=launcher,
                             visible_devices=_visible(visible_per_rank[r], physical)) for r in range(local_world)]
    assert got == expected


@pytest.mark.parametrize("launcher, local_world, visible, message", [
    ("torchrun", 2, 1, "would share it"),  # two ranks on a one-GPU node: NCCL would fail later, less clearly
    ("torchrun", 8, 4, "sees 4 GPU(s)"),
    ("srun", 4, 2, "--gpus-per-task=1"),  # srun --gpus-per-task=2: one process per GPU is what dist_ft runs
    ("torchrun", 1, 0, "sees no CUDA device"),
])
def test_cuda_device_index_refuses_layouts_without_a_gpu_per_rank(launcher, local_world, visible, message):
    from dist_ft.distributed.topology import cuda_device_index

    # Every local rank raises, so none waits at the rendezvous for peers that cannot start.
    for r in range(local_world):
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            cuda_device_index(local_rank=r, local_world_size=local_world, visible_devices=visible, launcher=launcher)
