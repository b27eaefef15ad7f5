"""dist_ft against Hugging Face `Trainer` on the same job: per-step training losses and the held-out evaluation
agree, so what dist_ft trains is what the reference trainer would (issue 19: a classifier trained from a random
encoder went unnoticed because nothing compared the two).

The job: a tiny random BERT (dropout 0, so no random stream can differ) learns a 3-class text task in 24 steps
of 8 (past the end of the 120 records: the second epoch's order is checked too). dist_ft trains
it through the real CLI (`dist-ft train`, one process, method full, fp32). `Trainer` is handed the very model
dist_ft starts from (ModelBuilder(...).build(), as the trainer calls it: the checkpoint's encoder plus the
classification head with dist_ft's name-seeded values), the samples in dist_ft's order through a sequential
sampler, the tokenizer's own ids (checked equal to dist_ft's), a constant learning rate without warm-up, the same
AdamW (fused, betas, eps, no weight decay), clipping and micro-batch.

dist_ft's order, rebuilt here independently of its code: the training records are shuffled with
`random.Random(seed)` (before a hold-out split; here data.eval is its own file, so nothing is held out), then
global sample position k reads row `default_rng([seed, epoch]).permutation(n)[k % n]` (data/batching.py).

    .venv/bin/python -m pytest tests/test_reference_trainer.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli, write_jsonl, write_recipe
from test_pretrained_weights import _tiny_bert

SEED = 0
STEPS = 24
BATCH = 8
LR = 5e-3
MAX_LENGTH = 24
LOSS_RTOL = 1e-4  # measured: <= 3e-7 over the 24 steps (fused AdamW on both sides; summation orders differ)

_WORDS = {
    "animal": "cat dog horse bird fish whale snake lion tiger mouse owl wolf".split(),
    "food": "bread cheese apple rice soup pasta honey sugar salt butter milk cake".split(),
    "tool": "hammer saw drill wrench knife needle spade chisel file rake axe lever".split(),
}
_FILLER = "the a of with and in on some very small large old new green".split()


def _records(n: int, rng: random.Random) -> list[dict]:
    """Short texts whose words hint at their class; lengths vary (padding) and some pass MAX_LENGTH (truncation)."""
    out = []
    for _ in range(n):
        label = rng.choice(sorted(_WORDS))
        words = [rng.choice(_WORDS[label] if rng.random() < 0.6 else _FILLER) for _ in range(rng.randint(2, 16))]
        out.append({"text": " ".join(words), "label": label})
    return out


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    model_dir = _tiny_bert(root / "tiny-bert")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    rng = random.Random(1)
    train, held_out = _records(120, rng), _records(40, rng)
    recipe = {
        "output_dir": str(root / "dist_ft"), "seed": SEED,
        "model": {"path": str(model_dir), "task": "sequence_classification", "attn_implementation": "eager"},
        "data": {"train": str(write_jsonl(root / "train.jsonl", train)),
                 "eval": str(write_jsonl(root / "eval.jsonl", held_out)),
                 "format": "classification", "max_length": MAX_LENGTH, "shuffle": True},
        "method": {"kind": "full"},
        "training": {"max_steps": STEPS, "micro_batch_size": BATCH, "learning_rate": LR, "lr_scheduler": "constant",
                     "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "eval": {"metrics": ["accuracy"]},
        "distributed": {"strategy": "ddp", "precision": "fp32", "threads_per_process": 1},
    }
    recipe_file = write_recipe(root / "recipe.yaml", recipe)
    env = {"DIST_FT_CACHE": str(root / "cache")}
    res = run_cli("train", str(recipe_file), env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    steps, evals = read_metrics(root / "dist_ft")
    return {"root": root, "model_dir": model_dir, "recipe_file": recipe_file, "train": train, "eval": held_out,
            "steps": steps, "evals": evals, "stdout": res.stdout, "env": env}


def _dist_ft_order(records: list[dict], n_samples: int) -> list[dict]:
    """The records at global sample positions 0 .. n_samples-1, as dist_ft reads them (see the module docstring)."""
    table = list(records)
    random.Random(SEED).shuffle(table)
    out = []
    for k in range(n_samples):
        epoch, i = divmod(k, len(table))
        out.append(table[int(np.random.default_rng([SEED, epoch]).permutation(len(table))[i])])
    return out


def _initial_model(job):
    """dist_ft's starting model, built as its trainer builds it (whole, on CPU, fp32)."""
    from dist_ft.config import load_recipe
    from dist_ft.model import ModelBuilder

    recipe = load_recipe(str(job["recipe_file"]))
    labels = sorted({r["label"] for r in job["train"]})  # class names are indexed in sorted order
    builder = ModelBuilder(recipe, job["model_dir"], num_labels=len(labels), label_names=labels,
                           pad_token_id=_tokenizer(job).pad_token_id, dtype=torch.float32,
                           attn_implementation="eager")
    model = builder.build()
    assert sorted(builder.load_report.created) == ["classifier.bias", "classifier.weight"]
    return model, labels


