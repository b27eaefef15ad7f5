"""TRL's SFTTrainer on a job exported by benchmarks/compare.py, configured as a user would for the same work.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        benchmarks/trl_sft.py --job-dir JOB --out trl.json --output-dir /tmp/trl --packing off

(On CPU, `--cpu` alone starts one process and `--multi_gpu` without ACCELERATE_USE_CPU starts independent
trainings; this script refuses to run unless the process group really has WORLD_SIZE ranks.)

The data are the job's records as conversational prompt/completion pairs (system + user prompt, assistant
answer): TRL renders and tokenises them itself with the model's chat template and trains on the completion only,
as dist_ft's instruction format does. Everything TRL defaults differently from the job is set explicitly: fp32
(TRL defaults to bf16), no gradient checkpointing (TRL's default is on), the job's learning rate, warm-up, cosine
schedule, clipping and AdamW settings, max_length, micro-batch; the optimizer is transformers' default, fused
AdamW, as dist_ft's. `train_sampling_strategy="sequential"` makes the ranks read the exported order exactly as
dist_ft does (accelerate gives rank r batches r, r+W, ...). The LoRA
adapter is created with peft and set to dist_ft's initial values, then handed to SFTTrainer;
`ddp_find_unused_parameters=False` because PyTorch warns that none are unused (what a user would then set).
The loss is TRL's default, which is dist_ft's: summed over target tokens and divided by the target count of the
whole step across ranks (`average_tokens_across_devices`, on by default), not a mean per micro-batch.

The one setting a user cannot make TRL agree on is the warm-up: transformers' starts step 1 at learning rate 0
(factor step/W), dist_ft's at 1/W (factor (step+1)/W, so no step is wasted). `--schedule job` (the default) hands
the Trainer dist_ft's schedule (compare_common.lr_factor) so that the two do the same work; `--schedule
transformers` keeps transformers' cosine with warm-up, what a TRL user gets from the same numbers.

Measured through a callback (and the batches seen by `training_step`): seconds between step ends, non-padding
tokens per step, the training loss, learning rate and gradient norm of every step (logging_steps=1: TRL's logged
loss is the mean over ranks of loss x world / global targets, i.e. the step's mean loss per target token, as
dist_ft's), peak RSS per rank, the held-out loss at the end (compare_common.heldout_loss, as the raw loop), and how
many of the first examples TRL tokenised exactly as dist_ft did.
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
from compare_common import (finish, gather, heldout_loss, lr_factor, peak_rss_mb, read_examples,  # noqa: E402
                            read_job, step_clock)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job-dir", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--packing", choices=["on", "off"], default="off")
    p.add_argument("--precision", choices=["fp32", "bf16-mixed"], default="fp32",
                   help="bf16-mixed: TrainingArguments(bf16=True), autocast over fp32 weights")
    p.add_argument("--steps", type=int, default=None, help="default: the job's")
    p.add_argument("--schedule", choices=["job", "transformers"], default="job",
                   help="job: dist_ft's warm-up and cosine; transformers: TRL's own (step 1 at learning rate 0)")
    a = p.parse_args(argv)

    import peft
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    job = read_job(a.job_dir)
    steps = a.steps or job["steps"]
    packing = a.packing == "on"
    train = read_examples(a.job_dir / "train.jsonl")
    heldout = read_examples(a.job_dir / "eval.jsonl")
    if not packing:
        train = train[: steps * job["micro_batch"] * int(os.environ.get("WORLD_SIZE", "1"))]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])

    tok = AutoTokenizer.from_pretrained(job["model_path"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=torch.float32, attn_implementation="sdpa",
                                                 use_cache=False)
    lo = job["lora"]
    model = peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=lo["r"],
                                                       lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                                                       target_modules=lo["target_modules"]))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in load_file(a.job_dir / "init_adapter.safetensors").items():
            params[n].copy_(v)

    args = SFTConfig(
        output_dir=str(a.output_dir), max_steps=steps, per_device_train_batch_size=job["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=job["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=job["warmup_steps"], weight_decay=job["weight_decay"], adam_beta1=job["betas"][0],
        adam_beta2=job["betas"][1], adam_epsilon=job["eps"], max_grad_norm=job["max_grad_norm"],
        bf16=a.precision == "bf16-mixed", fp16=False, gradient_checkpointing=False, max_length=job["max_length"], packing=packing,
        completion_only_loss=True, train_sampling_strategy="sequential", seed=job["seed"], use_cpu=True,
        ddp_backend="gloo", ddp_find_unused_parameters=False, dataloader_num_workers=0, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)

    class Timed(SFTTrainer):
        """Counts each batch's real tokens on this rank (summed over ranks once, at the end: no extra collective)."""
        useful: list[int] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.useful.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, num_items_in_batch)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if a.schedule == "job" and self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lambda s: lr_factor(s, job["warmup_steps"], job["steps"]))
            return super().create_scheduler(num_training_steps, optimizer)

    clock = step_clock()
    trainer = Timed(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != int(os.environ.get("WORLD_SIZE", "1")) or trainer.args.world_size != world:
        raise SystemExit(f"the launcher said WORLD_SIZE={os.environ.get('WORLD_SIZE')} but the process group has "
                         f"{world} rank(s) and TRL sees {trainer.args.world_size}: a misconfigured launch")
    same = None
    if not packing:  # did TRL tokenise the records exactly as dist_ft did (ids and loss mask)?
        same = 0
        for ours, theirs in zip(train[:200], trainer.train_dataset):
            same += int(theirs["input_ids"] == ours["input_ids"] and theirs["labels"] == ours["labels"])
        same = {"identical": same, "checked": min(200, len(train))}
    trainer.train()
    loss = heldout_loss(trainer.model, heldout, pad_id=job["pad_id"], micro_batch=job["micro_batch"],
                        precision=a.precision)
    useful = [sum(x) for x in zip(*gather(Timed.useful))]
    peaks = gather(round(peak_rss_mb(), 1))
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        records = [{"step": i + 1, "step_time": t, "useful_tokens": u, "loss": logged[i + 1]["loss"],
                    "lr": logged[i + 1]["learning_rate"], "grad_norm": logged[i + 1].get("grad_norm")}
                   for i, (t, u) in enumerate(zip(clock.times, useful))]
        a.out.write_text(json.dumps({"runner": "trl", "packing": packing, "precision": a.precision, "schedule": a.schedule, "world_size": world,
                                     "threads": torch.get_num_threads(), "steps": records, "heldout_loss": loss,
                                     "peak_mb": peaks, "tokenisation_matches": same}, indent=1))
        print(f"[trl] held-out loss {loss:.4f}; peak MiB per rank {peaks}; tokenisation {same}", flush=True)
    del trainer, model
    finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
