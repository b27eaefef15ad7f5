"""The recipe schema: strict loading, every problem reported at once, overrides, and the CLI's `check`."""

import dataclasses

import pytest
import torch

from dist_ft.config import Recipe, RecipeError, describe_schema, load_recipe, parse_overrides, recipe_from_dict
from conftest import run_cli, write_recipe


def test_defaults_are_valid():
    r = recipe_from_dict({})
    assert r.distributed.strategy == "ddp" and r.model.trust_remote_code is False


def test_every_problem_is_reported_at_once():
    bad = {"training": {"max_step": 3, "learning_rate": "fast", "micro_batch_size": 0},
           "distributed": {"strategy": "fsdp2"}, "data": {"format": "instructions", "max_length": -5},
           "bogus": 1}
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(bad)
    msgs = err.value.problems
    assert len(msgs) == 7, msgs
    text = str(err.value)
    assert "training.max_step: unknown key (did you mean 'max_steps'?)" in text
    assert "training.learning_rate: expected a number, got 'fast'" in text
    assert "training.micro_batch_size: must be >= 1, got 0" in text
    assert "distributed.strategy: 'fsdp2' is not one of" in text and "did you mean 'fsdp'" in text
    assert "data.format: 'instructions' is not one of" in text
    assert "data.max_length: must be >= 8, got -5" in text
    assert "bogus: unknown key" in text


@pytest.mark.parametrize("bad, field", [
    ({"training": {"max_steps": 1.5}}, "training.max_steps"),
    ({"training": {"max_steps": True}}, "training.max_steps"),
    ({"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code"),
    ({"model": "x"}, "model"),
    ({"method": {"lora": {"target_modules": 3}}}, "method.lora.target_modules"),
    ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
])
def test_wrong_types_and_ranges_name_the_field(bad, field):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(bad)
    assert any(p.startswith(field + ":") for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("bad, field", [
    ({"model": {"task": "sequence_classification"}, "data": {"format": "text"}}, "data.format"),
    ({"data": {"format": "classification"}}, "model.task"),
    ({"training": {"max_steps": 5, "warmup_steps": 10}}, "training.warmup_steps"),
    ({"training": {"early_stopping_patience": 2}}, "training.early_stopping_patience"),
    ({"model": {"attn_implementation": "flash_attention_2"}}, "model.attn_implementation"),
])
def test_impossible_combinations(bad, field):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(bad)
    assert any(p.startswith(field + ":") for p in err.value.problems), err.value.problems


def test_overrides_are_yaml_typed(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"training": {"max_steps": 10}})
    r = load_recipe(path, ["training.max_steps=3", "training.learning_rate=3e-4", "data.packing=true",
                           "method.lora.target_modules=[q_proj, v_proj]"])
    assert r.training.max_steps == 3 and r.training.learning_rate == 3e-4 and r.data.packing is True
    assert r.method.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(path, ["training.max_steps"])


def test_parse_overrides_nested():
    problems = []
    assert parse_overrides(["a.b.c=1", "a.d=x"], problems) == {"a": {"b": {"c": 1}, "d": "x"}} and not problems


def test_schema_documents_every_field():
    rows = describe_schema()
    assert len(rows) > 40
    assert all(help_ for _, _, _, help_ in rows), [k for k, _, _, h in rows if not h]
    # The required key names exist.
    keys = {k for k, *_ in rows}
    for k in ["output_dir", "seed", "model.path", "model.task", "model.num_labels", "data.train", "data.eval",
              "data.eval_fraction", "data.format", "data.max_length", "data.packing", "method.kind",
              "training.max_steps", "training.micro_batch_size", "training.gradient_accumulation_steps",
              "training.learning_rate", "training.lr_scheduler", "training.warmup_steps", "training.weight_decay",
              "training.max_grad_norm", "training.eval_every", "training.early_stopping_patience",
              "distributed.strategy", "distributed.precision"]:
        assert k in keys, k


def test_check_cli_reports_all_problems_with_status_2(tmp_path):
    path = write_recipe(tmp_path / "bad.yaml", {
        "model": {"path": str(tmp_path / "no-such-model")},
        "data": {"train": str(tmp_path / "missing.jsonl"), "eval": "builtin:nope"},
        "distributed": {"precision": "fp16-mixed", "strategy": "zero2"},
    })
    res = run_cli("check", str(path), timeout=120)
    assert res.returncode == 2, res.stderr
    err = res.stderr
    assert "model.path:" in err and "no-such-model" in err
    assert "data.train:" in err and "missing.jsonl: no such file" in err
    assert "data.eval: unknown built-in source 'nope'" in err
    from dist_ft.distributed.precision import cpu_has_fp16_kernels
    if not torch.cuda.is_available() and not cpu_has_fp16_kernels():  # DeepSpeed refuses fp16 on such a CPU
        assert "distributed.precision: fp16-mixed with zero2 on CPU" in err and "use strategy ddp or fsdp" in err
    assert "Traceback" not in err


def test_check_cli_prints_resolved_recipe(tmp_path, tiny_llama):
    path = write_recipe(tmp_path / "ok.yaml", {"model": {"path": str(tiny_llama)}, "output_dir": str(tmp_path / "o"),
                                                "data": {"train": "builtin:pydoc", "format": "text"}})
    res = run_cli("check", str(path), "training.max_steps=7", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "max_steps: 7" in res.stdout and "strategy: ddp" in res.stdout


def test_check_cli_missing_columns(tmp_path, tiny_llama):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    path = write_recipe(tmp_path / "r.yaml", {"model": {"path": str(tiny_llama)}, "output_dir": str(tmp_path / "o"),
                                               "data": {"train": str(data), "format": "instruction"}})
    res = run_cli("check", str(path), timeout=120)
    assert res.returncode == 2
    assert "has no column 'prompt'" in res.stderr and "data.columns.prompt" in res.stderr
    assert "has no column 'response'" in res.stderr
    ok = run_cli("check", str(path), "data.columns.prompt=question", "data.columns.response=answer", timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_recipe_roundtrip_is_dataclass():
    assert dataclasses.is_dataclass(Recipe)


def test_missing_optional_packages_name_the_extra(monkeypatch, tmp_path):
    import importlib.util

    from dist_ft.config import recipe_from_dict
    from dist_ft.preflight import package_problems
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n in ("bitsandbytes", "wandb") else real(n, *a))
    r = recipe_from_dict({"method": {"kind": "qlora"}, "logging": {"wandb": {"mode": "offline"}}})
    problems = package_problems(r)
    assert any("bitsandbytes" in p and "dist-ft[qlora]" in p for p in problems)
    assert any("wandb" in p and "dist-ft[wandb]" in p for p in problems)
