"""GPU readiness (issue 21, items 2, 3, 4, 5, 10, 12): the decisions a first GPU run depends on, pinned on CPU.

No GPU has run dist_ft; each test here gives the decision (process-group backend, device index, parameter and
buffer placement, DeepSpeed accelerator, bf16 support, memory figures) the inputs a GPU node would give it.

    .venv/bin/python -m pytest tests/test_gpu_readiness_devices.py
"""

from __future__ import annotations

import json

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


# --- item 3: FSDP2 with offload keeps parameters in host memory but buffers on the compute device ---------------


@pytest.mark.parametrize("offload", ["params", "all"])
def test_fsdp_offload_puts_buffers_on_the_compute_device(offload):
    from dist_ft.distributed.fsdp.strategy import placement

    gpu = torch.device("cuda", 3)
    where = placement(offload=offload, device=gpu)
    assert where.params == torch.device("cpu")  # CPUOffloadPolicy: FSDP2 copies shards to the device per unit
    assert where.buffers == gpu  # BERT indexes position_ids/token_type_ids with device tensors in the forward
    assert placement(offload="none", device=gpu) == type(where)(params=gpu, buffers=gpu)


def test_move_buffers_leaves_parameters_in_place():
    from dist_ft.distributed.fsdp.strategy import move_buffers

    with torch.device("meta"):
        model = torch.nn.BatchNorm1d(4)
    model.to_empty(device="cpu")
    move_buffers(model, torch.device("meta"))  # a stand-in for the GPU: any device other than the parameters'
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_fsdp_offload_trains_a_bert_classifier_on_two_ranks(tmp_path):
    from conftest import read_metrics, run_cli, tiny_recipe, write_jsonl, write_recipe
    from test_pretrained_weights import _tiny_bert

    bert = _tiny_bert(tmp_path / "tiny-bert")
    words = {"red": ["red apple", "red fire", "red rose"], "blue": ["blue sea", "blue sky", "blue ice"],
             "green": ["green leaf", "green grass", "green frog"]}
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": lab} for lab, ts in words.items()
                                                 for t in ts] * 8)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        bert, out, model={"task": "sequence_classification", "path": str(bert)},
        data={"train": str(data), "format": "classification", "eval_fraction": 0.25, "max_train_samples": None,
              "max_eval_samples": None},
        training={"max_steps": 6, "learning_rate": 1e-2},
        distributed={"strategy": "fsdp", "offload": "all"}))
    res = run_cli("launch", str(path), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["world_size"] == 2
    train, evals = read_metrics(out)
    assert len(train) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


# --- item 4: DS_ACCELERATOR=cpu only where nothing says there is a GPU -------------------------------------------

ACCELERATOR_CASES = {
    # (device files, environment, DS_ACCELERATOR to set)
    "CPU machine": ([], {}, "cpu"),
    "CPU machine, GPUs hidden": ([], {"CUDA_VISIBLE_DEVICES": ""}, "cpu"),
    "CPU machine, CUDA_VISIBLE_DEVICES=-1": ([], {"CUDA_VISIBLE_DEVICES": "-1"}, "cpu"),
    "CPU container, NVIDIA_VISIBLE_DEVICES=void": ([], {"NVIDIA_VISIBLE_DEVICES": "void"}, "cpu"),
    "GPU 0 on the host": (["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm"], {}, None),
    # The bug: a container or pod given GPU 3 has /dev/nvidia3 only, and no CUDA_VISIBLE_DEVICES.
    "container given GPU 3": (["/dev/nvidia3", "/dev/nvidiactl", "/dev/nvidia-uvm"], {}, None),
    "container given GPU 12": (["/dev/nvidia12"], {}, None),
    "only the control node visible": (["/dev/nvidiactl"], {}, None),
    "NVIDIA runtime says which GPU": ([], {"NVIDIA_VISIBLE_DEVICES": "GPU-5d3c"}, None),
    "CUDA_VISIBLE_DEVICES names a GPU": ([], {"CUDA_VISIBLE_DEVICES": "2"}, None),
    "WSL2": (["/dev/dxg"], {}, None),
    "ROCm": (["/dev/kfd"], {"HIP_VISIBLE_DEVICES": "0"}, None),
    "the user chose": (["/dev/nvidia0"], {"DS_ACCELERATOR": "cuda"}, None),
    "the user chose cpu": ([], {"DS_ACCELERATOR": "cpu"}, None),  # already set: nothing to add
    "uvm and modeset are not GPUs": (["/dev/nvidia-uvm", "/dev/nvidia-modeset", "/dev/nvidia-caps"], {}, "cpu"),
}


@pytest.mark.parametrize("files, env, expected", ACCELERATOR_CASES.values(), ids=list(ACCELERATOR_CASES))
def test_deepspeed_accelerator_override(files, env, expected):
    from dist_ft._quiet import deepspeed_accelerator_override

    assert deepspeed_accelerator_override(device_files=files, env=env) == expected


# --- item 10: bf16 refused on GPUs that would only emulate it ------------------------------------------------------


@pytest.mark.parametrize("gpu, capability, native", [
    ("V100", (7, 0), False), ("T4", (7, 5), False), ("A100", (8, 0), True), ("A10G", (8, 6), True),
    ("L4", (8, 9), True), ("H100", (9, 0), True), ("B200", (10, 0), True)])
def test_bf16_needs_compute_capability_8(gpu, capability, native):
    from dist_ft.distributed.precision import has_native_bf16, hardware_problem

    assert has_native_bf16(capability) is native
    for precision in ("bf16-mixed", "bf16-true"):
        problem = hardware_problem(precision, cuda_available=True, capability=capability)
        assert (problem is None) is native, (gpu, problem)
        if not native:
            assert f"this one is {capability[0]}.{capability[1]}" in problem and "fp16-mixed" in problem
    assert hardware_problem("fp16-mixed", cuda_available=True, capability=capability) is None
    assert hardware_problem("fp32", cuda_available=True, capability=capability) is None


def test_bf16_check_does_not_count_emulation():
    """torch's own check says yes to emulated bf16 unless told otherwise: the decision must not rest on it."""
    import inspect

    assert inspect.signature(torch.cuda.is_bf16_supported).parameters["including_emulation"].default is True


# --- item 12: GPU memory per step, with what lies outside the allocator ----------------------------------------------

GIB = 2**30


def test_gpu_memory_figures_count_context_and_reserve():
    from dist_ft.telemetry.progress import GpuMemoryStats, gpu_memory_figures

    # An 80 GiB card: 20 GiB of tensors at the step's worst moment, the allocator held 24 GiB then and holds 22 now;
    # the device has 25 GiB in use (the 3 GiB beyond the allocator: CUDA context, NCCL buffers, workspaces).
    stats = GpuMemoryStats(allocated_peak=20 * GIB, reserved_peak=24 * GIB, reserved_now=22 * GIB,
                           device_free=55 * GIB, device_total=80 * GIB)
    figures = gpu_memory_figures(stats)
    assert figures == {"peak_memory_mb": 27 * 1024, "allocated_peak_mb": 20 * 1024, "reserved_peak_mb": 24 * 1024,
                       "device_used_mb": 25 * 1024}
    # Nothing outside the allocator (as a mock or a shared reading might say): never below the reserved peak.
    stats = GpuMemoryStats(allocated_peak=GIB, reserved_peak=2 * GIB, reserved_now=2 * GIB, device_free=79 * GIB,
                           device_total=80 * GIB)
    assert gpu_memory_figures(stats)["peak_memory_mb"] == 2 * 1024


class FakeCuda:
    """CUDA's allocator statistics as a sequence of phases: peaks rise with use and fall only on reset."""

    def __init__(self):
        self.allocated_peak = self.reserved_peak = self.now = 0
        self.resets = 0

    def use(self, gib: int) -> None:
        self.now = gib * GIB
        self.allocated_peak = max(self.allocated_peak, self.now)
        self.reserved_peak = max(self.reserved_peak, self.now)

    def read(self):
        from dist_ft.telemetry.progress import GpuMemoryStats
        context = GIB
        return GpuMemoryStats(self.allocated_peak, self.reserved_peak, self.now, 80 * GIB - self.now - context,
                              80 * GIB)

    def reset(self) -> None:
        self.resets += 1
        self.allocated_peak = self.reserved_peak = self.now


def test_memory_meter_reports_each_steps_peak_and_keeps_the_runs():
    from dist_ft.telemetry.progress import MemoryMeter

    cuda = FakeCuda()
    meter = MemoryMeter(torch.device("cuda", 0), read=cuda.read, reset=cuda.reset)
    cuda.use(30)  # loading the model: a transient the steps never see again
    cuda.use(4)
    steps = []
    for step_peak in (10, 12, 11):
        meter.start_step()
        cuda.use(step_peak)
        cuda.use(4)
        steps.append(meter.step())
        if step_peak == 12:
            cuda.use(16)  # an evaluation between steps
            cuda.use(4)
    assert cuda.resets == 3
    assert [s["allocated_peak_mb"] / 1024 for s in steps] == [10, 12, 11]  # not 30, 30, 30 (the lifetime high)
    assert [s["peak_memory_mb"] / 1024 for s in steps] == [11, 13, 12]  # + the context outside the allocator
    assert meter.run_peak() == 31 * 1024  # loading, with the context: the run's peak is still the lifetime's


def test_memory_meter_on_cpu_is_the_peak_rss():
    from dist_ft.telemetry.progress import MemoryMeter

    meter = MemoryMeter(torch.device("cpu"))
    meter.start_step()
    figures = meter.step()
    assert set(figures) == {"peak_memory_mb"} and figures["peak_memory_mb"] > 10
    assert meter.run_peak() >= figures["peak_memory_mb"]
