"""Preference objectives from sequence log-probabilities: DPO, IPO, SimPO, ORPO and KTO, each as in its paper.

Every function here takes per-sequence log-probabilities (summed over the answer tokens) and answer lengths, and
returns per-example losses and the rewards people watch (implicit rewards of chosen and rejected, their margin).
How those log-probabilities are obtained (one forward over chosen and rejected together, the reference with the
adapters switched off or precomputed) is the step's business; this module is pure tensor math, so each formula can
be checked against an independent implementation on fixed numbers.

    DPO    Rafailov et al. 2023, eq. 7; label smoothing as conservative DPO (Mitchell 2023):
           h = beta * ((pi_c - ref_c) - (pi_r - ref_r));  loss = -(1-eps) log s(h) - eps log s(-h)
    IPO    Azar et al. 2023, eq. 17, with the log-ratios averaged per answer token (what the IPO authors' results
           use, and TRL does):  loss = (h' - 1 / (2 beta))^2,  h' = (pi_c - ref_c)/|y_c| - (pi_r - ref_r)/|y_r|
    SimPO  Meng et al. 2024, eq. 6 (no reference):  loss = -log s(beta/|y_c| pi_c - beta/|y_r| pi_r - gamma)
    ORPO   Hong et al. 2024, eqs. 6-7 (no reference): with p = exp(mean token log-prob) of each answer,
           odds(y) = p / (1 - p);  loss = NLL(y_c) per token - beta * log s(log odds(y_c) - log odds(y_r))
    KTO    Ethayarajh et al. 2024, eq. 8 (unpaired): r = pi - ref, z0 = max(0, KL estimate) held constant;
           desirable: w_d (1 - s(beta (r - z0))), undesirable: w_u (1 - s(beta (z0 - r)))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.formats import IGNORE
from .fused_loss import fused_forward
from .loss import forward_logits, selects_positions

OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PairLosses:
    losses: torch.Tensor  # [P] per pair (or per example, KTO), to be summed and normalised by the caller
    chosen_rewards: torch.Tensor  # [P] detached: the implicit reward of the chosen answer
    rejected_rewards: torch.Tensor  # [P] detached


def dpo(pi_c, pi_r, ref_c, ref_r, *, beta: float, label_smoothing: float = 0.0) -> PairLosses:
    h = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return PairLosses(losses, (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach())


def ipo(pi_c, pi_r, ref_c, ref_r, n_c, n_r, *, beta: float) -> PairLosses:
    h = (pi_c - ref_c) / n_c.clamp(min=1) - (pi_r - ref_r) / n_r.clamp(min=1)
    losses = (h - 1 / (2 * beta)) ** 2
    return PairLosses(losses, (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach())


def simpo(pi_c, pi_r, n_c, n_r, *, beta: float, gamma: float) -> PairLosses:
    reward_c, reward_r = beta * pi_c / n_c.clamp(min=1), beta * pi_r / n_r.clamp(min=1)
    losses = -F.logsigmoid(reward_c - reward_r - gamma)
    return PairLosses(losses, reward_c.detach(), reward_r.detach())


def orpo(pi_c, pi_r, n_c, n_r, *, beta: float) -> PairLosses:
    mean_c, mean_r = pi_c / n_c.clamp(min=1), pi_r / n_r.clamp(min=1)  # mean token log-probs: log p < 0
    # log odds = log p - log(1 - p), with log(1 - p) = log1p(-exp(log p)) computed stably.
    log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
    losses = -mean_c - beta * F.logsigmoid(log_odds)
    return PairLosses(losses, (beta * mean_c).detach(), (beta * mean_r).detach())


def kto(pi, ref, desirable, kl, *, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> PairLosses:
    """Unpaired: one loss per example; `desirable` a bool tensor; `kl` the batch's reference point (detached)."""
    r = pi - ref
    z0 = kl.detach().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    reward = (beta * r).detach()
    return PairLosses(losses, torch.where(desirable, reward, torch.zeros_like(reward)),
                      torch.where(desirable, torch.zeros_like(reward), reward))


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                   fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' log-probabilities, number of target tokens) per sequence of `batch`, from one
    forward whose head runs at target positions only (as the SFT loss does). A sequence is a row, or in packed pair
    rows a segment (`segments`: batching._collate_packed_pairs), numbered as the rows of the unpacked batch.
    `fused` (training.fused_loss): the head and each token's cross-entropy computed together over chunks of target
    rows (fused_loss.py), so the [targets, vocab] logits never exist whole."""
    segments = batch.get("segments")
    batch = {k: v for k, v in batch.items() if k != "segments"}
    labels = batch["labels"]
    if fused and selects_positions(model):
        token_ce, targets = fused_forward(model, batch, per_row=True)
        logits = None
    else:
        logits, targets = forward_logits(model, batch)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    if segments is None:
        B = labels.size(0)
        seq = torch.arange(B, device=labels.device).unsqueeze(1).expand_as(labels)
    else:  # the target at t is token t+1, in t+1's segment (a segment's first token is never a target)
        B = int(segments.max()) + 1
        seq = F.pad(segments[:, 1:], (0, 1), value=-1).to(labels.device)
    if targets.numel() == shifted.numel():  # every position was projected: in order, IGNORE masked below
        rows = seq.reshape(-1).clamp(min=0)
    else:
        rows = seq[shifted != IGNORE]
    keep = targets != IGNORE
    if logits is None:
        token_logps = -token_ce
    else:
        token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))[:, 0]
    token_logps = torch.where(keep, token_logps, torch.zeros_like(token_logps))
    sums = torch.zeros(B, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(B, dtype=torch.long, device=labels.device).index_add(0, rows, keep.long())
    return sums, counts
