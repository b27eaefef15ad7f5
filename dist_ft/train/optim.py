"""The optimizer factory: the strategy calls it with the parameters it will update (its shards, its flat
partition), so the optimizer sees exactly what the backend steps."""

from __future__ import annotations

import torch

from ..config import Recipe


def make_optimizer(recipe: Recipe):
    t = recipe.training

    def make(params):
        params = list(params)
        # Decoupled weight decay on matrices only: biases and norm scales are not decayed.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if t.optimizer == "adamw_8bit":
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                       eps=t.adam_eps)
        # Fused: one pass over each tensor, where the default (on CPU) makes a parameter-sized temporary per tensor
        # (sqrt of the second moment) and runs several passes. That temporary is the size of a whole sharded
        # partition when a backend steps its shard as one flat tensor, and fused is faster on CPU and GPU alike.
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                 fused=fused or None)

    return make
