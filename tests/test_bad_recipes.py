"""Property-based: 1,000+ broken recipes, each refused by `dist-ft check` with the broken field named, no traceback.

Hypothesis breaks a valid recipe in one of two ways: one to three field-level faults at once (an unknown key, a
wrong type, a value out of range; every one must be reported, in one message), or one fault that only shows
once the fields are well-formed (a missing file, an impossible combination). `dist-ft check` runs in this process
(the same `main` the console script calls), so a thousand recipes take seconds; no process group may start.
"""

import contextlib
import io
import tempfile
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dist_ft.cli import main
from dist_ft.config import describe_schema

SCHEMA = {key: tp for key, tp, _default, _help in describe_schema()}
# Numeric fields with a lower bound, and a value below it.
OUT_OF_RANGE = {"training.max_steps": 0, "training.micro_batch_size": 0, "training.gradient_accumulation_steps": 0,
                "training.learning_rate": -1e-3, "data.max_length": 2, "distributed.timeout_seconds": 1,
                "checkpoint.keep_last": 0, "method.lora.r": 0, "training.warmup_steps": -1,
                "training.log_every": 0, "seed": -1, "data.eval_fraction": 1.5, "method.lora.dropout": -0.1,
                "training.max_grad_norm": -1.0, "checkpoint.every_steps": -2}
SCALAR = [k for k, tp in SCHEMA.items() if tp in ("int", "float", "bool") or " | " in tp]
# Faults that appear only once every field is well-formed: (overrides, the field the message must name).
SEMANTIC = [
    ({"model.path": "/nonexistent/model"}, "model.path"),
    ({"data.train": "/nonexistent/train.jsonl"}, "data.train"),
    ({"data.eval": "/nonexistent/eval.jsonl"}, "data.eval"),
    ({"checkpoint.resume": "/nonexistent/checkpoint"}, "checkpoint.resume"),
    ({"method.kind": "qlora", "method.quant.bits": 8, "distributed.strategy": "fsdp"}, "method.quant.bits"),
    ({"method.kind": "qlora", "distributed.strategy": "zero3", "distributed.offload": "params"},
     "distributed.offload"),
    ({"training.stop_after_steps": 2}, "training.stop_after_steps"),
    ({"checkpoint.every_steps": 50}, "checkpoint.every_steps"),
    ({"model.attn_implementation": "flash_attention_2"}, "model.attn_implementation"),
    ({"distributed.deepspeed_config": "/nonexistent/ds.json"}, "distributed.deepspeed_config"),
    ({"method.kind": "prefix_tuning", "distributed.strategy": "zero3"}, "method.kind"),
    ({"method.kind": "prompt_tuning", "data.packing": True}, "data.packing"),
    ({"training.optimizer": "adamw_8bit", "distributed.strategy": "fsdp"}, "training.optimizer"),
    ({"model.task": "sequence_classification"}, "model."),
]


def _wrong_value(tp: str, draw) -> object:
    """A value the field's type cannot take."""
    if tp == "int":
        return draw(st.sampled_from(["abc", [1, 2], {"a": 1}, 1.5, True]))
    if tp == "float":
        return draw(st.sampled_from(["fast", [0.1], {"x": 0}]))
    if tp == "bool":
        return draw(st.sampled_from(["maybe", 3, [True], {"on": 1}]))
    # A choice among names: anything else.
    return draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
                .filter(lambda s: s not in tp.split(" | ")))


@st.composite
def field_faults(draw):
    n = draw(st.integers(1, 3))
    faults, expected = {}, set()
    while len(faults) < n:
        kind = draw(st.sampled_from(["unknown", "type", "range"]))
        if kind == "unknown":
            section = draw(st.sampled_from(["", "model.", "data.", "method.", "method.lora.", "training.",
                                            "distributed.", "checkpoint.", "logging."]))
            name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=14))
            key = section + "x_" + name  # never a real field
        elif kind == "type":
            key = draw(st.sampled_from(SCALAR))
            value = _wrong_value(SCHEMA[key], draw)
        else:
            key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
            value = OUT_OF_RANGE[key]
        if any(key.startswith(k + ".") or k.startswith(key + ".") or k == key for k in faults):
            continue
        faults[key] = 1 if kind == "unknown" else value
        expected.add(key)
    return faults, expected


def _set(recipe: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = recipe
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _base(model: Path, out: Path) -> dict:
    return {"output_dir": str(out), "model": {"path": str(model)},
            "data": {"train": "builtin:fortunes", "format": "text", "max_length": 48},
            "method": {"kind": "lora"}, "training": {"max_steps": 20, "micro_batch_size": 2},
            "distributed": {"strategy": "ddp", "precision": "fp32"}}


def _check(recipe: dict, folder: Path) -> tuple[int, str, float]:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    err, out = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["check", str(path)])
    return rc, err.getvalue() + out.getvalue(), time.perf_counter() - t0


TIMES: list[float] = []


@pytest.fixture(scope="module")
def work(tiny_llama):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rc, text, _ = _check(_base(tiny_llama, folder / "out"), folder)
        assert rc == 0, text  # the base recipe is valid: every refusal below is the fault's doing
        yield tiny_llama, folder
    if TIMES:
        print(f"\n[bad recipes] {len(TIMES)} checked; seconds per check: median "
              f"{sorted(TIMES)[len(TIMES) // 2]:.4f}, max {max(TIMES):.4f}")


def _assert_refused(rc, text, expected):
    assert rc != 0, text
    assert "Traceback" not in text, text
    for key in expected:
        assert key in text, (key, text)
    assert not dist.is_initialized()


@settings(max_examples=800, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=field_faults())
def test_field_faults_are_all_named(work, case):
    model, folder = work
    faults, expected = case
    recipe = _base(model, folder / "out")
    for key, value in faults.items():
        _set(recipe, key, value)
    rc, text, seconds = _check(recipe, folder)
    TIMES.append(seconds)
    _assert_refused(rc, text, expected)


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(SEMANTIC), steps=st.integers(1, 40), micro=st.integers(1, 8))
def test_semantic_faults_are_named(work, case, steps, micro):
    model, folder = work
    overrides, field = case
    recipe = _base(model, folder / "out")
    # Vary the valid parts too, so each example is a different recipe.
    _set(recipe, "training.max_steps", max(steps, 20) if "checkpoint.every_steps" in overrides else steps)
    _set(recipe, "training.micro_batch_size", micro)
    for key, value in overrides.items():
        _set(recipe, key, value)
    if "distributed.deepspeed_config" in overrides:
        _set(recipe, "distributed.strategy", "zero2")
    rc, text, seconds = _check(recipe, folder)
    TIMES.append(seconds)
    _assert_refused(rc, text, [field])
