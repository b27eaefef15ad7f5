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
    pytest.param("zero3", "bf16-mixed", marks=slow), pytest.param("zero1", "bf16-mixed", marks=slow),
    pytest.param("zero1", "bf16-true", marks=slow), pytest.param("ddp", "bf16-mixed", marks=slow),
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


def _lora_model(path, *, dora=False):
    import peft
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=dora,
                          init_lora_weights=False)  # B != 0: the adapters take part in the loss and its gradient
    return peft.get_peft_model(model, cfg)


def _loss_and_grads(model, saved: list | None = None):
    """Loss and adapter gradients under bf16 autocast; `saved` collects the distinct tensors kept for backward."""
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if saved is not None:
        saved.append(sum(seen.values()))
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_linears_in_the_compute_dtype_compute_what_autocast_computes(tiny_llama):
    """bf16-mixed under DDP stores an adapter method's frozen Linear weights in bf16, the copy autocast makes of them
    every step: the loss and every adapter gradient are bit-identical to autocast over the fp32 weights, the
    tied embedding (and so the residual stream) stays fp32, and the frozen Linears take half the memory."""
    from types import SimpleNamespace

    from dist_ft.distributed.precision import frozen_linears_in_compute_dtype, precision_plan

    lora = SimpleNamespace(kind="lora", lora=SimpleNamespace(use_dora=False))
    ref, cast = _lora_model(tiny_llama), _lora_model(tiny_llama)
    before = sum(p.numel() * p.element_size() for p in cast.parameters())
    n = frozen_linears_in_compute_dtype(cast, precision_plan("bf16-mixed"), lora)
    base_linears = [m for name, m in cast.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name
                    and m.weight is not cast.get_input_embeddings().weight]
    assert n == len(base_linears) > 0 and all(m.weight.dtype == torch.bfloat16 for m in base_linears)
    assert cast.get_input_embeddings().weight.dtype == torch.float32  # tied to the head in this tiny model
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)
    saved = sum(m.weight.numel() * 2 for m in base_linears)
    assert before - sum(p.numel() * p.element_size() for p in cast.parameters()) == saved
    (loss_ref, g_ref), (loss, g) = _loss_and_grads(ref), _loss_and_grads(cast)
    assert torch.equal(loss, loss_ref) and g.keys() == g_ref.keys()
    assert all(torch.equal(g[k], g_ref[k]) for k in g), max((g[k] - g_ref[k]).abs().max().item() for k in g)
    # The projections' inputs cast once per norm (and peft's fp32 round trip of LoRA inputs off): the same bits
    # again, and fewer bytes kept for the backward than autocast's one copy per matmul.
    from dist_ft.distributed.precision import autocast_inputs_cast_once
    from peft.tuners.lora import LoraLayer
    layers = cast.get_base_model().config.num_hidden_layers
    lora_layers = sum(isinstance(m, LoraLayer) for m in cast.modules())
    assert lora_layers == 3 * layers  # q, v, up
    assert autocast_inputs_cast_once(cast, precision_plan("bf16-mixed")) == lora_layers + 2 * layers
    before, after = [], []
    _loss_and_grads(ref, before)
    loss_once, g_once = _loss_and_grads(cast, after)
    # The forward is the same to the bit; the gradient reaching each norm is now summed over its consumers in bf16
    # (as everywhere under FSDP2's bf16 policy or bf16-true), not fp32: within bf16's rounding.
    assert torch.equal(loss_once, loss_ref)
    worst = max(float((g_once[k] - g_ref[k]).norm() / g_ref[k].norm()) for k in g)
    print(f"adapter gradients, shared bf16 inputs against autocast's per-matmul copies: worst relative {worst:.1e}")
    assert 0 < worst < 2e-2, worst
    assert after[0] < before[0], (after, before)
    assert autocast_inputs_cast_once(_lora_model(tiny_llama), precision_plan("fp32")) == 0
    # Where fp32 values are read (full and partial save the base; DoRA norms it) or there is no autocast: untouched.
    for method, precision in [(SimpleNamespace(kind="full"), "bf16-mixed"), (SimpleNamespace(kind="partial"),
                              "bf16-mixed"), (lora, "fp32"), (lora, "bf16-true"),
                              (SimpleNamespace(kind="lora", lora=SimpleNamespace(use_dora=True)), "bf16-mixed")]:
        model = _lora_model(tiny_llama, dora=getattr(getattr(method, "lora", None), "use_dora", False))
        assert frozen_linears_in_compute_dtype(model, precision_plan(precision), method) == 0
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_ddp_bf16_mixed_lora_runs_on_two_ranks_with_the_frozen_base_in_bf16(tmp_path, tiny_llama):
    """The same through `dist-ft launch` (DDP broadcasts and buckets a model of mixed dtypes): 2 ranks against 1
    process with the whole global batch, both bf16-mixed LoRA, and the plan's parameter bytes as stored."""
    from dist_ft import plan as P
    from dist_ft.config import load_recipe

    lora = {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}
    out1, p1 = _recipe(tmp_path, "one", tiny_llama, precision="bf16-mixed", micro=4, method=lora)
    res = run_cli("train", str(p1))
    assert res.returncode == 0, res.stderr[-3000:]
    out2, p2 = _recipe(tmp_path, "two", tiny_llama, precision="bf16-mixed", method=lora)
    assert "frozen Linear weights stored in bfloat16" in _launch(p2).stdout
    one, two = ([r["loss"] for r in read_metrics(o)[0]] for o in (out1, out2))
    assert _worst(two, one) < 1e-3, (two, one)
    recipe = load_recipe(p2, [])
    plan = P.make_plan(recipe, P.make_cluster(nodes=1, gpus_per_node=2, gpu="cpu"), find_max=False, timed=False)
    from dist_ft.model import ModelBuilder, load_tokenizer
    from dist_ft.distributed.precision import frozen_linears_in_compute_dtype, precision_plan
    model = ModelBuilder(recipe, tiny_llama, num_labels=None, label_names=[], pad_token_id=load_tokenizer(
        tiny_llama).pad_token_id, dtype=torch.float32, attn_implementation="sdpa").build()
    assert frozen_linears_in_compute_dtype(model, precision_plan("bf16-mixed"), recipe.method) > 0
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    assert next(r for r in plan.rows if r.key == "parameters").device == stored


