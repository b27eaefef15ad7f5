"""Keep third-party start-up noise out of the run log: warnings that say nothing about this run."""

from __future__ import annotations

import glob
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping

# Device nodes of a GPU this process may use: /dev/nvidia<N> for any N (a container given GPU 3 has only
# /dev/nvidia3), /dev/nvidiactl (present whenever a NVIDIA device is mapped in), /dev/dxg (WSL2), /dev/kfd (ROCm,
# whose GPUs DeepSpeed also drives through its cuda accelerator).
_GPU_DEVICE_FILE = re.compile(r"^/dev/(nvidia\d+|nvidiactl|dxg|kfd)$")
# Variables that say GPUs were given to this process (set to none of "", "-1", "void", "none", "NoDevFiles").
_GPU_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
_NO_GPU_VALUES = ("", "-1", "void", "none", "nodevfiles")


def deepspeed_accelerator_override(*, device_files: Iterable[str], env: Mapping[str, str]) -> str | None:
    """"cpu" when DS_ACCELERATOR should be set to it (nothing says this machine has a GPU), else None.

    Only a hint to silence DeepSpeed's fallback warning, so any sign of a GPU wins: setting "cpu" on a GPU machine
    makes DeepSpeed move the model to the CPU while batches are on CUDA, whereas a missed CPU machine costs one
    warning. Decided from file names and variables, not torch.cuda: this runs before torch is imported.
    """
    if "DS_ACCELERATOR" in env:
        return None
    if any(_GPU_DEVICE_FILE.match(f) for f in device_files):
        return None
    if any(env.get(k) is not None and env[k].strip().lower() not in _NO_GPU_VALUES for k in _GPU_ENV):
        return None
    return "cpu"


def quiet_third_party(*, main_rank: bool = True) -> None:
    # bitsandbytes looks for optional CPU kernels from the hub at import and warns when they are absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated.*")
    # Else DeepSpeed warns that it fell back to CPU on every import.
    accelerator = deepspeed_accelerator_override(device_files=glob.glob("/dev/nvidia*") + glob.glob("/dev/dxg")
                                                 + glob.glob("/dev/kfd"), env=os.environ)
    if accelerator is not None:
        os.environ["DS_ACCELERATOR"] = accelerator
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not main_rank:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
