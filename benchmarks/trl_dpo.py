"""TRL's DPOTrainer on the DPO job exported by benchmarks/compare.py, configured as a user would for the same work.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        benchmarks/trl_dpo.py --job-dir JOB --out trl.json --output-dir /tmp/trl-dpo

(The launch is trl_sft.py's: on CPU only this combination gives a process group of WORLD_SIZE ranks, checked here.)

The data are the job's pairs as conversational records (system + user prompt; the chosen and the rejected answer as
assistant turns): DPOTrainer renders and tokenises them itself with the model's chat template, and how many it
tokenised exactly as dist_ft did (ids and answer mask, both sides) is recorded. The model is the job's, fp32, sdpa;
DPOTrainer is given a `peft_config` (the job's LoRA), so its reference is the model with the adapter switched off,
as dist_ft's `reference: adapter_off`; the adapter is then set to dist_ft's initial values. Everything TRL defaults
differently from the job is set explicitly: fp32, no gradient checkpointing, the job's learning rate, beta, clipping
and AdamW settings, max_length, micro-batch (pairs per rank), `loss_type=["sigmoid"]` (DPO), no precomputed
reference. `train_sampling_strategy="sequential"` makes the ranks read the exported order as dist_ft does, and the
Trainer is handed dist_ft's warm-up and cosine (compare_common.lr_factor; trl_sft.py says why). The loss is TRL's:
the mean over the rank's pairs, which DDP averages over equal ranks into dist_ft's mean over the global batch.

Measured through a callback (and the batches seen by `training_step`): seconds between step ends, pairs and
non-padding tokens per step, the logged training loss (the mean over ranks, logging_steps=1), reward accuracy,
learning rate and gradient norm of every step, peak RSS per rank, and after training the held-out DPO loss,
preference accuracy and reward accuracy (compare_common.heldout_preference, as the raw loop).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_common import (IGNORE, finish, gather, heldout_preference, lr_factor, peak_rss_mb, step_clock,  # noqa: E402
                            read_examples, read_job)


def same_tokens(ours: list[dict], theirs, max_length: int) -> dict:
    """How many of TRL's tokenised pairs are dist_ft's: the same ids and answer mask on both sides."""
    same = 0
    for o, t in zip(ours, theirs):
        ok = True
        for side in ("chosen", "rejected"):
            ids = (t["prompt_ids"] + t[f"{side}_ids"])[:max_length]
            labels = ([IGNORE] * len(t["prompt_ids"]) + t[f"{side}_ids"])[:max_length]
            ok &= ids == o[f"{side}_ids"] and labels == o[f"{side}_labels"]
        same += int(ok)
    return {"identical": same, "checked": min(len(ours), len(theirs))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--steps", type=int, default=None, help="default: the job's")
    a = p.parse_args(argv)

    import peft
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    job = read_job(a.job_dir)
    steps, B = a.steps or job["steps"], job["micro_batch"]
    train = read_examples(a.job_dir / "train.jsonl")[: steps * B * int(os.environ.get("WORLD_SIZE", "1"))]
    heldout = read_examples(a.job_dir / "eval.jsonl")
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train])

    tok = AutoTokenizer.from_pretrained(job["model_path"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32, attn_implementation="sdpa",
                                                 use_cache=False)
    lo = job["lora"]
    lora = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=lo["r"], lora_alpha=lo["alpha"],
                           lora_dropout=lo["dropout"], target_modules=lo["target_modules"])
    args = DPOConfig(
        output_dir=str(a.output_dir), max_steps=steps, per_device_train_batch_size=B,
        gradient_accumulation_steps=1, learning_rate=job["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=job["warmup_steps"], weight_decay=job["weight_decay"], adam_beta1=job["betas"][0],
        adam_beta2=job["betas"][1], adam_epsilon=job["eps"], max_grad_norm=job["max_grad_norm"],
        bf16=False, fp16=False, gradient_checkpointing=False, max_length=job["max_length"], beta=job["beta"],
        loss_type=["sigmoid"], label_smoothing=job["label_smoothing"], precompute_ref_log_probs=False,
        train_sampling_strategy="sequential", seed=job["seed"], use_cpu=True, ddp_backend="gloo",
        ddp_find_unused_parameters=False, dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True)

    class Timed(DPOTrainer):
        """Counts each batch's pairs and real tokens on this rank (summed over ranks once, at the end)."""
        useful: list[int] = []
        pairs: list[int] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.useful.append(int(inputs["attention_mask"].sum()))
            self.pairs.append(int(inputs["input_ids"].size(0)) // 2)
            return super().training_step(model, inputs, num_items_in_batch)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda s: lr_factor(s, job["warmup_steps"], job["steps"]))
            return super().create_scheduler(num_training_steps, optimizer)

    clock = step_clock()
    trainer = Timed(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora,
                    callbacks=[clock])
    params = dict(trainer.model.named_parameters())
    init = load_file(a.job_dir / "init_adapter.safetensors")
    assert set(init) == {n for n, q in params.items() if q.requires_grad}, "adapter names differ from the export"
    with torch.no_grad():
        for n, v in init.items():
            params[n].copy_(v)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != int(os.environ.get("WORLD_SIZE", "1")) or trainer.args.world_size != world:
        raise SystemExit(f"the launcher said WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the process group has "
                         f"{world} rank(s) and TRL sees {trainer.args.world_size}: a misconfigured launch")
    same = same_tokens(train, trainer.train_dataset, job["max_length"])
    trainer.train()
    held = heldout_preference(trainer.model, heldout, adapter_off=trainer.model.disable_adapter, pad_id=job["pad_id"],
                              micro_batch=B, beta=job["beta"])
    useful = [sum(x) for x in zip(*gather(Timed.useful))]
    pairs = [sum(x) for x in zip(*gather(Timed.pairs))]
    peaks = gather(round(peak_rss_mb(), 1))
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        records = [{"step": i + 1, "step_time": t, "pairs": n, "useful_tokens": u, "loss": logged[i + 1]["loss"],
                    "reward_accuracy": logged[i + 1].get("rewards/accuracies"), "lr": logged[i + 1]["learning_rate"],
                    "grad_norm": logged[i + 1].get("grad_norm")}
                   for i, (t, n, u) in enumerate(zip(clock.times, pairs, useful))]
        a.out.write_text(json.dumps({"runner": "trl", "world_size": world, "threads": torch.get_num_threads(),
                                     "steps": records, "heldout": held, "peak_mb": peaks,
                                     "tokenisation_matches": same}, indent=1))
        print(f"[trl_dpo] held-out DPO loss {held['loss']:.4f}, preference accuracy {held['accuracy']:.3f}; peak "
              f"MiB per rank {peaks}; tokenisation {same}", flush=True)
    del trainer, model, params
    finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
