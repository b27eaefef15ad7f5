"""Summed losses over target tokens (or samples). Normalisation happens once, by the global target count, in the
training step; evaluation divides the same sums by the same counts, so the two can never drift apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.formats import IGNORE


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    length = batch["input_ids"].size(1)
    if logits.dim() == 3 and logits.size(1) > length:
        logits = logits[:, -length:]  # prompt tuning prepends its virtual tokens: they carry no target
    return logits


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of cross-entropies: over shifted tokens for a causal LM ([B, T, V] logits), over samples for
    classification ([B, C] logits), each sample weighted by its class (data.balance: class_weights; the weights
    average 1 over the training set, so the loss keeps its scale)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, weight=class_weights, reduction="sum")
    # Shift the labels rather than the logits: slicing [B, T, V] logits would copy the largest activation.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    flat, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and flat.requires_grad:
        return _CrossEntropySum.apply(flat, targets)
    return F.cross_entropy(flat.float(), targets, ignore_index=IGNORE, reduction="sum")


class _CrossEntropySum(torch.autograd.Function):
    """Summed token cross-entropy whose gradient is worked out during the forward, a few rows at a time.

    F.cross_entropy keeps the [tokens, vocab] log-probabilities for the backward, and the backward then makes two
    more tensors of that size (the incoming gradient and the softmax), with the logits themselves still alive: about
    four vocabulary-sized tensors at the start of the backward, which is where FSDP and ZeRO-3 peak. Here only the
    gradient is kept (in the logits' dtype, so bf16 logits are never copied whole to fp32), and the caller can free
    the logits straight after the loss: one vocabulary-sized tensor instead of four. Values are fp32 throughout.
    """

    CHUNK_ELEMENTS = 1 << 22  # rows per chunk such that one chunk's fp32 temporaries stay ~16 MB

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = logits.shape
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = max(1, _CrossEntropySum.CHUNK_ELEMENTS // max(1, vocab))
        for start in range(0, n, rows):
            x = logits[start:start + rows].to(torch.float32, copy=True)  # worked on in place below
            t = targets[start:start + rows]
            keep = t != IGNORE
            safe = torch.where(keep, t, torch.zeros_like(t)).unsqueeze(1)
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            total += ((lse - x.gather(1, safe)).squeeze(1) * keep).sum()
            # d(lse - x_t)/dx = softmax(x) - onehot(t); zero for ignored rows.
            x.sub_(lse).exp_()
            x.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=x.dtype))
            x.mul_(keep.unsqueeze(1))
            grad[start:start + rows] = x
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # The saved gradient is used once: scaled in place rather than copied.
        return grad.mul_(grad_output.to(grad.dtype)), None
