"""Checkpoints: exact resume per strategy and method, world-size changes, cross-strategy, crashes, export.

Every run here is real: 2 gloo processes (or 1), a tiny Llama, fp32. "Straight" runs train 12 steps in one go;
"stopped" runs stop after 6 (training.stop_after_steps, which writes a checkpoint) and are started again with
checkpoint.resume: auto. LoRA runs keep dropout on, so the RNG states must come back too.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_final, read_metrics, run_cli, tiny_recipe, write_recipe

STEPS, HALF = 12, 6
METHODS = {"full": {"kind": "full"},
           "lora": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
           "lora-nodrop": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}


def _recipe(tmp_path, name, model, *, strategy="ddp", method="full", micro=2, accum=1, **sections):
    out = tmp_path / name
    training = {"max_steps": STEPS, "micro_batch_size": micro, "gradient_accumulation_steps": accum,
                "learning_rate": 2e-3, **sections.pop("training", {})}
    r = tiny_recipe(model, out, method=METHODS[method], training=training,
                    distributed={"strategy": strategy, **sections.pop("distributed", {})},
                    checkpoint={"every_steps": HALF, "keep_last": None, **sections.pop("checkpoint", {})},
                    **sections)
    return out, write_recipe(tmp_path / f"{name}.yaml", r)


def _train(path, nproc, *extra, ok=True):
    args = ["launch", str(path), "--nproc-per-node", str(nproc), *extra] if nproc > 1 else ["train", str(path),
                                                                                             *extra]
    res = run_cli(*args)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)[0]}


def _weights(out) -> dict[str, torch.Tensor]:
    return read_final(out)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama):
    """Uninterrupted 2-process runs, made on first use and shared."""
    cache, base = {}, tmp_path_factory.mktemp("straight")

    def get(strategy, method):
        if (strategy, method) not in cache:
            out, path = _recipe(base, f"{strategy}-{method}", tiny_llama, strategy=strategy, method=method)
            _train(path, 2)
            cache[strategy, method] = out
        return cache[strategy, method]

    return get


# CI time: full fine-tuning's resume under DDP, FSDP2, ZeRO-2 and ZeRO-3, and the LoRA ones of DDP and ZeRO-2, in the
# slow suite. FSDP2's and ZeRO-3's LoRA resumes stay in CI (ZeRO-2 saves and loads through the same DeepSpeed engine
# calls, ZeRO-3's full one too); DDP's exact resume stays in CI through test_faults' SIGTERM and test_slurm's USR1.
@pytest.mark.parametrize("strategy, method", [
    pytest.param(s, m, marks=pytest.mark.slow) if (s, m) in (("ddp", "full"), ("fsdp", "full"), ("zero2", "full"),
                                                           ("zero2", "lora"), ("zero3", "full"), ("ddp", "lora"))
    else (s, m)
    for s in ("ddp", "fsdp", "zero2", "zero3") for m in ("full", "lora")], ids=lambda v: v)
def test_exact_resume(tmp_path, tiny_llama, straight, strategy, method):
    ref = straight(strategy, method)
    out, path = _recipe(tmp_path, "run", tiny_llama, strategy=strategy, method=method)
    _train(path, 2, f"training.stop_after_steps={HALF}")
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{HALF:08d}"]
    res = _train(path, 2, "checkpoint.resume=auto")
    assert f"resuming from {out / 'checkpoints' / f'step-{HALF:08d}'}" in res.stdout
    a, b = _losses(ref), _losses(out)
    assert sorted(b) == list(range(1, STEPS + 1))  # the first half's records are kept, none duplicated
    for s in range(HALF + 1, STEPS + 1):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    assert _max_diff(_weights(ref), _weights(out)) <= 1e-6
    start = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in l]
    assert len(start) == 2 and start[0]["run_id"] == start[1]["run_id"]  # the telemetry run id carries over


# CI time: ZeRO-3's 2-to-1 in the slow suite (its 1-to-2 converts through the same universal path and stays), DDP's
# both (it writes the same distributed checkpoint as FSDP2, whose 1-to-2 reshards it and stays) and FSDP2's 2-to-1.
@pytest.mark.parametrize("strategy,direction", [
    pytest.param(s, d, marks=pytest.mark.slow) if (s, d) in (("zero3", "2to1"), ("ddp", "2to1"), ("fsdp", "2to1"),
                                                           ("ddp", "1to2"))
    else (s, d)
    for s in ("ddp", "fsdp", "zero3") for d in ("2to1", "1to2")]
    + [pytest.param("zero2", "2to1", marks=pytest.mark.slow)])  # CI time: the same universal path as ZeRO-3's 1-to-2
def test_world_size_change(tmp_path, tiny_llama, straight, strategy, direction):
    ref = straight(strategy, "full")
    # The same global batch (4) either way: 2 ranks x 2, or 1 rank x 2 x 2 accumulation steps.
    one = {"micro": 2, "accum": 2}
    first, second = (2, 1) if direction == "2to1" else (1, 2)
    out, path = _recipe(tmp_path, "run", tiny_llama, strategy=strategy, **(one if first == 1 else {}))
    _train(path, first, f"training.stop_after_steps={HALF}")
    _, path2 = _recipe(tmp_path, "run", tiny_llama, strategy=strategy, checkpoint={"resume": "auto"},
                       **(one if second == 1 else {}))
    _train(path2, second)
    a, b = _losses(ref), _losses(out)
    for s in range(HALF + 1, STEPS + 1):
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])


def test_fsdp_checkpoint_continues_under_ddp(tmp_path, tiny_llama, straight):
    ref = straight("fsdp", "full")
    out, path = _recipe(tmp_path, "run", tiny_llama, strategy="fsdp")
    _train(path, 2, f"training.stop_after_steps={HALF}")
    _train(path, 2, "checkpoint.resume=auto", "distributed.strategy=ddp")
    a, b = _losses(ref), _losses(out)
    for s in range(HALF + 1, STEPS + 1):
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])


def test_deepspeed_checkpoint_under_fsdp_is_refused(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, "run", tiny_llama, strategy="zero2")
    _train(path, 2, f"training.stop_after_steps={HALF}")
    res = _train(path, 2, "checkpoint.resume=auto", "distributed.strategy=fsdp", ok=False)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "written by strategy zero2" in text and "dist-ft export" in text, text[-2000:]
    assert not (out / "final").exists()


# ---------------------------------------------------------------------------------------------- crashes

def test_crash_truncation_and_missing_manifest(tmp_path, tiny_llama, straight):
    """Killed while writing step 9: resume from 6. Then a truncated shard in 6 and a deleted manifest in 3:
    each named, and the run falls back to the newest good one."""
    ref = straight("ddp", "full")
    out, path = _recipe(tmp_path, "run", tiny_llama, checkpoint={"every_steps": 3})
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "checkpoint-write:9"})
    assert res.returncode != 0
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names == [".tmp-step-00000009", "step-00000003", "step-00000006"], names
    assert not (out / "final").exists()

    # A damaged step 6 and a step 3 without its manifest: an explicit resume names the file and refuses.
    shard = next((root / "step-00000006" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    res = _train(path, 2, f"checkpoint.resume={root / 'step-00000006'}", ok=False)
    assert res.returncode != 0 and str(shard) in res.stderr and "truncated" in res.stderr, res.stderr[-2000:]

    # Auto: step 9 (incomplete) and step 6 (truncated) are skipped with their reasons; step 3 resumes.
    res = _train(path, 2, "checkpoint.resume=auto")
    text = res.stdout + res.stderr
    assert ".tmp-step-00000009" in text and str(shard) in text, text[-3000:]
    assert f"resuming from {root / 'step-00000003'}" in res.stdout
    a, b = _losses(ref), _losses(out)
    for s in range(4, STEPS + 1):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])

    # A deleted manifest: that checkpoint is incomplete, never used.
    (root / "step-00000012" / "manifest.json").unlink()
    res = _train(path, 2, f"checkpoint.resume={root / 'step-00000012'}", ok=False)
    assert res.returncode != 0 and "manifest.json: missing" in res.stderr


def test_corrupted_shard_is_named(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, "run", tiny_llama, training={"max_steps": 3}, checkpoint={"every_steps": 3})
    _train(path, 1)
    ckpt = out / "checkpoints" / "step-00000003"
    shard = next((ckpt / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    res = _train(path, 1, f"checkpoint.resume={ckpt}", "training.max_steps=6", ok=False)
    assert res.returncode != 0 and str(shard) in res.stderr and "corrupted" in res.stderr, res.stderr[-2000:]


def test_resume_refuses_another_model(tmp_path, tiny_llama, tiny_qwen2):
    out, path = _recipe(tmp_path, "run", tiny_llama, training={"max_steps": 3}, checkpoint={"every_steps": 3})
    _train(path, 1)
    res = _train(path, 1, "checkpoint.resume=auto", f"model.path={tiny_qwen2}", "training.max_steps=6", ok=False)
    assert res.returncode != 0 and "different model" in res.stderr, res.stderr[-2000:]


def test_keep_last(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, "run", tiny_llama, training={"max_steps": 8},
                        checkpoint={"every_steps": 2, "keep_last": 2})
    _train(path, 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006", "step-00000008"]
    manifest = json.loads((out / "checkpoints" / "step-00000008" / "manifest.json").read_text())
    assert manifest["step"] == 8 and manifest["samples_seen"] == 8 * 2 and manifest["files"]
    for name, meta in manifest["files"].items():
        assert (out / "checkpoints" / "step-00000008" / name).stat().st_size == meta["bytes"]


def test_resume_from_a_path_that_does_not_exist(tmp_path, tiny_llama):
    _, path = _recipe(tmp_path, "run", tiny_llama, checkpoint={"resume": str(tmp_path / "nowhere")})
    res = run_cli("check", str(path))
    assert res.returncode == 2 and "checkpoint.resume" in res.stderr and "nowhere" in res.stderr


# ---------------------------------------------------------------------------------------------- export

def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("strategy", [pytest.param("fsdp", marks=pytest.mark.slow), "zero3"])  # CI time
def test_export_round_trip(tmp_path, tiny_llama, strategy):
    """Full fine-tuning: the export of the last checkpoint gives the trained model's logits."""
    from transformers import AutoModelForCausalLM
    out, path = _recipe(tmp_path, "run", tiny_llama, strategy=strategy, training={"max_steps": 4},
                        checkpoint={"every_steps": 4})
    _train(path, 2)
    res = run_cli("export", str(out / "checkpoints" / "step-00000004"), str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr[-3000:]
    trained = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    batch = {"input_ids": torch.randint(3, 200, (2, 16))}
    assert torch.allclose(_logits(trained, batch), _logits(exported, batch), atol=1e-5)
    assert not torch.allclose(_logits(base, batch), _logits(exported, batch), atol=1e-3)  # it did train
    # A second export never writes over the first.
    res = run_cli("export", str(out), str(tmp_path / "hf"))
    assert res.returncode == 2 and "not empty" in res.stderr


# CI time: DDP's and FSDP2's cases in the slow suite (ZeRO-3's gathered export stays: the sharded gather is what can
# go wrong, and FSDP2's gathers run in every final save of the CI suite).
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow),
                                      pytest.param("fsdp", marks=pytest.mark.slow), "zero3"])
