"""The bundled MiniLM classifier, dist_ft against Hugging Face `Trainer` on the same split (issue 19).

    .venv/bin/python benchmarks/minilm_vs_trainer.py                  # 60 steps of 32, lr 1e-4; dist_ft on 1 process
    .venv/bin/python benchmarks/minilm_vs_trainer.py --nproc 2        # dist_ft on 2 processes (16 per rank)

Six WordNet lexicographer categories (builtin:wordnet-categories: a synset's definition -> its category), 2,000
training and 400 held-out definitions drawn once with a fixed seed and written to JSONL, which both trainers read.
Both start from the pretrained encoder of `minilm-l6-v2` with a new 6-way head, tokenize with truncation at 64
tokens, and train 60 steps of 32 samples at lr 1e-4 with Trainer's defaults otherwise: linear decay without
warm-up, AdamW (fused; betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping at 1.0, fp32, dropout 0.1
as the model's config has it. `Trainer` gets what a user would write: `AutoModelForSequenceClassification.
from_pretrained(folder, num_labels=6)`, the tokenizer, `DataCollatorWithPadding`, its own random sampler. dist_ft
runs the equivalent recipe through `dist-ft train` (or `dist-ft launch`). Neither sees the other's sample order,
head initialisation or dropout masks, so the accuracies agree to within sampling noise, not bit for bit (the
step-by-step equality is tests/test_reference_trainer.py, on a dropout-free model).

Results: benchmarks/results/minilm-vs-trainer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CATEGORIES = ["noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.person", "noun.plant"]
N_TRAIN, N_EVAL, MAX_LENGTH, SEED = 2000, 400, 64, 0


def write_split(workdir: Path) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl: a seeded draw of the six categories' definitions, written once."""
    train, held_out = workdir / "train.jsonl", workdir / "eval.jsonl"
    if train.is_file() and held_out.is_file():
        return train, held_out
    from dist_ft.data.sources import resolve_source
    records = [r for r in resolve_source("builtin:wordnet-categories").load() if r["label"] in CATEGORIES]
    random.Random(SEED).shuffle(records)
    for path, part in ((train, records[:N_TRAIN]), (held_out, records[N_TRAIN:N_TRAIN + N_EVAL])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return train, held_out


def run_dist_ft(workdir: Path, train: Path, held_out: Path, *, steps: int, batch: int, lr: float, nproc: int) -> dict:
    if batch % nproc:
        raise SystemExit(f"--batch {batch} is not a multiple of --nproc {nproc}")
    out = workdir / f"dist_ft-{nproc}proc"
    recipe = {
        "output_dir": str(out), "overwrite_output_dir": True, "seed": SEED,
        "model": {"path": "minilm-l6-v2", "task": "sequence_classification"},
        "data": {"train": str(train), "eval": str(held_out), "format": "classification", "max_length": MAX_LENGTH},
        "method": {"kind": "full"},
        "training": {"max_steps": steps, "micro_batch_size": batch // nproc, "learning_rate": lr,
                     "lr_scheduler": "linear", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "eval": {"metrics": ["accuracy", "f1"]},
        "distributed": {"strategy": "ddp", "precision": "fp32"},
    }
    path = workdir / "dist_ft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = ["train", str(path)] if nproc == 1 else ["launch", str(path), "--nproc-per-node", str(nproc)]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dist_ft", *cmd], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"dist-ft {cmd[0]} failed (exit {res.returncode})")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    weights = next((line for line in res.stdout.splitlines() if line.startswith("[weights]")), "")
    return {"trainer": f"dist_ft ({nproc} process{'es' if nproc > 1 else ''})", "wall_s": wall,
            "eval_loss_before": evals[0]["eval_loss"], "eval_accuracy_before": evals[0]["eval_accuracy"],
            "eval_loss": evals[-1]["eval_loss"], "eval_accuracy": evals[-1]["eval_accuracy"],
            "eval_f1": evals[-1]["eval_f1"], "weights": weights}


