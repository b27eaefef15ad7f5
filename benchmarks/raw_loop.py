"""The floor for framework overhead: a plain PyTorch training loop doing exactly dist_ft's work for one job.

    torchrun --nproc-per-node 2 benchmarks/raw_loop.py --job-dir JOB --strategy ddp --out raw.json
    python benchmarks/raw_loop.py --job-dir JOB --strategy ddp --out raw.json          # one process

JOB is the folder benchmarks/compare.py exports from dist_ft's data pipeline (see compare_common.py): the same
tokenised examples in the same order per rank, the LoRA adapter's initial values, and the optimiser settings. The
loop makes the same calls dist_ft's strategies make and nothing else: `get_peft_model` + DistributedDataParallel
(ddp); `fully_shard` per decoder layer, the untied embeddings, then the root (fsdp); `deepspeed.initialize` with
a stage-3 config (zero3). Same step math: the loss summed over target tokens and divided by the global target count
(one all-reduce), the head run only at target positions, gradients averaged by the backend, the global norm
clipped, AdamW, linear warm-up then cosine. Same evaluations: the held-out loss before training (dist_ft's baseline
for its deltas) and after it.
It writes per-step time, loss and useful (non-padding) tokens, peak RSS per rank and the held-out losses to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_common import (collate, count_targets, gather, heldout_loss, lr_factor, peak_rss_mb,  # noqa: E402
                            precision_context, read_examples, read_job, train_loss_sum)


def all_reduce(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def build_model(job: dict, strategy: str, precision: str = "fp32"):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=dtype, attn_implementation="sdpa",
                                                 use_cache=False)
    if job["method"] == "lora":
        import peft
        from safetensors.torch import load_file
        lo = job["lora"]
        model = peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=lo["r"],
                                                           lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                                                           target_modules=lo["target_modules"]))
        init = load_file(Path(job["dir"]) / "init_adapter.safetensors")
        params = dict(model.named_parameters())
        assert set(init) == {n for n, p in params.items() if p.requires_grad}, "adapter names differ from the export"
        with torch.no_grad():
            for n, v in init.items():
                params[n].copy_(v)
        if precision == "bf16-mixed":
            # What a careful hand-written loop does under autocast (and dist_ft's DDP strategy): a frozen Linear
            # weight is only read as autocast's bf16 copy, so store that copy once; the tied embedding stays fp32.
            tied = model.get_input_embeddings().weight
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and m.weight is not tied:
                    m.weight.data = m.weight.data.to(torch.bfloat16)
    else:
        model.requires_grad_(True)
    return model


def optimizer_for(job: dict, params) -> torch.optim.Optimizer:
    params = list(params)
    groups = [g for g in ({"params": [p for p in params if p.ndim >= 2], "weight_decay": job["weight_decay"]},
                          {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}) if g["params"]]
    # Fused, as dist_ft's trainer builds it (one pass per tensor, no parameter-sized temporaries).
    return torch.optim.AdamW(groups, lr=job["learning_rate"], betas=tuple(job["betas"]), eps=job["eps"], fused=True)


def zero3_config(job: dict, world: int, hidden: int) -> dict:
    # The values dist_ft's zero3 template resolves to, so the two differ in framework code, not in tuning.
    h = hidden
    return {"train_micro_batch_size_per_gpu": job["micro_batch"], "gradient_accumulation_steps": 1,
            "train_batch_size": job["micro_batch"] * world, "gradient_clipping": job["max_grad_norm"],
            "zero_optimization": {"stage": 3, "contiguous_gradients": True, "overlap_comm": False,
                                  "reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
                                  "stage3_param_persistence_threshold": 10 * h,
                                  "stage3_max_live_parameters": 12 * h * h, "stage3_max_reuse_distance": 12 * h * h},
            "steps_per_print": 10**9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job-dir", required=True, type=Path)
    p.add_argument("--strategy", required=True, choices=["ddp", "fsdp", "zero3"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="default: the job's")
    p.add_argument("--precision", choices=["fp32", "bf16-mixed", "bf16-true"], default="fp32")
    a = p.parse_args(argv)
    if a.precision != "fp32" and a.strategy != "ddp":
        raise SystemExit(f"--precision {a.precision}: the raw loop runs 16-bit precisions under ddp only")
    if "RANK" not in os.environ:  # one process started by hand
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    job = {**read_job(a.job_dir), "dir": str(a.job_dir)}
    steps = a.steps or job["steps"]
    B = job["micro_batch"]
    train = read_examples(a.job_dir / "train.jsonl")
    heldout = read_examples(a.job_dir / "eval.jsonl")
    assert len(train) >= steps * B * world, f"{len(train)} exported examples are too few for {steps} steps"
    torch.manual_seed(job["seed"])

    engine = None
    if a.strategy == "zero3":
        import deepspeed
        from transformers import AutoConfig
        from transformers.integrations import HfDeepSpeedConfig
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        cfg = zero3_config(job, world, AutoConfig.from_pretrained(job["model_path"]).hidden_size)
        keep_alive = HfDeepSpeedConfig(cfg)  # from_pretrained now builds under zero.Init: loaded partitioned  # noqa: F841
        module = build_model(job, a.strategy)
        params = [q for q in module.parameters() if q.requires_grad]
        engine, ds_opt, _, _ = deepspeed.initialize(model=module, optimizer=optimizer_for(job, params),
                                                    config=cfg, dist_init_required=False)
        model, optimizer = engine, getattr(ds_opt, "optimizer", ds_opt)
    else:
        module = build_model(job, a.strategy, a.precision)
        if a.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(module)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in module.model.layers:
                fully_shard(layer)
            inp, outp = module.get_input_embeddings(), module.get_output_embeddings()
            if inp.weight is not outp.weight:
                fully_shard(inp)
                fully_shard(outp)
            fully_shard(module)
            model = module
        params = [q for q in module.parameters() if q.requires_grad]
        optimizer = optimizer_for(job, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, job["warmup_steps"], job["steps"]))
    model.train()

    loss_before = heldout_loss(model, heldout, pad_id=job["pad_id"], micro_batch=B, precision=a.precision)
    records = []
    G = B * world
    for step in range(steps):
        t0 = time.perf_counter()
        rows = train[step * G + rank * B: step * G + (rank + 1) * B]
        batch = collate(rows, job["pad_id"])
        useful = sum(len(r["input_ids"]) for r in rows)
        (targets,) = all_reduce([count_targets(batch)])
        with precision_context(a.precision):
            total = train_loss_sum(model, batch)
        scaled = total * (world / max(targets, 1.0))
        if engine is not None:
            engine.backward(scaled)
            engine.step()  # clips (gradient_clipping), steps, zeroes the gradients
        else:
            scaled.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, job["max_grad_norm"], foreach=True)
            float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        dt = time.perf_counter() - t0
        loss, useful_all, tokens = all_reduce([float(total.detach()), useful, batch["input_ids"].numel()])
        records.append({"step": step + 1, "loss": loss / max(targets, 1.0), "step_time": dt,
                        "useful_tokens": int(useful_all), "tokens": int(tokens)})
        if rank == 0:
            print(f"[raw] step {step + 1}: loss {records[-1]['loss']:.4f}, {dt:.2f} s, "
                  f"{useful_all / dt:.0f} useful tokens/s", flush=True)
    loss = heldout_loss(model, heldout, pad_id=job["pad_id"], micro_batch=B, precision=a.precision)
    peaks = gather(round(peak_rss_mb(), 1))
    if rank == 0:
        a.out.write_text(json.dumps({"runner": "raw", "strategy": a.strategy, "precision": a.precision,
                                     "world_size": world,
                                     "threads": torch.get_num_threads(), "steps": records, "heldout_loss": loss,
                                     "heldout_loss_before": loss_before,
                                     "peak_mb": peaks}, indent=1))
        print(f"[raw] held-out loss {loss_before:.4f} -> {loss:.4f}; peak MiB per rank {peaks}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
