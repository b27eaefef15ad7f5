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
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
