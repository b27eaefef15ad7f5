"""A CPU plan's compute time, measured rather than assumed: one real transformer block of the recipe's model (its
config with one layer, random weights in the compute dtype) timed on this machine at the run's micro-batch, with the
threads one rank gets, forward alone and forward + backward with the method's gradients; the output head and loss
the same way; for QLoRA the dequantisation of the block's 4-bit weights.

Why: on a GPU the datasheet peak times an MFU is a fair guess, but a CPU's throughput depends on the shapes (a
128-token micro-batch against a 5120 x 13824 weight runs near the matmul peak, a 576-wide model far below it), on
how bitsandbytes dequantises there, and on the share of time in attention, norms and activations. Timing the block
measures all of it. A step is then `gas x (blocks x block cost + head)`, the block cost depending on whether the
block needs gradients and on activation checkpointing (`step_compute_s`).

Only for models whose one-layer build fits in `LIMIT_BYTES` (embeddings and head included); the plan falls back to
FLOPs at its MFU otherwise, and says which it used.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

LIMIT_BYTES = 2 * 2**30
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_CACHE: dict[tuple, Optional["BlockTiming"]] = {}


@dataclass(frozen=True)
class BlockTiming:
    forward_s: float    # one block, one micro-batch, no gradients
    train_s: float      # one block's forward and backward with the method's gradients
    head_s: float       # final norm, output head and loss, forward and backward
    dequant_s: float    # QLoRA: dequantising the block's 4-bit weights once (0 otherwise)
    threads: int

    def step_compute_s(self, *, layers: int, layers_with_grad: int, checkpointing: bool, accumulation: int) -> float:
        """One rank's compute for an optimizer step: blocks that need gradients run forward and backward (plus the
        recomputed forward under activation checkpointing), the others forward only; QLoRA dequantises each weight
        in the forward, in the backward (for the input gradient) and in the recompute."""
        grad, nograd = layers_with_grad, layers - layers_with_grad
        blocks = grad * (self.train_s + (self.forward_s if checkpointing else 0.0)) + nograd * self.forward_s
        dequant = self.dequant_s * (grad * (3 if checkpointing else 2) + nograd)
        return accumulation * (blocks + dequant + self.head_s)


def _median(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def one_layer_bytes(facts, dtype_bytes: int) -> float:
    block = sum(p.numel for p in facts.params if p.block == 0)
    outside = sum(p.numel for p in facts.params if p.block is None)
    return (block + outside) * dtype_bytes


def time_block(facts, recipe, *, kind: str, seq: int, micro_batch: int, dtype: torch.dtype,
               threads: int) -> Optional[BlockTiming]:
    """None when the model cannot be timed this way (too large, no layer count, a build that fails)."""
    d = recipe.distributed
    key = (facts.path, facts.task, kind, seq, micro_batch, dtype, threads, d.activation_checkpointing,
           d.host_memory_trim)
    if key not in _CACHE:
        _CACHE[key] = _time(facts, recipe, kind=kind, seq=seq, micro_batch=micro_batch, dtype=dtype,
                            threads=threads) if facts.task == "causal_lm" else None
    return _CACHE[key]


def _time(facts, recipe, *, kind, seq, micro_batch, dtype, threads) -> Optional[BlockTiming]:
    from transformers import AutoModelForCausalLM

    layer_key = next((k for k in _LAYER_KEYS if hasattr(facts.config, k)), None)
    if layer_key is None or one_layer_bytes(facts, dtype.itemsize) > LIMIT_BYTES:
        return None
    config = copy.deepcopy(facts.config)
    setattr(config, layer_key, 1)
    config.use_cache = False
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        from ..blocks import transformer_blocks
        from ..host_memory import release_freed
        block = transformer_blocks(model)[0]
        args, kwargs = _block_inputs(model, block, seq, micro_batch)
        full = kind in ("full", "partial")
        for p in model.parameters():
            p.requires_grad_(full)

        def forward():
            with torch.no_grad():
                block(*args, **kwargs)

        # distributed.host_memory_trim: blocks returns a block's freed memory before its forward and before its
        # backward (dist_ft/host_memory.py): the trims and the page faults that refill what they returned are part
        # of the step, so the timed training block does the same.
        trim = release_freed if recipe.distributed.host_memory_trim == "blocks" else (lambda: None)

        def train():
            trim()
            x = args[0].detach().requires_grad_(True)
            out = block(x, *args[1:], **kwargs)
            trim()
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()

        hidden = torch.randn(micro_batch, seq, facts.hidden, dtype=dtype)
        labels = torch.randint(0, facts.vocab, (micro_batch, seq))

        def head():
            h = hidden.detach().requires_grad_(True)
            norm = getattr(getattr(model, "model", model), "norm", None)
            logits = model.get_output_embeddings()(norm(h) if norm is not None else h)
            model.loss_function(logits=logits, labels=labels, vocab_size=facts.vocab).backward()

        timing = BlockTiming(forward_s=_median(forward), train_s=_median(train), head_s=_median(head),
                             dequant_s=_dequant_s(block) if kind == "qlora" else 0.0, threads=threads)
    except Exception:  # an architecture this generic path cannot drive: the FLOPs model instead
        return None
    finally:
        torch.set_num_threads(before)
    return timing


class _Captured(Exception):
    pass


def _block_inputs(model, block, seq: int, micro_batch: int) -> tuple[tuple, dict]:
    """The block's real inputs (hidden states, rotary embeddings, mask...), taken from the model's own forward."""
    seen: dict = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq))
        model(input_ids=ids)
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def _dequant_s(block) -> float:
    """Seconds to dequantise every Linear weight of the block from nf4 (bitsandbytes, as QLoRA's forward does)."""
    import bitsandbytes.functional as bf

    packed = [bf.quantize_4bit(m.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
              for m in block.modules() if isinstance(m, torch.nn.Linear)]
    return _median(lambda: [bf.dequantize_4bit(p, s) for p, s in packed])


def rank_threads(recipe, ranks_per_node: int) -> int:
    """The threads one rank gets: what training sets (distributed.threads_per_process, else cores / ranks)."""
    return recipe.distributed.threads_per_process or max(1, (os.cpu_count() or 1) // max(ranks_per_node, 1))