@pytest.fixture
def flash_flag():
    before = torch.backends.cuda.flash_sdp_enabled()
    yield
    torch.backends.cuda.enable_flash_sdp(before)


def _sdpa_ops(dtype) -> set[str]:
    import torch.nn.functional as F
    from torch.profiler import profile

    q = torch.randn(2, 3, 16, 8, dtype=dtype, requires_grad=True)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    with profile() as p:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask).sum().backward()
    return {e.name for e in p.events() if "scaled_dot_product" in e.name}


def test_short_rows_in_16_bits_on_a_cpu_take_sdpas_math_kernel(flash_flag):
    """The trainer's kernel choice: math for bf16/fp16 rows of <= 128 tokens on a CPU (its flash backward is slower
    there), the flash kernel otherwise; checked on the op torch actually runs."""
    from dist_ft.model import CPU_MATH_SDPA_MAX_LENGTH, choose_cpu_sdpa_kernel

    cpu = torch.device("cpu")
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash in _sdpa_ops(torch.bfloat16)
    for kwargs in [dict(compute_dtype=torch.float32, max_length=64),                    # fp32: flash is faster
                   dict(compute_dtype=torch.bfloat16, max_length=CPU_MATH_SDPA_MAX_LENGTH + 1)]:  # long rows
        assert choose_cpu_sdpa_kernel("sdpa", device=cpu, **kwargs) is None
    assert choose_cpu_sdpa_kernel("eager", device=cpu, compute_dtype=torch.bfloat16, max_length=64) is None
    assert choose_cpu_sdpa_kernel("sdpa", device=torch.device("cuda", 0), compute_dtype=torch.bfloat16,
                                  max_length=64) is None
    assert flash in _sdpa_ops(torch.bfloat16)  # nothing changed so far
    why = choose_cpu_sdpa_kernel("sdpa", device=cpu, compute_dtype=torch.bfloat16, max_length=128)
    assert why and "math" in why
    ops = _sdpa_ops(torch.bfloat16)
    assert flash not in ops and "aten::_scaled_dot_product_attention_math" in ops


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("zero2", marks=slow)])
def test_bf16_true_lora_trains_16_bit_adapters_on_every_strategy(tmp_path, tiny_llama, strategy):
    """bf16-true is 16 bits throughout, the adapters too: peft makes them fp32 beside a bf16 base, which DDP and
    FSDP2 kept (fp32 adapters, gradients and optimizer state) while DeepSpeed casts its module to bf16. Now the same
    recipe trains bf16 adapters on every backend: 2 ranks of `strategy` against 1 DDP process, within bf16's
    rounding, and both adapters saved in bf16 (as the plan counts them)."""
    lora = {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}
    out1, p1 = _recipe(tmp_path, "one", tiny_llama, precision="bf16-true", micro=4, method=lora)
    res = run_cli("train", str(p1))
    assert res.returncode == 0, res.stderr[-3000:]
    out2, p2 = _recipe(tmp_path, "two", tiny_llama, strategy=strategy, precision="bf16-true", method=lora)
    _launch(p2)
    one, two = ([r["loss"] for r in read_metrics(o)[0]] for o in (out1, out2))
    assert _worst(two, one) < 2e-2, (two, one)
    assert one[-1] < one[0]
    for out in (out1, out2):
        final = read_final(out)
        assert final and all("lora_" in k for k in final) and {t.dtype for t in final.values()} == {torch.bfloat16}
