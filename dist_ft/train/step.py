"""The step math: one optimizer step over a rank's micro-batches, and what a logged step reports."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..data.batching import count_targets
from ..distributed.strategy import Strategy
from .fused_loss import fused_forward
from .loss import forward_logits, loss_sum


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def training_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      class_weights: torch.Tensor | None = None, *, fused: bool = False) -> torch.Tensor:
    """A training micro-batch's summed loss (its gradient ready for the backward). fused (training.fused_loss): a
    causal LM's head and cross-entropy computed together over chunks of target rows (fused_loss.py), so the
    [targets, vocab] logits never exist whole; otherwise the logits at target positions, then `loss_sum` with the
    gradient written over them (they are not read again)."""
    if fused and batch["labels"].dim() == 2 and "decoder_attention_mask" not in batch:
        return fused_forward(model, batch)[0]
    logits, targets = forward_logits(model, batch)
    return loss_sum(logits, targets, class_weights, reuse_logits=True)


def train_step(strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]], max_grad_norm: float | None,
               class_weights: torch.Tensor | None = None, *, overflow: bool = False, fused_loss: bool = False):
    """One optimizer step over this rank's micro-batches.

    The loss is normalised by the number of target tokens in the whole global batch (all micro-steps, all ranks),
    so every token weighs the same however the batch is split. Backends average gradients over ranks, so each
    rank's sum is scaled by world_size / global_targets. Gradients are synchronised on the last micro-step only.
    `overflow` (fault injection, tests) makes this rank's gradients non-finite, as an fp16 overflow does.
    `fused_loss` (training.fused_loss): the head and the loss computed together, never the whole logits.
    """
    topo = strategy.topo
    local_targets = sum(count_targets(mb) for mb in micro_batches)
    (global_targets,) = all_reduce_sum([local_targets], topo.device)
    scale = topo.world_size / max(global_targets, 1.0) * (math.inf if overflow else 1.0)
    local_loss = 0.0
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(topo.device, non_blocking=True) for k, v in mb.items()}
        with strategy.sync_context(sync=i == len(micro_batches) - 1):
            with strategy.forward_context():
                total = training_loss_sum(strategy.model, mb, class_weights, fused=fused_loss)
            strategy.backward(total * scale)
        local_loss += float(total.detach())
    result = strategy.step(max_grad_norm)
    (loss_total,) = all_reduce_sum([local_loss], topo.device)
    return loss_total / max(global_targets, 1.0), int(global_targets), result


def step_record(*, step: int, loss: float, lr: float, result, n_targets: int, tokens: float, useful: float,
                dt: float, world_size: int, global_batch: int, skipped_steps: int, memory: dict) -> dict:
    """What metrics.jsonl (and W&B) get for a logged step; throughput counts every rank's tokens."""
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm, "targets": n_targets,
              "tokens": int(tokens), "useful_tokens": int(useful), "step_time": dt,
              "tokens_per_s": tokens / dt, "useful_tokens_per_s": useful / dt,
              "tokens_per_s_per_device": tokens / dt / world_size,
              "samples_per_s": global_batch / dt, "skipped": result.skipped,
              "skipped_steps": skipped_steps, **memory}
    if result.loss_scale is not None:
        record["loss_scale"] = result.loss_scale
    return record