def run_trainer(workdir: Path, train: Path, held_out: Path, *, steps: int, batch: int, lr: float) -> dict:
    """Hugging Face Trainer as a user would write it for this split."""
    import datasets
    import numpy as np
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from dist_ft.assets import resolve_model_path

    folder = resolve_model_path("minilm-l6-v2")
    labels = sorted(CATEGORIES)
    tok = AutoTokenizer.from_pretrained(folder)

    def load(path: Path) -> datasets.Dataset:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        enc = tok([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)
        return datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                           "labels": [labels.index(r["label"]) for r in rows]})

    set_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    args = TrainingArguments(output_dir=str(workdir / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
                             per_device_eval_batch_size=batch, learning_rate=lr, lr_scheduler_type="linear",
                             warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=10,
                             save_strategy="no", eval_strategy="no", report_to="none", seed=SEED, use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)

    def accuracy(pred) -> dict:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=load(train), eval_dataset=load(held_out),
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    t0 = time.perf_counter()
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    return {"trainer": "HF Trainer (1 process)", "wall_s": time.perf_counter() - t0,
            "eval_loss_before": before["eval_loss"], "eval_accuracy_before": before["eval_accuracy"],
            "eval_loss": after["eval_loss"], "eval_accuracy": after["eval_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32, help="global batch (dist_ft: split over --nproc ranks)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--nproc", type=int, default=1, help="dist_ft processes")
    p.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "dist_ft_minilm_vs_trainer"))
    a = p.parse_args(argv)
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train, held_out = write_split(workdir)
    print(f"[bench] split: {train} ({N_TRAIN}), {held_out} ({N_EVAL}); {', '.join(CATEGORIES)}", flush=True)
    rows = [run_dist_ft(workdir, train, held_out, steps=a.steps, batch=a.batch, lr=a.lr, nproc=a.nproc)]
    print(f"[bench] {rows[-1]}", flush=True)
    rows.append(run_trainer(workdir, train, held_out, steps=a.steps, batch=a.batch, lr=a.lr))
    print(f"[bench] {rows[-1]}", flush=True)
    gap = rows[0]["eval_accuracy"] - rows[1]["eval_accuracy"]
    lines = ["| trainer | eval accuracy before -> after | eval loss before -> after | wall s |", "|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {r['eval_accuracy_before']:.4f} -> {r['eval_accuracy']:.4f} | "
                     f"{r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f} | {r['wall_s']:.0f} |")
    md = "\n".join(lines)
    head = (f"MiniLM-L6 (`minilm-l6-v2`, pretrained encoder + new head), {len(CATEGORIES)} WordNet categories, "
            f"{N_TRAIN} train / {N_EVAL} held-out definitions (one JSONL split for both), {a.steps} steps x "
            f"{a.batch} samples, lr {a.lr:g} linear decay, no warm-up, fp32, max length {MAX_LENGTH}.\n"
            f"dist_ft - Trainer accuracy: {gap:+.4f} (target: within +-0.02). {rows[0]['weights']}\n"
            "Wall times are of the whole run (load, evaluations, saving) on whatever else the machine was running: "
            "not a speed comparison.")
    print(f"\n{head}\n\n{md}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    (RESULTS / "minilm-vs-trainer.json").write_text(json.dumps(
        {"steps": a.steps, "batch": a.batch, "lr": a.lr, "nproc": a.nproc, "categories": CATEGORIES,
         "n_train": N_TRAIN, "n_eval": N_EVAL, "accuracy_gap": gap, "rows": rows}, indent=2))
    (RESULTS / "minilm-vs-trainer.md").write_text(
        f"# MiniLM: dist_ft vs Hugging Face Trainer\n\nCommand: `python benchmarks/minilm_vs_trainer.py "
        f"{args_text}`\n\n{head}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
