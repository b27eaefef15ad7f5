"""Keep third-party start-up noise out of the run log: warnings that say nothing about this run."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party(*, main_rank: bool = True) -> None:
    # bitsandbytes looks for optional CPU kernels from the hub at import and warns when they are absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated.*")
    if "DS_ACCELERATOR" not in os.environ and not os.path.exists("/dev/nvidia0") and not os.environ.get(
            "CUDA_VISIBLE_DEVICES"):
        os.environ["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed warns that it fell back to CPU on every import
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not main_rank:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
