"""Learning-rate schedule: linear warm-up, then cosine, linear or constant decay down to min_lr_ratio."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def make_scheduler(optimizer: torch.optim.Optimizer, *, peak_lr: float, warmup: int, total: int, kind: str,
                   min_ratio: float):
    """The recipe's schedule over `optimizer`, scaled from the recipe's peak learning rate.

    The peak is set here rather than taken from the optimizer: an optimizer built by a backend (an engine's, from its
    JSON) may hold another value, and LambdaLR would silently scale that one instead."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak_lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total, kind=kind, min_ratio=min_ratio))
