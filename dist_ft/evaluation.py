"""Held-out evaluation, sharded across ranks and reduced exactly.

Rank r evaluates examples r, r+W, r+2W, ... Every rank runs the same number of forward passes (a sharded model
needs every rank in every forward), padding its last batch with zero-weight repeats. Sums and counts (and, for
classification, the confusion matrix) are all-reduced, so the result equals a one-process evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .data.batching import collate
from .data.formats import IGNORE, Example
from .losses import forward_logits, loss_sum


def _reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu()


@torch.no_grad()
def evaluate(strategy, examples: list[Example], *, micro_batch: int, pad_id: int, num_labels: int | None = None
             ) -> dict[str, float]:
    topo = strategy.topo
    mine = examples[topo.rank::topo.world_size]
    per_rank = math.ceil(len(examples) / topo.world_size)
    n_batches = math.ceil(per_rank / micro_batch) if per_rank else 0
    classification = bool(examples) and examples[0].is_classification
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, target count
    confusion = torch.zeros((num_labels or 1, num_labels or 1), dtype=torch.float64)
    was_training = strategy.model.training
    strategy.train(False)
    for b in range(n_batches):
        chunk = mine[b * micro_batch:(b + 1) * micro_batch]
        real = len(chunk)
        if real == 0:  # this rank ran out: a dummy forward keeps sharded collectives in step, then is discarded
            chunk = [examples[0]]
        batch = {k: v.to(topo.device) for k, v in collate(chunk, pad_id).items()}
        with strategy.forward_context():
            logits = forward_logits(strategy.model, batch)
        if real == 0:
            continue
        total[0] += float(loss_sum(logits, batch["labels"]))
        if classification:
            total[1] += real
            preds = logits.argmax(-1).cpu()
            for t, p in zip(batch["labels"].cpu().tolist(), preds.tolist()):
                confusion[t, p] += 1
        else:
            total[1] += int((batch["labels"][:, 1:] != IGNORE).sum())
    strategy.train(was_training)
    total = _reduce(total, topo.device)
    out = {"eval_loss": float(total[0] / max(total[1], 1))}
    out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    if classification:
        confusion = _reduce(confusion, topo.device)
        out.update(classification_metrics(confusion))
    return out


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro F1 from a confusion matrix (rows: true class, columns: predicted). Classes absent from
    both the labels and the predictions are left out of the macro average."""
    tp = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = (support + predicted) > 0
    return {"eval_accuracy": float(tp.sum() / confusion.sum().clamp(min=1)),
            "eval_f1": float(f1[present].mean()) if present.any() else 0.0}
