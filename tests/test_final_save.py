"""final/ written one unit at a time (issue 24): what it holds, what it costs rank 0, and what `dist-ft plan` says.

- equality: 2-rank FSDP2, ZeRO-3 and DDP full fine-tunes (and FSDP2 with final: best) write a folder that
  from_pretrained loads, with the names save_pretrained gives, equal tensor by tensor to the trained state
  consolidated from the run's own checkpoint by `dist-ft export`'s reader (another code path: DCP / DeepSpeed's
  zero_to_fp32).
- peak: on the 130m Llama shape (12 blocks, a block ~1/12 of the model), rank 0's resident memory during the final
  save stays within one gathered unit of its training peak (tests/final_save_probe.py samples it). The old
  whole-model gather measured +103 MiB (FSDP2) and +150 MiB (ZeRO-3) above the training peak here.
- plan: the final-save row is one unit (the largest block or embedding) for a full recipe, the adapter for LoRA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, tiny_recipe, write_recipe

MIB = 2 ** 20


def _final_event(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("event") == "final_save")


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(folder / name)
        assert {k for k, f in index["weight_map"].items() if f == name} == set(part), name
        tensors |= part
    return tensors


# ------------------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("strategy,final", [("fsdp", "last"), ("zero3", "last"), ("ddp", "last"), ("fsdp", "best")])
def test_final_folder_equals_the_trained_state(tmp_path, tiny_llama, strategy, final):
    from transformers import AutoModelForCausalLM

    from dist_ft.checkpoint import store
    from dist_ft.checkpoint.export import load_trained

    out = tmp_path / "run"
    ck = {"every_steps": 1 if final == "best" else 4}
    if final == "best":  # the worst eval loss is the "best": an early step, never the last (test_evaluation.py)
        ck |= {"keep_last": 1, "keep_best": "eval_loss", "best_mode": "max", "final": "best"}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tiny_llama, out, training={"max_steps": 4, "eval_every": 1 if final == "best" else 0},
        distributed={"strategy": strategy}, checkpoint=ck))
    res = run_cli("launch", str(path), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    step = json.loads((out / "checkpoints" / "best.json").read_text())["step"] if final == "best" else 4
    assert step < 4 or final == "last"
    reference, _ = load_trained(store.step_dir(store.checkpoints_root(out), step))
    expected = reference.state_dict()
    # The names save_pretrained writes for that model (tied embeddings once): the old final/ layout.
    reference.save_pretrained(tmp_path / "ref", safe_serialization=True)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        names = set(f.keys())

    written = _read_folder(out / "final")
    assert set(written) == names
    # 2 blocks, the embeddings (tied: the head is the same tensor), the final norm: one file each.
    index = json.loads((out / "final" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    for k, v in written.items():
        assert torch.equal(v, expected[k]), k
    loaded = AutoModelForCausalLM.from_pretrained(out / "final")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in written.items())  # it trained: the comparison can fail
    if final == "best":  # and it is not simply the last step
        last, _ = load_trained(store.step_dir(store.checkpoints_root(out), 4))
        assert any(not torch.equal(v, last.state_dict()[k]) for k, v in written.items())
    event = _final_event(out)
    assert event["files"] == 4 and event["largest_unit_mb"] < event["mb"] / 2


def test_save_units_group_blocks_embeddings_and_the_rest(tiny_llama):
    """Pure: the units hf_folder writes, on a tied and an untied model; a tied head is written once."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_ft.checkpoint.hf_folder import save_units

    tied = AutoModelForCausalLM.from_pretrained(tiny_llama)
    units = {u.name: u.tensors for u in save_units(tied)}
    assert list(units) == ["embed", "block:0", "block:1", "rest"]
    assert units["embed"] == ["model.embed_tokens.weight"] and units["rest"] == ["model.norm.weight"]
    assert all(n.startswith("model.layers.1.") for n in units["block:1"]) and len(units["block:1"]) == 9
    untied = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=100, tie_word_embeddings=False))
    units = {u.name: u.tensors for u in save_units(untied)}
    assert list(units) == ["embed", "block:0", "block:1", "block:2", "rest", "head"]
    assert units["head"] == ["lm_head.weight"]
    assert sum(len(t) for t in units.values()) == len(untied.state_dict())