def _tokenizer(job):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(job["model_dir"])


def _encode(tok, records: list[dict], labels: list[str]) -> list[dict]:
    enc = tok([r["text"] for r in records], truncation=True, max_length=MAX_LENGTH)
    return [{"input_ids": ids, "labels": labels.index(r["label"])} for ids, r in zip(enc["input_ids"], records)]


def _run_trainer(job, tmp_path: Path, *, lr: float = LR) -> tuple[list[dict], dict]:
    """Hugging Face Trainer on the same job: (per-step log records, evaluation metrics)."""
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    torch.set_num_threads(1)
    tok = _tokenizer(job)
    model, labels = _initial_model(job)
    train = datasets.Dataset.from_list(_encode(tok, _dist_ft_order(job["train"], STEPS * BATCH), labels))
    held_out = datasets.Dataset.from_list(_encode(tok, job["eval"], labels))
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch_fused", train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", use_cpu=True, seed=SEED, dataloader_num_workers=0, disable_tqdm=True)

    def accuracy(pred) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r and "train_runtime" not in r]
    return logs, trainer.evaluate()


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    return _run_trainer(job, tmp_path_factory.mktemp("hf"))


def test_the_same_tokens_in_the_same_order(job):
    """The ids Trainer is fed (the tokenizer's own, in the order rebuilt above) are dist_ft's, position by position."""
    import os

    from dist_ft.config import load_recipe
    from dist_ft.data.batching import SampleOrder
    from dist_ft.data.dataset import prepare_data
    from dist_ft.model import load_tokenizer

    os.environ["DIST_FT_CACHE"] = job["env"]["DIST_FT_CACHE"]  # the cache the run wrote
    try:
        tok = load_tokenizer(job["model_dir"])
        data = prepare_data(load_recipe(str(job["recipe_file"])), tok, log=lambda m: None)
    finally:
        del os.environ["DIST_FT_CACHE"]
    labels = sorted({r["label"] for r in job["train"]})
    assert data.label_names == labels
    ours = [data.train[i] for i in SampleOrder(len(data.train), SEED, True).rows(0, STEPS * BATCH)]
    theirs = _encode(_tokenizer(job), _dist_ft_order(job["train"], STEPS * BATCH), labels)
    assert any(len(r["input_ids"]) == MAX_LENGTH for r in theirs)  # truncation is exercised
    assert len({len(r["input_ids"]) for r in theirs}) > 5  # and padding
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.input_ids.tolist() == b["input_ids"] and int(a.labels[0]) == b["labels"], k
    assert [e.input_ids.tolist() for e in data.eval] == [r["input_ids"] for r in _encode(_tokenizer(job),
                                                                                         job["eval"], labels)]


def test_per_step_losses_equal_trainer(job, reference):
    logs, _ = reference
    ours = job["steps"]
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert len(logs) == STEPS
    assert "[weights] loaded" in job["stdout"]
    for a, b in zip(ours, logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (a["step"], a["grad_norm"], b["grad_norm"])
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-12)
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.3  # it learns: the comparison is not of two flat lines


def test_evaluation_equals_trainer(job, reference):
    _, metrics = reference
    before, after = job["evals"][0], job["evals"][-1]
    assert after["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=LOSS_RTOL)
    assert after["eval_accuracy"] == metrics["eval_accuracy"]
    assert after["eval_loss"] < before["eval_loss"] and after["eval_accuracy"] > before["eval_accuracy"]


def test_the_comparison_detects_a_changed_learning_rate(job, reference, tmp_path):
    """Negative control: Trainer with the learning rate 5% off leaves the tolerance within a few steps, so the
    equality above is not one that any two runs would pass."""
    logs, _ = _run_trainer(job, tmp_path, lr=LR * 1.05)
    assert logs[0]["loss"] == pytest.approx(job["steps"][0]["loss"], rel=LOSS_RTOL)  # step 1 precedes any update
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(job["steps"], logs))
    assert worst > 20 * LOSS_RTOL, worst
