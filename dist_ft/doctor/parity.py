"""One batch, two ways: the loss of one global batch split over the world that formed (each rank its micro-batch,
summed in an all-reduce, as a training step does), against the same batch computed whole by one rank.

The model is the recipe's, built and wrapped by the recipe's strategy exactly as training builds it, with its
weights and precision; the batch is the first global batch of the recipe's data. Every rank computes the whole
batch too (a sharded model needs every rank in each forward), so a rank whose numbers differ from the others -
other weights, another library version, a faulty device - is named. The global batch is sized for the world the
job asked for: a world that formed smaller (each process alone) computes only part of it, and its loss differs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..data.batching import collate, count_targets
from ..data.feed import TrainFeed
from ..distributed.precision import precision_plan
from ..distributed.spec import make_strategy
from ..model import ModelBuilder, resolve_attention
from ..train.loss import forward_logits, loss_sum
from ..train.optim import make_optimizer
from .report import Check, Node

# Relative agreement asked of the two ways: summation order alone moves fp32 by ~1e-6; 16-bit compute by ~1e-3.
TOLERANCE = {"fp32": 1e-4}
TOLERANCE_16BIT = 2e-2


def _loss(strategy, rows, pad_id: int, device) -> tuple[float, float]:
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    with torch.no_grad(), strategy.forward_context():
        logits, targets = forward_logits(strategy.model, batch)
        total = loss_sum(logits.float(), targets)
    return float(total), float(count_targets(batch))


def check_parity(topo, recipe, nodes: list[Node], data, tok, model_path, expected: int | None) -> Check:
    r = recipe
    precision = precision_plan(r.distributed.precision)
    attn, _ = resolve_attention(r.model.attn_implementation, precision=r.distributed.precision)
    builder = ModelBuilder(r, model_path, num_labels=data.num_labels, label_names=data.label_names,
                           pad_token_id=data.pad_token_id, dtype=precision.param_dtype, attn_implementation=attn)
    strategy = make_strategy(r.distributed.strategy, topo=topo, precision=precision,
                             activation_checkpointing=r.distributed.activation_checkpointing, recipe=r)
    strategy.setup(builder, make_optimizer(r))
    strategy.train(False)  # no dropout: both ways must see one function
    mb = r.training.micro_batch_size
    asked = expected or topo.world_size
    feed = TrainFeed(r, data, tok, rank=0, world_size=1, log=lambda m: None)
    rows, _ = feed.take(0, mb * asked)
    if not rows:
        return Check("loss parity", "skip", "no training rows to probe")
    pad = data.pad_token_id
    # N ranks: rank i its micro-batch of the global batch, as a step hands them out. A rank past the batch still
    # joins the forward (a sharded model gathers its weights in it) and adds nothing.
    mine = rows[topo.rank * mb:(topo.rank + 1) * mb]
    part = _loss(strategy, mine or rows[:1], pad, topo.device)
    part = part if mine else (0.0, 0.0)
    split = torch.tensor(part, dtype=torch.float64, device=topo.device)
    dist.all_reduce(split)
    covered = min(len(rows), topo.world_size * mb)
    # One rank, the whole batch (in micro-batches, for memory): on every rank.
    whole = [0.0, 0.0]
    for i in range(0, len(rows), mb):
        s, n = _loss(strategy, rows[i:i + mb], pad, topo.device)
        whole[0] += s
        whole[1] += n
    whole_mean = whole[0] / max(whole[1], 1.0)
    split_mean = float(split[0]) / max(float(split[1]), 1.0)
    means = [None] * topo.world_size
    dist.all_gather_object(means, whole_mean)
    tol = TOLERANCE.get(r.distributed.precision, TOLERANCE_16BIT)
    strategy.close()
    details = {"one_rank_loss": whole_mean, "n_rank_loss": split_mean, "per_rank_one_rank_loss": means,
               "batch_rows": len(rows), "rows_covered": covered, "tolerance": tol}

    def off(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12) if math.isfinite(a) and math.isfinite(b) else math.inf

    odd = [i for i, m in enumerate(means) if off(m, means[0]) > tol]
    if odd:
        i = odd[0]
        return Check("loss parity", "fail", f"{nodes[i]} computes the batch's loss as {means[i]:.6g}, rank 0 as "
                     f"{means[0]:.6g}: that rank's model or device differs", culprit=str(nodes[i]), details=details)
    if off(split_mean, whole_mean) > tol:
        why = (f"the world that formed computed {covered} of the batch's {len(rows)} rows (a global batch for "
               f"{asked} ranks): processes were given separate worlds" if covered < len(rows)
               else "the ranks' micro-batches do not add up to the batch")
        return Check("loss parity", "fail", f"one rank's loss on one global batch is {whole_mean:.6g}, the "
                     f"{topo.world_size}-rank loss {split_mean:.6g}: {why}", culprit=f"the world of {nodes[0]}",
                     details=details)
    return Check("loss parity", "pass", f"one global batch ({len(rows)} rows): {topo.world_size}-rank loss "
                 f"{split_mean:.6g} = one rank's {whole_mean:.6g} (relative difference "
                 f"{off(split_mean, whole_mean):.1e}, tolerance {tol:g}); every rank agrees", details=details)
