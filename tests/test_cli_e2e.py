"""The real CLI end to end on tiny random models: the run directory, the saved model, classification metrics,
early stopping, and refusing to overwrite a run."""

import json

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from dist_ft.train.evaluation import classification_metrics
from conftest import read_metrics, run_cli, tiny_recipe, write_jsonl, write_recipe


def test_train_writes_the_run_directory(tmp_path, tiny_llama):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out, training={"eval_every": 3}))
    res = run_cli("train", str(path), "training.max_steps=6")
    assert res.returncode == 0, res.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 6 and resolved["distributed"]["strategy"] == "ddp"
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and "lr" in r and "grad_norm" in r for r in train)
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "[train] step 6/6" in res.stderr and "eta" in res.stderr  # plain progress lines when not a terminal
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.num_parameters() > 0
    # Refuses to write into the finished run unless told to.
    again = run_cli("train", str(path))
    assert again.returncode == 2 and "output_dir" in again.stderr and "already holds files" in again.stderr
    assert (out / "final").is_dir()  # nothing lost


def test_lora_saves_an_adapter_folder(tmp_path, tiny_llama):
    from peft import PeftModel

    out = tmp_path / "lora"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out, method={"kind": "lora", "lora": {"r": 4}}))
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "final" / "adapter_config.json").is_file()
    assert "trainable parameters" in res.stdout
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned = PeftModel.from_pretrained(base, out / "final")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())


def test_classification_reports_accuracy_and_f1(tmp_path, tiny_classifier):
    words = {"red": ["red apple", "red fire", "red rose"], "blue": ["blue sea", "blue sky", "blue ice"],
             "green": ["green leaf", "green grass", "green frog"]}
    recs = [{"text": t, "label": lab} for lab, ts in words.items() for t in ts] * 8
    data = write_jsonl(tmp_path / "cls.jsonl", recs)
    out = tmp_path / "cls"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tiny_classifier, out, model={"task": "sequence_classification", "path": str(tiny_classifier)},
        data={"train": str(data), "format": "classification", "eval_fraction": 0.25, "max_train_samples": None,
              "max_eval_samples": None},
        training={"max_steps": 8, "learning_rate": 1e-2}))
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    _, evals = read_metrics(out)
    assert {"eval_accuracy", "eval_f1", "eval_loss"} <= set(evals[-1])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert set(model.config.id2label.values()) == {"red", "blue", "green"}


def test_classification_metrics_by_hand():
    # rows: true class, columns: predicted
    cm = torch.tensor([[3., 1., 0.], [0., 2., 2.], [1., 0., 1.]], dtype=torch.float64)
    m = classification_metrics(cm)
    assert abs(m["eval_accuracy"] - 6 / 10) < 1e-12
    f1 = [2 * (3 / 4) * (3 / 4) / (3 / 4 + 3 / 4), 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4), 2 * (1 / 3) * (1 / 2)
          / (1 / 3 + 1 / 2)]
    assert abs(m["eval_f1"] - sum(f1) / 3) < 1e-12


def test_early_stopping(tmp_path, tiny_llama):
    out = tmp_path / "es"
    # A learning rate this high makes eval loss worse at once; patience 1 stops at the first evaluation.
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out, training={
        "max_steps": 20, "eval_every": 2, "early_stopping_patience": 1, "learning_rate": 0.5,
        "max_grad_norm": None}))
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    train, evals = read_metrics(out)
    assert len(train) < 20 and "early stop" in res.stderr


def test_bad_data_fails_before_training(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n')
    out = tmp_path / "o"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out, data={"train": str(bad)}))
    res = run_cli("train", str(path))
    assert res.returncode == 2 and "bad.jsonl:3: invalid JSON" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_schedule_shapes():
    from dist_ft.train.schedule import lr_factor
    f = [lr_factor(s, warmup=2, total=10, kind="cosine", min_ratio=0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and abs(f[2] - 1.0) < 1e-12 and f[-1] > 0.1 and f[-1] < f[5]
    assert lr_factor(10, warmup=2, total=10, kind="linear", min_ratio=0.0) == 0.0
