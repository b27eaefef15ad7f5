"""The checkpoint bookkeeping on its own, in this process: manifests, listing, pruning, RNG, adapter checks."""

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_ft import checkpoint as ckpt


def _fake_checkpoint(root, step, *, complete=True, payload=b"x" * 100):
    folder = ckpt.step_dir(root, step) if complete else root / f"{ckpt.TMP_PREFIX}{step:08d}"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "shard.bin").write_bytes(payload)
    if complete:
        files = {"state/shard.bin": {"bytes": len(payload), "sha256": ckpt._sha256(folder / "state" / "shard.bin")}}
        (folder / ckpt.MANIFEST).write_text(json.dumps({"format": ckpt.FORMAT, "step": step, "files": files}))
    return folder


def test_listing_skips_incomplete_and_damaged(tmp_path):
    for s in (2, 4):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 6, complete=False)
    bad = _fake_checkpoint(tmp_path, 5)
    (bad / "state" / "shard.bin").write_bytes(b"x" * 10)
    gone = _fake_checkpoint(tmp_path, 3)
    (gone / "state" / "shard.bin").unlink()
    complete, incomplete = ckpt.list_checkpoints(tmp_path)
    assert [c.step for c in complete] == [4, 2]
    problems = {c.step: c.problem for c in incomplete}
    assert "incomplete" in problems[6]
    assert "10 bytes, the manifest says 100" in problems[5]
    assert "shard.bin: missing" in problems[3]


def test_prune_keeps_the_newest_complete(tmp_path):
    for s in (2, 4, 6):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 3, complete=False)
    ckpt.prune(tmp_path, keep_last=1, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006"]
    # The newest complete one survives even when a newer write is incomplete.
    _fake_checkpoint(tmp_path, 8, complete=False)
    ckpt.prune(tmp_path, keep_last=1, log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step-00000008", "step-00000006"]


def test_choose_resume_explicit_errors_name_the_file(tmp_path):
    folder = _fake_checkpoint(tmp_path, 2)
    (folder / "state" / "shard.bin").write_bytes(b"y")
    with pytest.raises(ckpt.CheckpointError, match="shard.bin: 1 bytes"):
        ckpt.choose_resume(str(folder), tmp_path, print)
    (folder / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest.json: missing"):
        ckpt.choose_resume(str(folder), tmp_path, print)


def test_checksum_finds_a_flipped_byte(tmp_path):
    folder = _fake_checkpoint(tmp_path, 2)
    manifest = ckpt.read_manifest(folder)
    assert ckpt.checksum_problems(folder, manifest) == []
    (folder / "state" / "shard.bin").write_bytes(b"x" * 99 + b"z")
    assert "corrupted" in ckpt.checksum_problems(folder, manifest)[0]


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(ckpt.rng_state()))  # JSON all the way: nothing pickled
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_compatibility_problems_name_the_fix():
    meta = {"model_config_sha": "a", "method": "lora", "state_format": "dcp", "strategy": "fsdp"}
    assert ckpt.compatibility_problems(dict(meta), meta) == []
    p = ckpt.compatibility_problems({**meta, "state_format": "deepspeed", "strategy": "zero3"}, meta)
    assert len(p) == 1 and "distributed.strategy: zero3" in p[0] and "dist-ft export" in p[0]


class _FakeStrategy:
    def __init__(self, stored):
        self.stored = stored

    def trainable_state(self):
        return {"lora_A": torch.ones(2, 3), "lora_B": torch.full((3, 2), 0.5)}

    def read_trainable(self, folder):
        return self.stored


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("stored,message", [
    ({"lora_A": torch.ones(2, 3), "lora_B": torch.empty(0)}, "lora_B is empty"),
    ({"lora_A": torch.ones(2, 3)}, "lora_B is missing"),
    ({"lora_A": torch.ones(2, 3), "lora_B": torch.zeros(3, 2)}, "differs from the live weights"),
])
def test_adapter_verification(tmp_path, one_process_group, stored, message):
    class Topo:
        is_main = True
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt._verify_adapter(tmp_path, _FakeStrategy(stored), Topo())
    good = {"lora_A": torch.ones(2, 3), "lora_B": torch.full((3, 2), 0.5)}
    ckpt._verify_adapter(tmp_path, _FakeStrategy(good), Topo())


def test_the_final_save_of_an_adapter_gathers_only_its_trainable_tensors(tmp_path, tiny_llama):
    """final/ of a LoRA run is written from the trainable tensors alone: the whole model is never gathered on one
    rank (a 7B base would not fit there), and the folder loads back as the model that trained."""
    import datetime
    import types

    import torch.distributed as dist
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_ft.checkpoint.manager import CheckpointManager
    from dist_ft.config import recipe_from_dict

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # an adapter that changes the output

    def whole(*a, **k):
        raise AssertionError("the whole model was gathered for an adapter's final save")

    strategy = types.SimpleNamespace(name="ddp", state_format="dcp", unwrap=lambda: model, full_state_dict=whole,
                                     trainable_state=lambda: {n: p.detach().clone() for n, p in
                                                              model.named_parameters() if p.requires_grad})
    topo = types.SimpleNamespace(is_main=True, rank=0, world_size=1)
    recipe = recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_llama)},
                               "method": {"kind": "lora"}})
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    try:
        manager = CheckpointManager(recipe, topo=topo, strategy=strategy, tokenizer=AutoTokenizer.from_pretrained(
            tiny_llama), model_path=tiny_llama, log=lambda m: None)
        final = manager.save_final()
    finally:
        dist.destroy_process_group()
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), final).eval()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)
