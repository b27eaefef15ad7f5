"""The floor for framework overhead in preference training: a plain PyTorch DDP + peft loop doing dist_ft's DPO step.

    torchrun --nproc-per-node 2 benchmarks/raw_dpo.py --job-dir JOB --out raw.json
    python benchmarks/raw_dpo.py --job-dir JOB --out raw.json          # one process

JOB is the folder benchmarks/compare.py exports for its DPO job from dist_ft's data pipeline (compare_common.py
says what is in it): the pairs as dist_ft tokenised them, in dist_ft's order per rank, the LoRA adapter's initial
values, the optimiser settings and beta. The loop makes the calls dist_ft's DDP step makes for `objective: dpo`
with `reference: adapter_off` and nothing else: `get_peft_model` + DistributedDataParallel; per micro-batch one
all-reduce of the pair count, the reference's answer log-probs from the same model under peft's
`disable_adapter()` and `no_grad`, then one forward of chosen and rejected rows together (the head at answer
positions only), the DPO loss summed over the pairs and scaled by world size / global pairs (DDP averages), backward,
the global norm clipped, fused AdamW, the job's warm-up and cosine. Evaluations as dist_ft's: the held-out DPO loss
and preference accuracy before training and after it.
It writes per-step time, pairs, loss, useful (non-padding) tokens, reward accuracy and gradient norm, peak RSS per
rank and the held-out figures to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_common import (collate_pairs, dpo_losses, finish, gather, heldout_preference, lr_factor,  # noqa: E402
                            pair_tokens, peak_rss_mb, read_examples, read_job, sequence_logps)
from raw_loop import all_reduce, build_model, optimizer_for  # noqa: E402


def reference_logps(model, module, batch) -> torch.Tensor:
    """The reference policy: the same model with its adapters switched off, without gradients."""
    with torch.no_grad(), module.disable_adapter():
        return sequence_logps(model, batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="default: the job's")
    a = p.parse_args(argv)
    if "RANK" not in os.environ:  # one process started by hand
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    job = {**read_job(a.job_dir), "dir": str(a.job_dir)}
    steps, B, beta = a.steps or job["steps"], job["micro_batch"], job["beta"]
    train = read_examples(a.job_dir / "train.jsonl")
    heldout = read_examples(a.job_dir / "eval.jsonl")
    assert len(train) >= steps * B * world, f"{len(train)} exported pairs are too few for {steps} steps"
    torch.manual_seed(job["seed"])

    from torch.nn.parallel import DistributedDataParallel
    module = build_model(job, "ddp")
    model = DistributedDataParallel(module)
    params = [q for q in module.parameters() if q.requires_grad]
    optimizer = optimizer_for(job, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, job["warmup_steps"], job["steps"]))
    model.train()
    evaluate = functools.partial(heldout_preference, model, heldout, adapter_off=module.disable_adapter,
                                 pad_id=job["pad_id"], micro_batch=B, beta=beta)
    before = evaluate()
    records, G = [], B * world
    for step in range(steps):
        t0 = time.perf_counter()
        rows = train[step * G + rank * B: step * G + (rank + 1) * B]
        batch = collate_pairs(rows, job["pad_id"])
        (pairs,) = all_reduce([len(rows)])
        ref = reference_logps(model, module, batch)
        losses, h = dpo_losses(sequence_logps(model, batch), ref, beta)
        (losses.sum() * (world / max(pairs, 1.0))).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, job["max_grad_norm"], foreach=True))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        dt = time.perf_counter() - t0
        loss, ranked, useful, tokens = all_reduce([float(losses.detach().sum()), float((h > 0).sum()),
                                                   pair_tokens(rows), batch["input_ids"].numel()])
        records.append({"step": step + 1, "loss": loss / max(pairs, 1.0), "step_time": dt, "pairs": int(pairs),
                        "useful_tokens": int(useful), "tokens": int(tokens), "reward_accuracy": ranked / max(pairs, 1),
                        "grad_norm": norm, "lr": lr})
        if rank == 0:
            print(f"[raw_dpo] step {step + 1}: loss {records[-1]['loss']:.4f}, {dt:.2f} s, {pairs / dt:.2f} pairs/s",
                  flush=True)
    after = evaluate()
    peaks = gather(round(peak_rss_mb(), 1))
    if rank == 0:
        a.out.write_text(json.dumps({"runner": "raw", "world_size": world, "threads": torch.get_num_threads(),
                                     "steps": records, "heldout": after, "heldout_before": before, "peak_mb": peaks},
                                    indent=1))
        print(f"[raw_dpo] held-out DPO loss {before['loss']:.4f} -> {after['loss']:.4f}, preference accuracy "
              f"{before['accuracy']:.3f} -> {after['accuracy']:.3f}; peak MiB per rank {peaks}", flush=True)
    del evaluate, model, module, optimizer
    finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
