"""training.compile: each transformer block's forward compiled with torch.compile, before the backend wraps or
shards the model (torchtitan's order: compile per block, then FSDP per block).

Per block rather than the whole model: the blocks are identical, so one compiled graph serves them all (compile
time does not grow with depth), and the backend's own per-block hooks (FSDP2's all-gather before a block and
reshard after it, DDP's gradient buckets) stay outside the compiled code, in eager. The block's `forward` is
replaced on the instance, so the module tree and its parameter names (checkpoints, Hugging Face saves) are
unchanged; transformers' activation checkpointing lives inside that `forward` and is compiled with it.

Compilation happens at the first call, i.e. inside the first training step; `compile_seconds` reads how long
dynamo and inductor took, so the trainer reports compile time apart from step time.
"""

from __future__ import annotations

import importlib.util
import shutil

import torch

from ..blocks import transformer_blocks


def why_not_compilable(device: torch.device) -> str | None:
    """What this machine lacks for inductor's code generation (None: nothing)."""
    if device.type == "cpu":
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            return ("torch.compile's CPU backend (inductor) builds C++ and finds no C++ compiler (g++, c++, "
                    "clang++) on PATH; install one (Debian: g++) or set training.compile: false")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return ("torch.compile's GPU backend (inductor) generates Triton kernels and triton is not installed; "
                "install the triton that matches torch or set training.compile: false")
    return None


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile every transformer block's forward in place; returns how many were compiled."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward)
    return len(blocks)


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (dynamo's frame compiles, which include inductor's forward
    code generation, and AOTAutograd's backward compiles, which run at the first backward)."""
    from torch._dynamo.utils import compilation_time_metrics

    keys = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
    return float(sum(sum(compilation_time_metrics.get(k, ())) for k in keys))
