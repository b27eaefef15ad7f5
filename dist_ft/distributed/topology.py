"""Who am I, and with whom: ranks from whatever launcher started us, the device, the backend, the process group.

Every launcher announces ranks in its own way: torchrun, `accelerate launch` and the `deepspeed` launcher set
RANK / WORLD_SIZE / LOCAL_RANK; `srun` without torchrun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. One
process started by hand sets nothing and needs no launcher. This module is the one place that reads them, picks
NCCL on GPUs (with gloo beside it for CPU tensors) and gloo elsewhere, maps a rank to its device, sets thread
counts, and applies the collective timeout from the recipe so that a dead peer ends the job instead of hanging it.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}) on "
                f"{socket.gethostname()}, device {self.device}, backend {self.backend}, launcher {self.launcher}")


def _int_env(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return None


def detect_launcher() -> str:
    if any(k.startswith("ACCELERATE_") for k in os.environ):  # accelerate starts its ranks through torchrun
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "DEEPSPEED_LAUNCHER" in os.environ or "CROSS_RANK" in os.environ:
        return "deepspeed"
    if "RANK" in os.environ:
        return "env"
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "srun"
    return "single"


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def read_ranks() -> tuple[int, int, int, int, str]:
    """(rank, world_size, local_rank, local_world_size, launcher) from the environment."""
    launcher = detect_launcher()
    if launcher == "srun":
        # srun started the ranks itself: derive the rendezvous the way torchrun would have.
        rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        local, nodes = _int_env("SLURM_LOCALID") or 0, _int_env("SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return rank, world, local, max(1, world // nodes), launcher
    rank = _int_env("RANK") or 0
    world = _int_env("WORLD_SIZE") or 1
    local = _int_env("LOCAL_RANK") or 0
    local_world = _int_env("LOCAL_WORLD_SIZE") or (world if world <= (torch.cuda.device_count() or os.cpu_count() or 1)
                                                   else 1)
    return rank, world, local, local_world, launcher


def process_group_backend(*, cuda_available: bool) -> str:
    """The backend string for `init_process_group`.

    On GPUs, NCCL for CUDA tensors and gloo for CPU tensors in one group (as torchtitan does): FSDP2 with
    `offload: params|all` keeps gradients as CPU DTensors, and clipping or `full_tensor()` then all-reduces CPU
    tensors, which an NCCL-only group refuses ("No backend type associated with device type cpu"). A gloo
    sub-backend costs nothing until a CPU collective runs, so it is always there rather than only with offload
    (checkpoint and object collectives on CPU tensors need it too).
    """
    return "cuda:nccl,cpu:gloo" if cuda_available else "gloo"


# Launchers that start every local rank from one environment: all of them see the same CUDA devices, so one visible
# GPU for several local ranks means they would share it. srun (and a hand-made RANK/LOCAL_RANK setup) may instead
# give each task its own GPU (`--gpus-per-task=1`, `--gpu-bind`, CUDA_VISIBLE_DEVICES per process).
_SHARED_ENV_LAUNCHERS = ("torchrun", "accelerate", "deepspeed")


def cuda_device_index(*, local_rank: int, local_world_size: int, visible_devices: int, launcher: str) -> int:
    """Which of the CUDA devices this process sees is its own.

    - one visible device: it is ours (cuda:0), as under srun with per-task GPU binding, where every task sees only
      its GPU whatever its local rank;
    - otherwise the local rank indexes the node's devices (torchrun and friends: every rank sees them all).
    Anything else (fewer devices than local ranks) is an error naming the arithmetic, raised on every rank so
    that none waits for peers that cannot start.
    """
    if visible_devices < 1:
        raise RuntimeError(f"local rank {local_rank} sees no CUDA device (CUDA_VISIBLE_DEVICES empty or -1?)")
    if visible_devices == 1 and (local_world_size == 1 or launcher not in _SHARED_ENV_LAUNCHERS):
        return 0
    if local_world_size <= visible_devices and local_rank < visible_devices:
        return local_rank
    if visible_devices == 1:
        raise RuntimeError(f"{local_world_size} processes per node under {launcher} but each sees one GPU: they "
                           "would share it. Start at most one process per GPU")
    raise RuntimeError(f"local rank {local_rank} has no GPU: {local_world_size} processes per node but this one "
                       f"sees {visible_devices} GPU(s); start at most that many processes per node, or bind one GPU "
                       "per task (srun --gpus-per-task=1)")


def init_distributed(*, timeout_seconds: int, threads_per_process: int | None = None, store=None) -> Topology:
    """Start the process group. `store`: the launcher's rendezvous store, opened earlier (rendezvous.open_store)
    to wait for slow peers before the group exists; None to let torch open it from the environment."""
    rank, world, local, local_world, launcher = read_ranks()
    if torch.cuda.is_available():
        index = cuda_device_index(local_rank=local, local_world_size=local_world,
                                  visible_devices=torch.cuda.device_count(), launcher=launcher)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        # TF32 matmuls on Ampere and later: fp32 recipes run ~8x faster at ~1e-3 relative error, as every
        # framework does by default for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        backend = process_group_backend(cuda_available=True)
        # Surface NCCL errors as exceptions (and so within the timeout) instead of hangs.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        device, backend = torch.device("cpu"), process_group_backend(cuda_available=False)
        threads = threads_per_process or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            # One process started by hand: an in-memory store, no port to pick or to collide on.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            if store is not None:
                kwargs["store"] = store
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    topo = Topology(rank, world, local, local_world, device, backend, launcher)
    # Launchers on CPU have traps where N processes silently train alone or all claim rank 0: check what the
    # process group says against what the environment said.
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group says rank {dist.get_rank()}/{dist.get_world_size()} but the launcher "
                           f"said {rank}/{world}: the launcher is misconfigured (see README, Launchers)")
    ranks = [None] * world
    dist.all_gather_object(ranks, rank)
    if sorted(ranks) != list(range(world)):
        raise RuntimeError(f"ranks seen across the group are {ranks}: two processes claim the same rank; check the "
                           "launcher settings (see README, Launchers)")
    return topo


_GROUP_USED = False


def process_group_was_used() -> bool:
    """True once this process has joined a process group (see `hard_exit`)."""
    return _GROUP_USED


def shutdown() -> None:
    """Tear the process group down while the interpreter is still fully alive.

    gloo's worker threads drop the tensors of finished collectives after `wait()` has returned; if one does so
    while Python is finalizing, it cannot take the GIL and the process aborts ("terminate called without an
    active exception", exit -6) after a run that succeeded. DDP/FSDP modules keep the group alive through
    reference cycles, so collect them now: the group's destructor then joins its threads here, not at exit.
    """
    global _GROUP_USED
    if dist.is_initialized():
        _GROUP_USED = True
        dist.destroy_process_group()
    gc.collect()


def hard_exit(code: int) -> None:
    """End a process that ran collectives without running the interpreter's finalization.

    `shutdown` makes the gloo abort rare, not impossible: a CI run still saw one in about 200 launches, from a
    thread of a group that the garbage collector had not reached. Everything we own is closed by now (outputs
    written, sinks finished), so flush what is buffered and leave before finalization can race those threads.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe must not turn a finished run into a failure
            pass
    os._exit(code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
