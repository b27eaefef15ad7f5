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
from dist_ft.distributed.deepspeed.config import deepspeed_json_problems, resolve_deepspeed_config
from dist_ft.train.schedule import lr_factor

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


@pytest.mark.parametrize("json_kind,precision", [pytest.param("transformers", "fp32", marks=pytest.mark.slow),
                                                 ("minimal", "bf16-mixed")])
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
    # Read back from the engine: bf16 compute, gradients still reduced and accumulated in fp32 (issue 21, item 9).
    assert "gradients reduced in fp32 and accumulated in fp32" in res.stdout, res.stdout[-3000:]
    records, _ = read_metrics(tmp_path / "run")
    want = [1e-3 * lr_factor(s, warmup=2, total=4, kind="linear", min_ratio=0.0) for s in range(4)]
    got = [r["lr"] for r in records]
    assert len(got) == 4 and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, want)), (got, want)
    resolved = json.loads((tmp_path / "run" / "deepspeed_config.json").read_text())
    assert resolved["bf16"]["enabled"] is (precision == "bf16-mixed") and resolved["gradient_clipping"] == 0.5
    if "optimizer" in resolved:
        assert resolved["optimizer"]["params"]["lr"] == 1e-3
    if precision == "bf16-mixed":
        assert resolved["communication_data_type"] == "fp32" and resolved["data_types"]["grad_accum_dtype"] == "fp32"


# ------------------------------------------------------------------------------------------- issue 21, items 6 and 9
def _pure_recipe(tmp_path, **distributed):
    r = tiny_recipe(tmp_path / "model", tmp_path / "run", distributed=distributed)
    return load_recipe(str(write_recipe(tmp_path / "r.yaml", r)))


OFFLOADS = [("zero1", "none"), ("zero1", "optimizer"), ("zero2", "none"), ("zero2", "optimizer"), ("zero3", "none"),
            ("zero3", "optimizer"), ("zero3", "params"), ("zero3", "all")]


@pytest.mark.parametrize("strategy,offload", OFFLOADS, ids=[f"{s}-{o}" for s, o in OFFLOADS])
def test_every_offload_the_recipe_accepts_resolves_from_the_shipped_templates(tmp_path, strategy, offload):
    """Every (strategy, offload) that the recipe check accepts resolves cleanly, DeepSpeed's own validation included,
    and offloads exactly what the recipe says: ZeRO-3 + optimizer-only and params-only were refused (the template
    held both offload blocks), ZeRO-1 + optimizer got the ZeRO-2 template (stage 2 against the recipe's 1)."""
    from dist_ft.distributed.deepspeed.config import load_template

    recipe = _pure_recipe(tmp_path, strategy=strategy, offload=offload)
    template, source = load_template(recipe)
    assert deepspeed_json_problems(template, recipe, source=source, world_size=2) == []
    cfg, problems = resolve_deepspeed_config(template, recipe, world_size=2, source=source)
    assert problems == []
    zero = cfg["zero_optimization"]
    assert zero["stage"] == int(strategy[-1])
    devices = {k: zero[k]["device"] for k in ("offload_optimizer", "offload_param") if k in zero}
    want = {k: "cpu" for k, on in (("offload_optimizer", offload in ("optimizer", "all")),
                                   ("offload_param", offload in ("params", "all"))) if on}
    assert devices == want
    # Offloaded optimizer state steps in DeepSpeed's CPU Adam (its optimizer section); otherwise dist_ft's own.
    assert ("optimizer" in cfg) == (offload in ("optimizer", "all"))


def test_a_user_json_offload_device_still_has_to_agree(tmp_path):
    recipe = _pure_recipe(tmp_path, strategy="zero3", offload="optimizer")
    both = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                  "offload_param": {"device": "cpu"}}}
    problems = deepspeed_json_problems(both, recipe, source="ds.json")
    assert any("offload_param offloads to 'cpu' but distributed.offload is 'optimizer'" in p for p in problems)
    auto = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "auto"},
                                  "offload_param": {"device": "auto"}}}
    cfg, problems = resolve_deepspeed_config(auto, recipe, world_size=1)
    assert problems == [] and cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in cfg["zero_optimization"]


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_bf16_mixed_reduces_and_accumulates_gradients_in_fp32(tmp_path, strategy):
    """Without these keys DeepSpeed reduces and accumulates bf16 gradients in bf16; DDP and FSDP2 reduce in fp32."""
    from dist_ft.distributed.deepspeed.config import load_template

    recipe = _pure_recipe(tmp_path, strategy=strategy, precision="bf16-mixed")
    for template in (load_template(recipe)[0], {"zero_optimization": {"stage": int(strategy[-1])}}):
        cfg, problems = resolve_deepspeed_config(template, recipe, world_size=2)
        assert problems == []
        assert cfg["communication_data_type"] == "fp32"
        assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    # fp32 runs need no keys (DeepSpeed's default is fp32); fp16-mixed keeps DeepSpeed's fp16 reduce under its scale.
    for precision in ("fp32",):
        cfg, _ = resolve_deepspeed_config({"zero_optimization": {"stage": 2}},
                                          _pure_recipe(tmp_path, strategy=strategy, precision=precision), world_size=2)
        assert "communication_data_type" not in cfg and "data_types" not in cfg


def test_a_different_gradient_dtype_in_a_user_json_is_a_conflict(tmp_path):
    recipe = _pure_recipe(tmp_path, strategy="zero2", precision="bf16-mixed")
    bf16_grads = {"zero_optimization": {"stage": 2}, "communication_data_type": "bf16",
                  "data_types": {"grad_accum_dtype": "bf16"}}
    problems = deepspeed_json_problems(bf16_grads, recipe, source="ds.json")
    assert any("communication_data_type is 'bf16' but the recipe gives 'fp32'" in p for p in problems), problems
    assert any("data_types.grad_accum_dtype is 'bf16' but the recipe gives 'fp32'" in p for p in problems), problems
    # The same dtype spelled another way DeepSpeed reads, or "auto", agrees.
    same = {"zero_optimization": {"stage": 2}, "communication_data_type": "FP32",
            "data_types": {"grad_accum_dtype": "torch.float32"}}
    assert deepspeed_json_problems(same, recipe, source="ds.json") == []
    auto = {"zero_optimization": {"stage": 2}, "communication_data_type": "auto",
            "data_types": {"grad_accum_dtype": "auto"}}
    cfg, problems = resolve_deepspeed_config(auto, recipe, world_size=1)
    assert problems == [] and cfg["communication_data_type"] == "fp32"
