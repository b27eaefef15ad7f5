"""What the raw loops (raw_loop.py, raw_dpo.py) and the TRL runners (trl_sft.py, trl_dpo.py) of
benchmarks/compare.py share, without dist_ft: reading the exported job, the learning-rate schedule, padding a
micro-batch, the held-out loss (SFT) or DPO loss and preference accuracy (pairs), and each rank's peak memory.

The job folder is written once per invocation by compare.py from dist_ft's own data pipeline:

    job.json          model path, pad id, batch, optimiser and schedule settings, strategy-independent
    train.jsonl       one line per global sample position, in dist_ft's order: input_ids, labels (-100 where no
                      loss), and the record as prompt/completion messages (what TRL is given)
    eval.jsonl        the held-out examples, the same fields
                      (the DPO job: one line per pair, chosen_ids/chosen_labels and rejected_ids/rejected_labels as
                      dist_ft tokenised them, and the record as prompt/chosen/rejected messages, what TRL is given)
    init_adapter.safetensors   (LoRA jobs) the adapter's initial values as dist_ft sets them (name-seeded)

Rank r of step s reads positions s*G + r*B .. s*G + (r+1)*B (G = B x world size), as dist_ft does.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100


def read_job(job_dir: Path) -> dict:
    return json.loads((Path(job_dir) / "job.json").read_text())


def read_examples(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The job's schedule as dist_ft computes it (dist_ft/train/schedule.py, cosine to 0): multiplier of the peak learning
    rate for optimizer step `step`, 0-based. The warm-up reaches step 0 at 1/warmup, not 0 as transformers' does."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest member, labels IGNORE and attention_mask 0 on the padding (as dist_ft's collate)."""
    T = max(len(e["input_ids"]) for e in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss as a hand-written loop would compute it with transformers' `logits_to_keep`: the head runs
    only at positions whose next token is a target, as dist_ft's does (losses.forward_logits)."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    keep = targets != IGNORE
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@torch.no_grad()
def precision_context(precision: str):
    """bf16-mixed: autocast to bfloat16 over the stored weights, as dist_ft's DDP strategy runs it; else nothing
    (fp32, and bf16-true, whose weights are bfloat16 already)."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def heldout_loss(model: torch.nn.Module, examples: list[dict], *, pad_id: int, micro_batch: int,
                 precision: str = "fp32") -> float:
    """Mean loss per target token over `examples`, split over ranks (r, r+W, ...); every rank runs the same number
    of forward passes (a sharded model needs all of them). The same sums and counts as dist_ft's evaluation, and
    the same forward: the head at target positions only (train_loss_sum)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / micro_batch)
    was = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for b in range(n_batches):
        chunk = mine[b * micro_batch:(b + 1) * micro_batch]
        batch = collate(chunk or examples[:1], pad_id)
        with precision_context(precision):
            loss = train_loss_sum(model, batch)
        if chunk:
            total[0] += float(loss)
            total[1] += count_targets(batch)
    model.train(was)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / max(total[1], 1))


# ------------------------------------------------------------------------------------------------ pairs (DPO)

def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs as rows, every chosen sequence then every rejected one (rows i and i + P are a pair),
    padded to the longest of all, as dist_ft's collate and TRL's DataCollatorForPreference do."""
    rows = [{"input_ids": p["chosen_ids"], "labels": p["chosen_labels"]} for p in pairs]
    rows += [{"input_ids": p["rejected_ids"], "labels": p["rejected_labels"]} for p in pairs]
    return collate(rows, pad_id)


def pair_tokens(pairs: list[dict]) -> int:
    """Real (non-padding) tokens of both sides of the pairs."""
    return sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the sum of the answer tokens' log-probabilities, from one forward whose head runs at answer
    positions only (train_loss_sum's forward)."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    keep = targets != IGNORE
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    token = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[keep].unsqueeze(-1))[:, 0]
    rows = keep.nonzero()[:, 0]  # row-major, the order of the kept positions
    return torch.zeros(keep.size(0), dtype=token.dtype).index_add(0, rows, token)


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the DPO loss -log sigmoid(h) and h = beta ((pi_c - ref_c) - (pi_r - ref_r)); rows as collate_pairs."""
    k = policy.size(0) // 2
    h = beta * ((policy[:k] - reference[:k]) - (policy[k:] - reference[k:]))
    return -F.logsigmoid(h), h.detach()


@torch.no_grad()
def heldout_preference(model: torch.nn.Module, pairs: list[dict], *, adapter_off, pad_id: int, micro_batch: int,
                       beta: float) -> dict:
    """The DPO loss of held-out pairs (mean over pairs) with the policy `model` and the reference `model` under
    `adapter_off()` (peft's disable_adapter), the policy's preference accuracy (chosen more likely than rejected) and
    the reward accuracy (h > 0). Split over ranks as dist_ft's evaluation (r, r+W, ...; every rank the same number of
    forwards, a rank that ran out repeating pair 0 uncounted)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = pairs[rank::world]
    n_batches = math.ceil(math.ceil(len(pairs) / world) / micro_batch)
    was = model.training
    model.eval()
    total = torch.zeros(4, dtype=torch.float64)  # loss, policy-preferred, reward-ranked, pairs
    for b in range(n_batches):
        chunk = mine[b * micro_batch:(b + 1) * micro_batch]
        batch = collate_pairs(chunk or pairs[:1], pad_id)
        with adapter_off():
            ref = sequence_logps(model, batch)
        policy = sequence_logps(model, batch)
        losses, h = dpo_losses(policy, ref, beta)
        if chunk:
            k = len(chunk)
            total += torch.tensor([float(losses.sum()), float((policy[:k] > policy[k:]).sum()), float((h > 0).sum()),
                                   k], dtype=torch.float64)
    model.train(was)
    if world > 1:
        dist.all_reduce(total)
    n = max(float(total[3]), 1.0)
    return {"loss": float(total[0]) / n, "accuracy": float(total[1]) / n, "reward_accuracy": float(total[2]) / n,
            "pairs": int(total[3])}


def peak_rss_mb() -> float:
    """This process's peak resident set size (what dist_ft reports on CPU)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gather(value) -> list:
    """Every rank's value, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def finish() -> None:
    """Free what holds gloo threads, then end the process group, before the interpreter exits.

    A process that exits with a live group (or a DDP wrapper the collector frees after the group) can abort in
    gloo's thread destructors ("terminate called without an active exception", SIGABRT) after all its work is
    done: seen in CI at the end of a TRL run. The caller drops its own references (trainer, model) first.
    """
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def step_clock():
    """A transformers TrainerCallback that records each optimizer step's wall time (`.times`), as the raw loop and
    dist_ft time theirs: from the end of one step to the end of the next."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.last = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    return StepClock()
