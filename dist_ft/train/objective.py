"""What a step optimises: next-token loss on the answers (SFT), or a preference objective on pairs.

`make_objective` picks one from `objective.kind` (kto: kto.py); the Trainer calls its `step` and the evaluation its
`evaluate`.
A preference step runs each micro-batch's chosen and rejected sequences through one forward (rows i and i + P of
the batch are a pair: batching.unpair), the head only at answer positions, and the reference (dpo, ipo) through
the same model with its adapters switched off, without gradients. The loss is the mean over the pairs of the whole
global batch (all micro-steps, all ranks), so it does not depend on how the batch is split.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..data.batching import collate
from . import preference as P
from .kto import KTO
from .reference import ReferencePolicy
from .step import all_reduce_sum, train_step

METRICS = ("chosen_reward", "rejected_reward", "margin", "reward_accuracy")


def pairs_in(batch: dict) -> int:
    """Pairs in a collated batch: half its rows, or in packed pair rows half its segments."""
    if "segments" in batch:
        return (int(batch["segments"].max()) + 1) // 2
    return batch["input_ids"].size(0) // 2


class SFT:
    """Next-token cross-entropy on the target tokens (step.py)."""
    kind = "sft"

    def __init__(self, fused_loss: bool = False):
        self.fused_loss = fused_loss

    def step(self, strategy, micro_batches, max_grad_norm, class_weights=None, *, overflow: bool = False,
             indices=None):
        loss, n_targets, result = train_step(strategy, micro_batches, max_grad_norm, class_weights,
                                             overflow=overflow, fused_loss=self.fused_loss)
        return loss, n_targets, result, {}


class Preference:
    """dpo, ipo, simpo or orpo on preference pairs (preference.py holds the formulas)."""

    def __init__(self, cfg, method_kind: str, fused_loss: bool = False):
        self.kind, self.beta = cfg.kind, cfg.resolved_beta()
        self.fused_loss = fused_loss  # training.fused_loss: the policy's log-probs without whole logits
        self.label_smoothing, self.gamma = cfg.label_smoothing, cfg.simpo_gamma
        self.reference = ReferencePolicy(cfg, method_kind, fused_loss)

    def losses(self, strategy, batch, ref: torch.Tensor | None) -> tuple[P.PairLosses, torch.Tensor]:
        """The pairs' losses and rewards, and the policy's answer log-probs ([2P]: chosen rows, then rejected)."""
        logps, counts = P.sequence_logps(strategy.model, batch, fused=self.fused_loss)
        n = counts.to(logps.dtype)
        k = logps.size(0) // 2
        pc, pr, nc, nr = logps[:k], logps[k:], n[:k], n[k:]
        if self.kind == "dpo":
            out = P.dpo(pc, pr, ref[:k], ref[k:], beta=self.beta, label_smoothing=self.label_smoothing)
        elif self.kind == "ipo":
            out = P.ipo(pc, pr, ref[:k], ref[k:], nc, nr, beta=self.beta)
        elif self.kind == "simpo":
            out = P.simpo(pc, pr, nc, nr, beta=self.beta, gamma=self.gamma)
        else:
            out = P.orpo(pc, pr, nc, nr, beta=self.beta)
        return out, logps

    @staticmethod
    def _sums(out: P.PairLosses) -> list[float]:
        """loss, chosen reward, rejected reward, margin, correctly ranked pairs: summed over the batch's pairs."""
        margin = out.chosen_rewards - out.rejected_rewards
        return [float(out.losses.detach().sum()), float(out.chosen_rewards.sum()), float(out.rejected_rewards.sum()),
                float(margin.sum()), float((margin > 0).sum())]

    # ------------------------------------------------------------------------------------------------ training
    def step(self, strategy, micro_batches, max_grad_norm, class_weights=None, *, overflow: bool = False,
             indices=None):
        """`indices`: per micro-batch, which training pairs it holds (a precomputed reference looks them up)."""
        topo = strategy.topo
        local_pairs = sum(pairs_in(mb) for mb in micro_batches)
        (global_pairs,) = all_reduce_sum([local_pairs], topo.device)
        # Backends average gradients over ranks: each rank's sum is scaled by world_size / global pairs.
        scale = topo.world_size / max(global_pairs, 1.0) * (math.inf if overflow else 1.0)
        sums = [0.0] * 5
        for i, mb in enumerate(micro_batches):
            mb = {k: v.to(topo.device, non_blocking=True) for k, v in mb.items()}
            ref = self.reference.logps(strategy, mb, "train", indices[i] if indices else None)
            with strategy.sync_context(sync=i == len(micro_batches) - 1):
                with strategy.forward_context():
                    out, _ = self.losses(strategy, mb, ref)
                strategy.backward(out.losses.sum() * scale)
            sums = [a + b for a, b in zip(sums, self._sums(out))]
        result = strategy.step(max_grad_norm)
        totals = all_reduce_sum(sums, topo.device)
        n = max(global_pairs, 1.0)
        return totals[0] / n, int(global_pairs), result, dict(zip(METRICS, (t / n for t in totals[1:])))

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, strategy, pairs: list, *, micro_batch: int, pad_id: int, indices=None) -> dict:
        """Held-out pairs, sharded over ranks as evaluation.evaluate does (every rank the same number of forwards):
        the objective's loss, the rewards, and the policy's own preference accuracy (log-prob of chosen above
        rejected)."""
        topo = strategy.topo
        indices = list(range(len(pairs))) if indices is None else list(indices)  # of the held-out set
        mine = list(range(topo.rank, len(pairs), topo.world_size))
        n_batches = math.ceil(math.ceil(len(pairs) / topo.world_size) / micro_batch) if pairs else 0
        totals = torch.zeros(7, dtype=torch.float64)  # the 5 sums, policy-preferred pairs, pairs
        was_training = strategy.model.training
        strategy.train(False)
        for b in range(n_batches):
            chunk = mine[b * micro_batch:(b + 1) * micro_batch] or [0]
            real = len(mine[b * micro_batch:(b + 1) * micro_batch])
            batch = {k: v.to(topo.device) for k, v in collate([pairs[j] for j in chunk], pad_id).items()}
            ref = self.reference.logps(strategy, batch, "eval", [indices[j] for j in chunk])
            with strategy.forward_context():
                out, logps = self.losses(strategy, batch, ref)
            if real:  # (a rank that ran out ran a dummy batch to keep sharded collectives in step)
                k = logps.size(0) // 2
                totals[:5] += torch.tensor(self._sums(out), dtype=torch.float64)
                totals[5] += float((logps[:k] > logps[k:]).sum())
                totals[6] += real
        strategy.train(was_training)
        if dist.is_initialized() and topo.world_size > 1:
            totals = totals.to(topo.device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        n = max(float(totals[6]), 1.0)
        out = {"eval_loss": float(totals[0]) / n}
        out.update({f"eval_{m}": float(t) / n for m, t in zip(METRICS, totals[1:5])})
        out["eval_preference_accuracy"] = float(totals[5]) / n
        return out


def make_objective(recipe):
    kind = recipe.objective.kind
    fused = recipe.training.fused_loss
    if kind == "sft":
        return SFT(fused)
    if kind == "kto":
        return KTO(recipe.objective, recipe.method.kind, fused)
    return Preference(recipe.objective, recipe.method.kind, fused)
