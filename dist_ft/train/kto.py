"""KTO (Ethayarajh et al. 2024) on unpaired examples: a prompt, one completion, and whether it is desirable.

Each example is stored with a second, mismatched sequence: its prompt with another example's completion
(data/formats.py). KTO's reference point z0 is the policy's KL from the reference, estimated on those mismatched
sequences: z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))), held constant. TRL estimates it per device batch,
gathered over ranks; here it is estimated over the whole global batch (every micro-step, every rank) in a first pass
without gradients, so the loss does not depend on how the batch is split over ranks and micro-steps: with no
gradient accumulation, it is TRL's estimate. The second pass runs the examples' own sequences with gradients, and
the reference (adapters off, or precomputed) once per micro-batch for both halves.
"""

from __future__ import annotations

import math

import torch

from ..data.batching import collate
from . import preference as P
from .reference import ReferencePolicy
from .step import all_reduce_sum

METRICS = ("chosen_reward", "rejected_reward", "margin", "reward_accuracy", "kl")


def _rows(batch: dict, a: int, b: int) -> dict:
    return {k: v[a:b] for k, v in batch.items()}


class KTO:
    """Desirable answers' losses weighted by objective.kto_desirable_weight, undesirable ones' by
    kto_undesirable_weight; "chosen" and "rejected" rewards are those of desirable and undesirable examples."""

    kind = "kto"

    def __init__(self, cfg, method_kind: str, fused_loss: bool = False):
        self.beta, self.reference = cfg.resolved_beta(), ReferencePolicy(cfg, method_kind, fused_loss)
        self.fused_loss = fused_loss  # training.fused_loss: the policy's log-probs without whole logits
        self.desirable_weight, self.undesirable_weight = cfg.kto_desirable_weight, cfg.kto_undesirable_weight

    def _reference_point(self, strategy, batches: list[dict], table: str, indices, counted=None) -> tuple[float, list]:
        """z0 over `batches` (all ranks'; `counted[i]` False leaves out a rank's dummy batch), and each batch's
        reference log-probs ([2k]: own rows, then mismatched rows)."""
        refs, kl_sum, rows = [], 0.0, 0
        for i, mb in enumerate(batches):
            k = mb["input_ids"].size(0) // 2
            ref = self.reference.logps(strategy, mb, table, indices[i] if indices else None)
            with torch.no_grad(), strategy.forward_context():
                mismatched, _ = P.sequence_logps(strategy.model, _rows(mb, k, 2 * k), fused=self.fused_loss)
            if counted is None or counted[i]:
                kl_sum, rows = kl_sum + float((mismatched - ref[k:]).sum()), rows + k
            refs.append(ref)
        total, n = all_reduce_sum([kl_sum, rows], strategy.topo.device)
        return max(total / max(n, 1.0), 0.0), refs

    def _losses(self, strategy, mb: dict, desirable: torch.Tensor, ref: torch.Tensor, z0: float) -> P.PairLosses:
        k = mb["input_ids"].size(0) // 2
        pi, _ = P.sequence_logps(strategy.model, _rows(mb, 0, k), fused=self.fused_loss)
        return P.kto(pi, ref[:k], desirable.to(pi.device), torch.tensor(z0, dtype=pi.dtype, device=pi.device),
                     beta=self.beta, desirable_weight=self.desirable_weight,
                     undesirable_weight=self.undesirable_weight)

    def _sums(self, out: P.PairLosses, desirable: torch.Tensor, z0: float) -> list[float]:
        """loss; desirable examples' reward and count; undesirable ones' reward and count; examples whose reward is
        on their label's side of the reference point (beta * z0)."""
        reward = torch.where(desirable, out.chosen_rewards, out.rejected_rewards)
        right = torch.where(desirable, reward > self.beta * z0, reward < self.beta * z0)
        return [float(out.losses.detach().sum()), float(out.chosen_rewards.sum()), float(desirable.sum()),
                float(out.rejected_rewards.sum()), float((~desirable).sum()), float(right.sum())]

    @staticmethod
    def _metrics(totals: list[float], z0: float, prefix: str = "") -> dict:
        n = max(totals[2] + totals[4], 1.0)
        chosen, rejected = totals[1] / max(totals[2], 1.0), totals[3] / max(totals[4], 1.0)
        values = (chosen, rejected, chosen - rejected, totals[5] / n, z0)
        return {f"{prefix}{m}": v for m, v in zip(METRICS, values)}

    # ------------------------------------------------------------------------------------------------ training
    def step(self, strategy, micro_batches, max_grad_norm, class_weights=None, *, overflow: bool = False,
             indices=None):
        topo = strategy.topo
        batches = [{k: v.to(topo.device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
        labels = [mb.pop("desirable") for mb in batches]
        (global_n,) = all_reduce_sum([sum(len(d) for d in labels)], topo.device)
        scale = topo.world_size / max(global_n, 1.0) * (math.inf if overflow else 1.0)
        z0, refs = self._reference_point(strategy, batches, "train", indices)
        sums = [0.0] * 6
        for i, mb in enumerate(batches):
            with strategy.sync_context(sync=i == len(batches) - 1):
                with strategy.forward_context():
                    out = self._losses(strategy, mb, labels[i], refs[i], z0)
                strategy.backward(out.losses.sum() * scale)
            sums = [a + b for a, b in zip(sums, self._sums(out, labels[i], z0))]
        result = strategy.step(max_grad_norm)
        totals = all_reduce_sum(sums, topo.device)
        return totals[0] / max(global_n, 1.0), int(global_n), result, self._metrics(totals, z0)

    # ------------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, strategy, examples: list, *, micro_batch: int, pad_id: int, indices=None) -> dict:
        """Held-out examples sharded over ranks (every rank the same number of forwards), z0 over all of them."""
        topo = strategy.topo
        indices = list(range(len(examples))) if indices is None else list(indices)
        mine = list(range(topo.rank, len(examples), topo.world_size))
        n_batches = math.ceil(math.ceil(len(examples) / topo.world_size) / micro_batch) if examples else 0
        chunks = [mine[b * micro_batch:(b + 1) * micro_batch] for b in range(n_batches)]
        batches, labels = [], []
        for chunk in chunks:  # a rank that ran out runs a dummy batch (keeps sharded collectives in step), uncounted
            batch = {k: v.to(topo.device) for k, v in collate([examples[j] for j in chunk or [0]], pad_id).items()}
            labels.append(batch.pop("desirable"))
            batches.append(batch)
        was_training = strategy.model.training
        strategy.train(False)
        real = [[indices[j] for j in chunk or [0]] for chunk in chunks]
        z0, refs = self._reference_point(strategy, batches, "eval", real, [bool(c) for c in chunks])
        sums = [0.0] * 6
        for mb, desirable, ref, chunk in zip(batches, labels, refs, chunks):
            with strategy.forward_context():
                out = self._losses(strategy, mb, desirable, ref, z0)
            if chunk:
                sums = [a + b for a, b in zip(sums, self._sums(out, desirable, z0))]
        strategy.train(was_training)
        totals = all_reduce_sum(sums, topo.device)
        n = max(totals[2] + totals[4], 1.0)
        return {"eval_loss": totals[0] / n, **self._metrics(totals, z0, "eval_")}
