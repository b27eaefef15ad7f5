"""A user's DeepSpeed JSON is honoured or refused at check time, never silently overridden in either direction.

The JSONs are the shapes users bring: transformers' own test configs (ZeRO-2/3 with a WarmupLR scheduler and
"auto" everywhere), a minimal ZeRO-3 JSON with no precision or clipping, and DeepSpeedExamples-style configs with
fp16-only fields. Either `dist-ft check` refuses them (exit 2, every problem named) or a run trains with the lr,
precision and clipping that the resolved config states, read back from metrics.jsonl and the engine.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe
from dist_ft.config import load_recipe
from dist_ft.distributed.deepspeed_config import deepspeed_json_problems, resolve_deepspeed_config
from dist_ft.schedule import lr_factor

# transformers tests/deepspeed/ds_config_zero2.json, as its docs tell users to write it.
HF_ZERO2 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                          "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}
MINIMAL_ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}


def _recipe(tmp_path, model, ds: dict, **training):
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    r = tiny_recipe(model, tmp_path / "run", training={"max_steps": 4, "micro_batch_size": 2, **training},
                    distributed={"strategy": f"zero{ds['zero_optimization']['stage']}",
                                 "deepspeed_config": str(tmp_path / "ds.json")})
    return write_recipe(tmp_path / "r.yaml", r)


def test_a_scheduler_section_is_refused_at_check_with_the_recipe_keys(tmp_path, tiny_llama):
    res = run_cli("check", str(_recipe(tmp_path, tiny_llama, HF_ZERO2)), timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stdout + res.stderr
    assert "scheduler (WarmupLR)" in err and "training.lr_scheduler" in err and "training.warmup_steps" in err
    assert "Traceback" not in err
    without = {k: v for k, v in HF_ZERO2.items() if k != "scheduler"}
    res = run_cli("check", str(_recipe(tmp_path, tiny_llama, without)), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_recipe_precision_and_clipping_reach_a_json_that_leaves_them_out(tmp_path, tiny_llama):
    path = _recipe(tmp_path, tiny_llama, MINIMAL_ZERO3, max_grad_norm=0.5)
    recipe = load_recipe(str(path), ["distributed.precision=bf16-mixed"])
    cfg, problems = resolve_deepspeed_config(MINIMAL_ZERO3, recipe, world_size=2)
    assert problems == []
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["gradient_clipping"] == 0.5


def test_conflicts_are_errors_in_both_directions(tmp_path, tiny_llama):
    path = _recipe(tmp_path, tiny_llama, MINIMAL_ZERO3)
    fp16_json = {**MINIMAL_ZERO3, "fp16": {"enabled": True, "loss_scale": 0}, "gradient_clipping": 1.0}
    recipe = load_recipe(str(path), ["distributed.precision=bf16-mixed", "training.max_grad_norm=0.5"])
    problems = deepspeed_json_problems(fp16_json, recipe, source="ds.json")
    assert any("fp16.enabled is True" in p for p in problems), problems
    assert any("gradient_clipping is 1.0" in p and "0.5" in p for p in problems), problems
    # The recipe's fp32 against a JSON that turns bf16 on is just as much an error.
    recipe = load_recipe(str(path))
    problems = deepspeed_json_problems({**MINIMAL_ZERO3, "bf16": {"enabled": True}}, recipe, source="ds.json")
    assert any("bf16.enabled is True" in p for p in problems), problems


def test_deepspeeds_own_validation_runs_at_check(tmp_path, tiny_llama):
    # DeepSpeedExamples-style: fp16 loss-scale fields copied into the bf16 section (DeepSpeed's pydantic model
    # refuses them), and an explicit train_batch_size that no micro-batch layout gives.
    bad = {**MINIMAL_ZERO3, "bf16": {"enabled": "auto", "loss_scale": 0}, "train_batch_size": 7}
    res = run_cli("check", str(_recipe(tmp_path, tiny_llama, bad)), timeout=300)
    err = res.stdout + res.stderr
    assert res.returncode == 2, err
    assert "bf16.loss_scale" in err and "Extra inputs are not permitted" in err, err
    assert "train_batch_size 7" in err, err
    assert "Traceback" not in err


def test_launch_checks_the_global_batch_before_any_rank_starts(tmp_path, tiny_llama):
    path = _recipe(tmp_path, tiny_llama, {**MINIMAL_ZERO3, "train_batch_size": 2})
    res = run_cli("launch", str(path), "--nproc-per-node", "2", timeout=300)
    err = res.stdout + res.stderr
    assert res.returncode == 2, err
    assert "train_batch_size is 2 but the recipe gives 4" in err and "Traceback" not in err
    assert "world size" not in res.stdout  # refused before a rank printed anything


def test_an_optimizer_of_another_kind_is_refused(tmp_path, tiny_llama):
    path = _recipe(tmp_path, tiny_llama, MINIMAL_ZERO3)
    recipe = load_recipe(str(path))
    lamb = {**MINIMAL_ZERO3, "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}
    problems = deepspeed_json_problems(lamb, recipe, source="ds.json")
    assert any("optimizer type 'Lamb'" in p for p in problems), problems


@pytest.mark.parametrize("json_kind,precision", [("transformers", "fp32"), ("minimal", "bf16-mixed")])
def test_user_json_trains_with_the_recipe_lr_precision_and_clipping(tmp_path, tiny_llama, json_kind, precision):
    """transformers' ZeRO-2 JSON without its scheduler (as check asks), with its own optimizer section; and a
    minimal JSON with no precision, clipping or optimizer at all. The run's lr per step is the recipe's schedule
    (not 0, not DeepSpeed's), and the engine reports the recipe's precision and clipping."""
    ds = ({k: v for k, v in HF_ZERO2.items() if k != "scheduler"} if json_kind == "transformers"
          else {"zero_optimization": {"stage": 2}})
    path = _recipe(tmp_path, tiny_llama, ds, learning_rate=1e-3, warmup_steps=2, lr_scheduler="linear",
                   max_grad_norm=0.5)
    res = run_cli("launch", str(path), "--nproc-per-node", "2", f"distributed.precision={precision}", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bf16 = "on" if precision == "bf16-mixed" else "off"
    assert f"DeepSpeed ZeRO-2: bf16 {bf16}, fp16 off, gradient clipping 0.5" in res.stdout, res.stdout[-3000:]
    records, _ = read_metrics(tmp_path / "run")
    want = [1e-3 * lr_factor(s, warmup=2, total=4, kind="linear", min_ratio=0.0) for s in range(4)]
    got = [r["lr"] for r in records]
    assert len(got) == 4 and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, want)), (got, want)
    resolved = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert resolved["bf16"]["enabled"] is (precision == "bf16-mixed") and resolved["gradient_clipping"] == 0.5
    if "optimizer" in resolved:
        assert resolved["optimizer"]["params"]["lr"] == 1e-3