# ------------------------------------------------------------------------------------------------ peak

@pytest.fixture(scope="module")
def llama_130m(tmp_path_factory) -> Path:
    from dist_ft.testing import make_model
    return make_model(tmp_path_factory.mktemp("models") / "llama-130m", arch="llama", size="130m")


# Beyond the unit itself: the next unit's all-gather buffers and the config/tokenizer writing (measured: FSDP2's
# save grows ~2 units + 23 MiB above its start, ZeRO-3's ~1 unit).
SLACK_MIB = 48


@pytest.mark.parametrize("strategy,method", [
    ("fsdp", "full"),
    pytest.param("zero3", "full", marks=pytest.mark.slow),
    pytest.param("fsdp", "lora", marks=pytest.mark.slow),
    pytest.param("zero3", "lora", marks=pytest.mark.slow),
])
def test_final_save_peak_stays_within_one_unit_of_training(tmp_path, llama_130m, strategy, method):
    import os
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        llama_130m, out, data={"max_length": 32, "max_train_samples": 16, "max_eval_samples": 4},
        training={"max_steps": 2, "micro_batch_size": 1}, method={"kind": method},
        distributed={"strategy": strategy}))
    # Every allocation of 64 KiB or more gets its own mapping, returned when freed: the resident set then follows
    # the live tensors, instead of heap that training freed and glibc kept (which would hide what the save takes).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(REPO / "tests" / "final_save_probe.py"), str(path), str(tmp_path / "probe")],
                         capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "probe" / "rank-0.json").read_text())
    event = _final_event(out)
    unit = event["largest_unit_mb"]
    print(f"\n[final save] {strategy} {method}: training peak {m['train_peak_mb']:.0f} MiB, save peak "
          f"{m['save_peak_mb']:.0f} MiB (started at {m['save_start_mb']:.0f}), largest unit {unit:.1f} MiB of "
          f"{event['mb']:.1f} MiB written")
    model_mb = sum(f.stat().st_size for f in llama_130m.glob("*.safetensors")) / MIB
    assert unit < model_mb / 10  # a block is ~1/12 of the model; the adapter is smaller still
    assert event["largest_unit"] == ("adapter" if method == "lora" else "block:0")
    assert m["save_peak_mb"] <= m["train_peak_mb"] + unit + SLACK_MIB, m
    # What the save itself added: at most about two units, far from the whole model.
    assert m["save_peak_mb"] - m["save_start_mb"] <= 2 * unit + SLACK_MIB, m
    assert (out / "final" / ("adapter_config.json" if method == "lora" else "config.json")).is_file()


# ------------------------------------------------------------------------------------------------ plan

def _plan(tmp_path, strategy, method):
    from dist_ft import plan as P
    from dist_ft.config import load_recipe
    recipe = load_recipe(None, ["model.path=builtin:llama-3-8b", f"method.kind={method}",
                                f"distributed.strategy={strategy}", "distributed.precision=bf16-mixed"])
    return P.make_plan(recipe, P.make_cluster(nodes=1, gpus_per_node=8, gpu="H100"), find_max=False)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3", "ddp"])
def test_plan_counts_the_final_save(tmp_path, strategy):
    """Llama-3-8B: a block has 218,112,000 parameters, each (untied) embedding 128,256 x 4,096 = 525,336,576; the
    save holds the largest unit, in the weights' stored dtype (fp32 under FSDP2/DDP, bf16 under ZeRO)."""
    block = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    embed = 128256 * 4096
    assert block == 218_112_000
    width = 2 if strategy == "zero3" else 4
    plan = _plan(tmp_path, strategy, "full")
    row = next(r for r in plan.rows if r.key == "final_save")
    assert row.phase == "save" and row.cpu == max(block, embed) * width
    assert row.device == (row.cpu if strategy != "ddp" else 0)  # DDP holds it already; the others gather it
    assert plan.save == row.device
    runtime = sum(r.device for r in plan.rows if r.phase == "runtime")
    assert plan.device_total == pytest.approx(plan.resident + max(plan.fwd_bwd, plan.step, plan.save) + runtime)
    lora = _plan(tmp_path, strategy, "lora")
    row = next(r for r in lora.rows if r.key == "final_save")
    assert row.cpu == lora.counts.n_trainable * width and row.cpu < block  # the adapter alone
