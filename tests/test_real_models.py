"""Short runs on the bundled real weights: held-out loss goes down for SmolLM2 (LoRA, WordNet definitions) and
for the MiniLM encoder's classification head (WordNet categories)."""

import pytest

from conftest import read_metrics, run_cli, write_recipe

pytestmark = pytest.mark.real_model


@pytest.mark.slow  # CI time: the demo's test (test_the_demo_runs_end_to_end) trains the same LoRA on the same data
def test_smollm2_lora_learns_definitions(tmp_path):
    out = tmp_path / "smol"
    path = write_recipe(tmp_path / "r.yaml", {
        "output_dir": str(out),
        "model": {"path": "smollm2-135m-instruct"},
        "data": {"train": "builtin:wordnet-definitions", "format": "instruction", "max_length": 96,
                 "max_train_samples": 400, "max_eval_samples": 32, "system_prompt": "You are a concise dictionary."},
        "method": {"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {"max_steps": 8, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 1},
    })
    res = run_cli("train", str(path), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    _, evals = read_metrics(out)
    before, after = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert after < before - 0.2, (before, after)


def test_minilm_classifier_learns_categories(tmp_path):
    out = tmp_path / "minilm"
    path = write_recipe(tmp_path / "r.yaml", {
        "output_dir": str(out),
        "model": {"path": "minilm-l6-v2", "task": "sequence_classification"},
        "data": {"train": "builtin:wordnet-categories", "format": "classification", "max_length": 48,
                 "max_train_samples": 600, "max_eval_samples": 96},
        "method": {"kind": "full"},
        "training": {"max_steps": 12, "micro_batch_size": 16, "learning_rate": 1e-4},
    })
    res = run_cli("train", str(path), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    # The pretrained encoder, not a random one: every tensor of the bare BertModel folder is loaded.
    assert "[weights] loaded 103 of 103 pretrained tensors; 2 created by the recipe" in res.stdout, res.stdout
    _, evals = read_metrics(out)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_accuracy"] > evals[0]["eval_accuracy"]
    assert 0 <= evals[-1]["eval_f1"] <= 1


def test_the_demo_runs_end_to_end(tmp_path):
    """`dist-ft demo`, shortened: 2 ranks on the bundled SmolLM2, then its summary (loss, generated-answer scores,
    forgetting) and the held-out question answered by the base and the tuned model."""
    res = run_cli("demo", "--nproc-per-node", "2", "--output-dir", str(tmp_path / "demo"), "training.max_steps=2",
                  "training.warmup_steps=0", "data.max_train_samples=64", "data.max_eval_samples=8",
                  "eval.generation.sample_size=2", "eval.generation.max_new_tokens=4", "eval.forgetting_samples=2",
                  timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for needle in ("=== dist_ft demo ===", "held-out loss:", "ROUGE-L", "forgetting (loss on general text",
                   "fine-tuned:"):
        assert needle in res.stdout, (needle, res.stdout[-2000:])