def test_export_lora_adapter_and_merge(tmp_path, tiny_llama, strategy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, path = _recipe(tmp_path, "run", tiny_llama, strategy=strategy, method="lora-nodrop",
                        training={"max_steps": 4}, checkpoint={"every_steps": 4})
    _train(path, 2)
    ck = out / "checkpoints" / "step-00000004"
    for args, name in (([], "adapter"), (["--merge-lora", "--dtype", "fp32"], "merged")):
        res = run_cli("export", str(ck), str(tmp_path / name), *args)
        assert res.returncode == 0, res.stderr[-3000:]
    batch = {"input_ids": torch.randint(3, 200, (2, 16))}
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out / "final").eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    lora_b = [v for k, v in load_file(tmp_path / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # the adapter is not empty
    ref = _logits(trained, batch)
    assert torch.allclose(ref, _logits(adapter, batch), atol=1e-5)
    assert torch.allclose(ref, _logits(merged, batch), atol=1e-4)


def test_export_bf16_from_finished_run(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, "run", tiny_llama, training={"max_steps": 2}, checkpoint={"every_steps": 0})
    _train(path, 1)
    res = run_cli("export", str(out), str(tmp_path / "hf16"), "--dtype", "bf16")
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors import safe_open
    with safe_open(tmp_path / "hf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
