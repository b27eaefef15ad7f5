"""Sweep files in Weights & Biases' shape (and objective: {metric, direction}) read into the SweepConfig they mean,
and what cannot be translated refused by the CLI with exit 2, naming the field and what to write instead. Nothing
here trains: load_sweep and `dist-ft sweep` stop at the check."""

from __future__ import annotations

import math

import pytest
import yaml

from dist_ft.cli import main
from dist_ft.config import RecipeError
from dist_ft.sweep import SweepConfig, load_sweep
from conftest import tiny_recipe, write_recipe


@pytest.fixture
def recipe(tmp_path):
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "no-model", tmp_path / "run",
                                                         method={"kind": "lora"}, training={"eval_every": 2}))


def _load(tmp_path, recipe, sweep: dict, **kw):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    notes: list[str] = []
    cfg = load_sweep(path, str(recipe), log=notes.append, **kw)
    return cfg, notes


def test_a_wandb_sweep_is_the_sweep_it_means(tmp_path, recipe):
    cfg, notes = _load(tmp_path, recipe, {
        "name": "lr search", "method": "bayes", "metric": {"name": "eval_loss", "goal": "minimize"}, "run_cap": 6,
        "parameters": {
            "training.learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
            "method.lora.r": {"values": [4, 8, 16]},
            "method.lora.dropout": {"distribution": "uniform", "min": 0.0, "max": 0.2},
            "training.warmup_steps": {"min": 0, "max": 2},  # integers without a distribution: int_uniform
            "method.lora.alpha": {"value": 16},
            "training": {"parameters": {"weight_decay": {"distribution": "categorical", "values": [0.0, 0.1]}}},
        }})
    assert cfg == SweepConfig(method="bayesian", objective="eval_loss", direction="minimize", trials=6,
                              output_dir=f"{tmp_path / 'run'}-sweep", params={
                                  "training.learning_rate": ("log_uniform", [1e-5, 1e-3]),
                                  "method.lora.r": ("choice", [4, 8, 16]),
                                  "method.lora.dropout": ("uniform", [0.0, 0.2]),
                                  "training.warmup_steps": ("int", [0, 2]),
                                  "method.lora.alpha": ("choice", [16]),
                                  "training.weight_decay": ("choice", [0.0, 0.1])})
    assert any("Weights & Biases sweep file, read as" in n for n in notes)
    assert "[sweep] name: not used (the sweep's directory is its output_dir)" in notes


def test_wandb_log_uniform_takes_exponents_and_is_converted(tmp_path, recipe):
    cfg, notes = _load(tmp_path, recipe, {
        "method": "random", "metric": {"name": "eval_loss"},
        "parameters": {"training.learning_rate": {"distribution": "log_uniform", "min": -9.2, "max": -4.6}}})
    kind, (low, high) = cfg.params["training.learning_rate"]
    assert kind == "log_uniform" and low == pytest.approx(math.exp(-9.2)) and high == pytest.approx(math.exp(-4.6))
    assert low == pytest.approx(1.01e-4, rel=1e-2)  # e^-9.2, not 10^-9.2 and not -9.2
    assert cfg.direction == "auto" and cfg.method == "random"
    assert any("natural-log exponents" in n and "log_uniform_values" in n for n in notes)


def test_q_uniform_and_grid_ranges_become_their_values(tmp_path, recipe):
    cfg, notes = _load(tmp_path, recipe, {
        "method": "grid", "metric": {"name": "eval_loss", "goal": "minimize"},
        "parameters": {"method.lora.dropout": {"distribution": "q_uniform", "min": 0.0, "max": 0.3, "q": 0.1},
                       "training.warmup_steps": {"distribution": "int_uniform", "min": 0, "max": 2}}})
    assert cfg.params == {"method.lora.dropout": ("choice", [0.0, 0.1, 0.2, 0.3]),
                          "training.warmup_steps": ("choice", [0, 1, 2])}
    assert cfg.trials == 12  # W&B runs the whole grid: 4 x 3
    assert any("q_uniform read as a choice of its 4 values" in n for n in notes)
    cfg, _ = _load(tmp_path, recipe, {"method": "grid", "metric": {"name": "eval_loss"},
                                      "parameters": {"method.lora.r": {"values": [2, 4]}}}, trials=1)
    assert cfg.trials == 1  # --trials still decides


