"""The reference policy of dpo, ipo and kto: the model with its adapters switched off, or precomputed.

ReferencePolicy gives a batch's reference log-probs either way. An adapter method's reference is the model itself
with its adapters switched off. The precomputed reference holds every training and held-out pair's answer log-probs
under the starting weights, computed once before the first step and cached beside the token cache. A full fine-tune
changes every weight, so its reference would otherwise be a second, frozen copy of the model. These log-probs are
all DPO and IPO need of it: two numbers per pair. They are computed with the model as the strategy built it (before
any checkpoint is loaded, so a resumed run reads the same numbers), sharded over ranks (rank r takes pairs r, r+W,
...; every rank runs the same number of forwards, as sharded backends need) and gathered; rank 0 writes them under
the data cache, keyed by the model, precision and data, and a later run (or a resume) reads them back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config.checks import ADAPTER_OFF_METHODS
from ..data.batching import collate
from ..distributed import watchdog
from .preference import REFERENCE_FREE, sequence_logps


class ReferencePolicy:
    """objective.reference resolved: None (simpo, orpo need none), "adapter_off", "precomputed" or "copy". The
    Trainer sets the precomputed numbers or the frozen copy (Strategy.frozen_copy) before the first step, before a
    checkpoint replaces the starting weights."""

    def __init__(self, cfg, method_kind: str, fused: bool = False):
        self.fused = fused  # training.fused_loss: the reference's forward holds no whole logits either
        adapter = cfg.reference == "adapter_off" or (cfg.reference == "auto" and method_kind in ADAPTER_OFF_METHODS)
        self.mode = (None if cfg.kind in REFERENCE_FREE else "copy" if cfg.reference == "copy" else
                     "adapter_off" if adapter else "precomputed")
        self.precomputed: PrecomputedReference | None = None
        self.copy: torch.nn.Module | None = None

    def logps(self, strategy, batch, table: str = "train", indices=None) -> torch.Tensor | None:
        """The reference's answer log-probs of `batch` (rows of examples `indices` of `table`), without gradients."""
        if self.mode is None:
            return None
        if self.mode == "precomputed":
            return self.precomputed.rows(table, indices, strategy.topo.device)
        if self.mode == "copy":
            with torch.no_grad(), strategy.forward_context():
                logps, _ = sequence_logps(self.copy, batch, fused=self.fused)
            return logps.detach()
        with torch.no_grad(), strategy.unwrap().disable_adapter(), strategy.forward_context():
            logps, _ = sequence_logps(strategy.model, batch, fused=self.fused)
        return logps.detach()


class PrecomputedReference:
    def __init__(self, train: np.ndarray, eval_: np.ndarray):
        self.train, self.eval = train, eval_  # [pairs, 2]: chosen, rejected

    def rows(self, table: str, indices: list[int], device) -> torch.Tensor:
        """[2k] for pairs `indices` of `table` ("train" or "eval"): every chosen value, then every rejected one, the
        order of a collated batch of pairs."""
        values = getattr(self, table)[np.asarray(indices, np.int64)]
        return torch.as_tensor(np.concatenate([values[:, 0], values[:, 1]]), device=device)

    @classmethod
    def load_or_compute(cls, strategy, *, train, eval_, cache_dir: Path | None, key: dict, micro_batch: int,
                        pad_id: int, log, fused: bool = False) -> "PrecomputedReference":
        path = None
        if cache_dir is not None:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
            path = Path(cache_dir) / f"reference-{digest}.npz"
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                if len(z["train"]) == len(train) and len(z["eval"]) == len(eval_):
                    log(f"[objective] reference log-probs of {len(train):,} + {len(eval_):,} pairs read from {path}")
                    return cls(z["train"], z["eval"])
        log(f"[objective] computing the reference log-probs of {len(train):,} training and {len(eval_):,} held-out "
            "pairs with the starting weights (once; cached)")
        ref = cls(*(_compute(strategy, pairs, micro_batch, pad_id, fused) for pairs in (train, eval_)))
        if path is not None and strategy.topo.is_main:
            tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
            np.savez(tmp, train=ref.train, eval=ref.eval)
            os.replace(tmp, path)
        return ref


@torch.no_grad()
def _compute(strategy, pairs, micro_batch: int, pad_id: int, fused: bool) -> np.ndarray:
    topo = strategy.topo
    n = len(pairs)
    mine = list(range(topo.rank, n, topo.world_size))
    rounds = math.ceil(math.ceil(n / topo.world_size) / micro_batch) if n else 0
    out = np.zeros((n, 2), np.float64)
    was_training = strategy.model.training
    strategy.train(False)
    for b in range(rounds):
        idx = mine[b * micro_batch:(b + 1) * micro_batch]
        batch = collate([pairs[i] for i in idx] or [pairs[0]], pad_id)
        batch.pop("desirable", None)  # (KTO's labels: not a model input)
        batch = {k: v.to(topo.device) for k, v in batch.items()}
        with strategy.forward_context():
            logps, _ = sequence_logps(strategy.model, batch, fused=fused)
        if idx:  # (a rank that ran out ran a dummy batch to keep sharded collectives in step)
            values = logps.double().cpu().numpy()
            out[idx, 0], out[idx, 1] = values[:len(idx)], values[len(idx):]
        watchdog.beat()
    strategy.train(was_training)
    if dist.is_initialized() and topo.world_size > 1:
        t = torch.as_tensor(out, device=topo.device)
        dist.all_reduce(t)  # each pair was filled by exactly one rank; the others hold zeros there
        out = t.cpu().numpy()
    return out
