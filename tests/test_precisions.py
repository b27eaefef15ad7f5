"""fp16-mixed and bf16-true (and bf16-mixed under the sharded backends) on CPU, 2 gloo processes, against a
1-process fp32 run of the same global batch; fp16 overflow (a skipped step, counted, the scale halved on every rank)
and the loss scaler through a save and a resume.

Tolerance: per-step losses within a relative 5e-3 of fp32 over 6 steps of the tiny Llama. Measured here (torch
2.13, DeepSpeed 0.19.8, the largest difference over the 6 steps): fp16-mixed DDP 5.6e-5, FSDP2 7.9e-5; bf16-true
3.1e-4 under DDP, FSDP2, ZeRO-2 and ZeRO-3; bf16-mixed FSDP2 8.0e-5, ZeRO-2 7.7e-5. The bound is 16x the worst; a
run in the wrong dtype is caught by the final weights' dtype and by a loss that is exactly fp32's.

DeepSpeed's CPU accelerator accepts fp16 only where oneDNN has float16 kernels (AVX512-FP16 or AMX-FP16): on a CPU
without them, zero* + fp16-mixed is refused by `dist-ft check` naming the fix (ddp/fsdp, or bf16-mixed), tested
here; DeepSpeed's fp16 loss scaler itself runs in the GPU matrix (test_gpu.py).

The default suite keeps one case per backend and precision kind; `-m slow` runs the rest of the matrix.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_final, read_metrics, run_cli, tiny_recipe, write_recipe

STEPS = 6
RTOL = 5e-3
slow = pytest.mark.slow
CASES = [
    ("ddp", "fp16-mixed"), ("fsdp", "fp16-mixed"), ("fsdp", "bf16-true"), ("zero2", "bf16-true"),
    pytest.param("ddp", "bf16-true", marks=slow), pytest.param("zero3", "bf16-true", marks=slow),
    pytest.param("fsdp", "bf16-mixed", marks=slow), pytest.param("zero2", "bf16-mixed", marks=slow),
    pytest.param("zero3", "bf16-mixed", marks=slow),
]
WEIGHTS_DTYPE = {"fp16-mixed": torch.float32, "bf16-mixed": torch.float32, "bf16-true": torch.bfloat16}


def _recipe(tmp_path, name, model, *, strategy="ddp", precision="fp32", micro=2, **sections):
    out = tmp_path / name
    r = tiny_recipe(model, out, training={"max_steps": STEPS, "micro_batch_size": micro, "learning_rate": 2e-3},
                    distributed={"strategy": strategy, "precision": precision})
    for key, value in sections.items():
        r.setdefault(key, {}).update(value)
    return out, write_recipe(tmp_path / f"{name}.yaml", r)


def _launch(path, *args, env=None):
    res = run_cli("launch", str(path), "--nproc-per-node", "2", *args, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "world size 2" in res.stdout and "rank 1/2" in res.stdout
    return res


def _worst(losses, ref):
    assert len(losses) == len(ref) == STEPS
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref))


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory, tiny_llama):
    """1 process, fp32, the whole global batch (4 samples) in one micro-batch."""
    out, path = _recipe(tmp_path_factory.mktemp("fp32"), "ref", tiny_llama, micro=4)
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out)[0]]


@pytest.mark.parametrize("strategy, precision", CASES)
def test_precision_matches_fp32(tmp_path, fp32_reference, tiny_llama, strategy, precision):
    out, path = _recipe(tmp_path, f"{strategy}-{precision}", tiny_llama, strategy=strategy, precision=precision)
    res = _launch(path)
    assert f"precision {precision}" in res.stdout
    records = read_metrics(out)[0]
    losses = [r["loss"] for r in records]
    worst = _worst(losses, fp32_reference)
    print(f"{strategy} {precision}: max relative loss difference from fp32 {worst:.2e}")
    assert 0 < worst <= RTOL, (worst, losses, fp32_reference)  # 0: it ran in fp32 after all
    assert losses[-1] < losses[0]
    assert not any(r["skipped"] for r in records)
    if precision == "fp16-mixed":  # torch's scaler at its initial 2^16, never lowered on this run
        assert [r["loss_scale"] for r in records] == [65536.0] * STEPS
    else:
        assert all("loss_scale" not in r for r in records)
    final = read_final(out)
    # DeepSpeed casts the module itself to bf16 for bf16-mixed too (its fp32 master stays in the optimizer).
    want = torch.bfloat16 if strategy.startswith("zero") and precision.startswith("bf16") else WEIGHTS_DTYPE[precision]
    assert {t.dtype for t in final.values()} == {want}
    if strategy.startswith("zero"):  # read back from the engine, not only from the JSON
        bf16_master = "master weights bf16" if precision == "bf16-true" else "master weights fp32"
        assert "bf16 on, fp16 off" in res.stdout and bf16_master in res.stdout, res.stdout[-2000:]
        resolved = json.loads((out / "deepspeed_config.json").read_text())["bf16"]
        assert resolved.get("bf16_master_weights_and_grads", False) is (precision == "bf16-true")


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_fp16_on_cpu_is_refused_or_runs(tmp_path, tiny_llama, strategy):
    """DeepSpeed refuses fp16 on a CPU without oneDNN float16 kernels (at initialize, on every rank): refused
    before any work instead, naming the fix. Where the CPU has them, it trains with DeepSpeed's own scaler."""
    from dist_ft.distributed.precision import cpu_has_fp16_kernels
    out, path = _recipe(tmp_path, strategy, tiny_llama, strategy=strategy, precision="fp16-mixed")
    if torch.cuda.is_available() or cpu_has_fp16_kernels():
        _launch(path)
        assert all(r["loss_scale"] >= 1 for r in read_metrics(out)[0])
        return
    res = run_cli("check", str(path), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"fp16-mixed with {strategy} on CPU" in res.stderr and "use strategy ddp or fsdp" in res.stderr
    assert f"or bf16-mixed with {strategy}" in res.stderr


def _scaler(out, step):
    from dist_ft.checkpoint.store import checkpoints_root, step_dir
    state = json.loads((step_dir(checkpoints_root(out), step) / "trainer_state.json").read_text())
    return state["strategy_extra"]["scaler"], state["skipped_steps"]


def _weights(out, step):
    from dist_ft.checkpoint.store import checkpoints_root, step_dir
    from dist_ft.distributed.dcp_state import read_model_tensors
    return read_model_tensors(step_dir(checkpoints_root(out), step) / "state")


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("ddp", marks=slow)])
def test_fp16_overflow_is_skipped_and_the_scaler_resumes(tmp_path, tiny_llama, strategy):
    """Rank 1's gradients of step 3 are made non-finite (DIST_FT_FAULT=overflow:3:1). Every rank skips that update
    (the weights checkpointed after step 3 are those of step 2), the skip is logged and counted, and the scale
    halves. A second run stops after step 4 and resumes: the scaler (scale and growth tracker) and the skip count
    come back exactly, and steps 5-6 match the uninterrupted run."""
    env = {"DIST_FT_FAULT": "overflow:3:1"}
    ckpt = {"checkpoint": {"every_steps": 1, "keep_last": None}}
    whole, path = _recipe(tmp_path, "whole", tiny_llama, strategy=strategy, precision="fp16-mixed", **ckpt)
    res = _launch(path, env=env)
    records = read_metrics(whole)[0]
    assert [r["skipped"] for r in records] == [False, False, True, False, False, False]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert [r["loss_scale"] for r in records] == [65536.0] * 2 + [32768.0] * 4
    assert res.stdout.count("update skipped") == 1 and "loss scale lowered to 32768" in res.stdout
    end = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["skipped_steps"] == 1
    before, skipped, after = _weights(whole, 2), _weights(whole, 3), _weights(whole, 4)
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # no update at step 3, on any shard
    assert not all(torch.equal(skipped[k], after[k]) for k in skipped)
    assert _scaler(whole, 4) == ({"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                  "growth_interval": 2000, "_growth_tracker": 1}, 1)

    split, path = _recipe(tmp_path, "split", tiny_llama, strategy=strategy, precision="fp16-mixed",
                          training={"stop_after_steps": 4}, **ckpt)
    _launch(path, env=env)
    assert _scaler(split, 4) == _scaler(whole, 4)
    _launch(path, "checkpoint.resume=auto", "training.stop_after_steps=null", env=env)
    resumed = read_metrics(split)[0]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]
    assert [(r["loss_scale"], r["skipped_steps"]) for r in resumed] == \
        [(r["loss_scale"], r["skipped_steps"]) for r in records]
    assert _scaler(split, 6) == _scaler(whole, 6) and _scaler(whole, 6)[0]["_growth_tracker"] == 3


def test_hardware_problem_for_fp16():
    from dist_ft.distributed.precision import hardware_problem
    for strategy in ("ddp", "fsdp"):
        assert hardware_problem("fp16-mixed", strategy=strategy, cuda_available=False, cpu_fp16=False) is None
    problem = hardware_problem("fp16-mixed", strategy="zero3", cuda_available=False, cpu_fp16=False)
    assert "oneDNN" in problem and "use strategy ddp or fsdp" in problem and "bf16-mixed with zero3" in problem
    assert hardware_problem("fp16-mixed", strategy="zero3", cuda_available=False, cpu_fp16=True) is None
    assert hardware_problem("fp16-mixed", strategy="zero3", cuda_available=True, capability=(7, 0)) is None


def test_overflow_fault_point(monkeypatch):
    from dist_ft import faults
    monkeypatch.setenv("DIST_FT_FAULT", "overflow:3:1")
    assert faults.active("overflow", 3, 1)
    assert not faults.active("overflow", 3, 0) and not faults.active("overflow", 2, 1)
    assert not faults.active("crash", 3, 1)
    faults.inject("overflow", 3, 1)  # carried out by the trainer, not by inject: nothing happens here
    monkeypatch.setenv("DIST_FT_FAULT", "overflow:4")
    assert faults.active("overflow", 4, 0) and faults.active("overflow", 4, 1)