def test_objective_as_a_mapping(tmp_path, recipe):
    cfg, notes = _load(tmp_path, recipe, {"method": "random", "objective": {"metric": "eval_perplexity",
                                                                            "direction": "minimize"},
                                          "params": {"method.lora.r": {"choice": [2, 4]}}})
    assert (cfg.objective, cfg.direction, cfg.params) == ("eval_perplexity", "minimize",
                                                          {"method.lora.r": ("choice", [2, 4])})
    assert notes == []  # dist-ft's own shape: nothing translated


def test_the_native_shape_is_unchanged(tmp_path, recipe):
    cfg, notes = _load(tmp_path, recipe, {"method": "bayesian", "objective": "eval_loss", "trials": 3,
                                          "params": {"training.learning_rate": {"log_uniform": [1e-4, 1e-2]}}})
    assert cfg == SweepConfig(trials=3, output_dir=f"{tmp_path / 'run'}-sweep",
                              params={"training.learning_rate": ("log_uniform", [1e-4, 1e-2])})
    assert notes == []


BAD = [
    ({"metric": {"name": "eval_loss"}, "parameters": {"training.learning_rate": {
        "distribution": "normal", "mu": 0.001, "sigma": 0.0001}}},
     "parameters.training.learning_rate.distribution: normal is not available"),
    ({"metric": {"name": "eval_loss", "goal": "up"}, "parameters": {"method.lora.r": {"values": [2]}}},
     "metric.goal: 'up' is not minimize | maximize"),
    ({"metric": {"name": "eval_loss", "target": 0.1}, "parameters": {"method.lora.r": {"values": [2]}}},
     "metric.target: a sweep runs its trials to the end; remove target"),
    ({"metric": {"name": "eval_loss"}, "early_terminate": {"type": "hyperband", "min_iter": 3},
      "parameters": {"method.lora.r": {"values": [2]}}},
     "early_terminate: dist-ft prunes trials by the median rule, not hyperband; remove it, or write pruning: true"),
    ({"metric": {"name": "eval_loss"}, "parameters": {"method.lora.r": {"values": [2, 4],
                                                                        "probabilities": [0.9, 0.1]}}},
     "parameters.method.lora.r.probabilities"),
    ({"metric": {"name": "eval_loss"}, "parameters": {"training.learning_rate": {
        "distribution": "q_log_uniform_values", "min": 1e-5, "max": 1e-3, "q": 1e-5}}},
     "parameters.training.learning_rate.distribution: q_log_uniform_values is not available; write values"),
    ({"metric": {"name": "eval_loss"}, "parameters": {"method.lora.r": 8}},
     "parameters.method.lora.r: 8; give a mapping"),
    ({"metric": {"name": "eval_loss"}, "parameters": {"method.lora.r": {"values": [2, -1]}}},
     "params.method.lora.r = -1: method.lora.r"),  # translated values are checked against the recipe as ever
    ({"objective": {"metric": "eval_loss", "direction": "down"}, "params": {"method.lora.r": {"choice": [2]}}},
     "direction: 'down' is not one of auto | maximize | minimize"),
    ({"objective": ["eval_loss"], "params": {"method.lora.r": {"choice": [2]}}},
     "objective: ['eval_loss']; give a metric name"),
    ({"objective": {"name": "eval_loss"}, "params": {"method.lora.r": {"choice": [2]}}},
     "objective.name: unknown key"),
    ({"metric": {"name": "eval_rouge9"}, "parameters": {"method.lora.r": {"values": [2]}}},
     "objective: eval_rouge9 is not reported by this recipe"),
]


@pytest.mark.parametrize("sweep, needle", BAD, ids=[n.split(":")[0] for _, n in BAD])
def test_what_cannot_be_translated_exits_2_naming_the_field(tmp_path, recipe, capsys, sweep, needle):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"method": "random", **sweep}, sort_keys=False))
    assert main(["sweep", str(recipe), str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err
    with pytest.raises(RecipeError):
        load_sweep(path, str(recipe), log=lambda m: None)
