"""Pretrained weights, proven loaded: the model dist_ft builds equals `AutoModelFor*.from_pretrained` of the same
folder tensor by tensor, on every build path (whole model for DDP, meta + row reads for FSDP2, DeepSpeed's
partitioned init for ZeRO-3), for an encoder saved as a bare base model (the bundled MiniLM is one: no `bert.`
prefix), decoders with tied and untied heads, and the real SmolLM2. Every parameter is either read from the folder
or one the recipe creates; anything else is refused by name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from dist_ft.config import load_recipe
from dist_ft.model import ModelBuilder
from dist_ft.weights import ModelWeights, WeightsError


def _tiny_bert(out: Path, *, bare: bool = True) -> Path:
    """A random BERT folder saved as a bare `BertModel` (tensor names without `bert.`), like the bundled MiniLM."""
    from transformers import BertConfig, BertModel

    from dist_ft.testing import make_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, 512)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_llama) -> Path:
    from dist_ft.testing import make_model
    return make_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", arch="gpt2", tokenizer_from=tiny_llama)


def _reference(path: Path, task: str, num_labels: int | None) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.float() for k, v in model.state_dict().items()}


def _recipe(tmp_path: Path, path: Path, task: str, method: str = "full"):
    f = tmp_path / "r.yaml"
    f.write_text(json.dumps({
        "output_dir": str(tmp_path / "run"), "model": {"path": str(path), "task": task},
        "data": {"format": "classification" if task == "sequence_classification" else "text"},
        "method": {"kind": method, "lora": {"r": 4, "alpha": 8}}}))
    return load_recipe(str(f))


def _builder(recipe, path: Path, num_labels: int | None = None) -> ModelBuilder:
    return ModelBuilder(recipe, path, num_labels=num_labels, label_names=[f"c{i}" for i in range(num_labels or 0)],
                        pad_token_id=0, dtype=torch.float32, attn_implementation="eager")


def _compare(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], created: set[str]) -> int:
    """Every reference tensor that the checkpoint holds is in `ours` with the same values; returns how many."""
    compared = 0
    for name, value in ref.items():
        if name in created:
            continue
        assert name in ours, (name, sorted(ours)[:5])
        assert torch.equal(ours[name].float(), value), name
        compared += 1
    return compared


def test_bare_encoder_folder_loads_into_a_classifier(tmp_path, tiny_bert):
    """The user's bug: a bare BertModel folder under BertForSequenceClassification (`bert.` prefix) was read as
    'missing' and every tensor re-initialised at random."""
    recipe = _recipe(tmp_path, tiny_bert, "sequence_classification")
    builder = _builder(recipe, tiny_bert, 3)
    model = builder.build()
    report = builder.load_report
    assert sorted(report.created) == ["classifier.bias", "classifier.weight"]
    assert len(report.loaded) == report.total == len(load_file(tiny_bert / "model.safetensors"))
    ref = _reference(tiny_bert, "sequence_classification", 3)
    n = _compare(model.state_dict(), ref, {"classifier.weight", "classifier.bias"})
    assert n == report.total
    assert "loaded" in report.describe() and f"of {report.total}" in report.describe()


def test_lora_on_a_bare_encoder_keeps_the_pretrained_base(tmp_path, tiny_bert):
    recipe = _recipe(tmp_path, tiny_bert, "sequence_classification", method="lora")
    builder = _builder(recipe, tiny_bert, 3)
    model = builder.build()
    ref = _reference(tiny_bert, "sequence_classification", 3)
    merged = {}
    from dist_ft.weights import canonical_name
    for name, value in model.state_dict().items():
        merged.setdefault(canonical_name(name), value)
    created = set(builder.load_report.created)
    assert any(".lora_A." in c for c in created) and "classifier.weight" in created
    assert _compare(merged, ref, created) == builder.load_report.total


def test_a_tensor_neither_in_the_folder_nor_created_is_refused_by_name(tmp_path, tiny_llama):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(tiny_llama / "model.safetensors")
    dropped = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in state.items() if k != dropped}, broken / "model.safetensors",
              metadata={"format": "pt"})
    recipe = _recipe(tmp_path, broken, "causal_lm")
    with pytest.raises(WeightsError, match=dropped.replace(".", r"\.")):
        _builder(recipe, broken).build()
    # The meta path (FSDP2, ZeRO-3) refuses it the same way, before a shard is filled.
    builder = _builder(recipe, broken)
    with pytest.raises(WeightsError, match="not in the checkpoint"):
        builder.weights(builder.build_meta())


def test_a_sharded_folder_is_read_through_its_index(tmp_path, tiny_llama):
    """Row reads on the meta path (FSDP2's) follow model.safetensors.index.json across shard files."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    builder = _builder(_recipe(tmp_path, sharded, "causal_lm"), sharded)
    model = builder.build_meta()
    weights = builder.weights(model)
    ref = _reference(sharded, "causal_lm", None)
    for name, p in model.named_parameters():
        assert torch.equal(weights.rows(name, p.shape, 0, p.shape[0], torch.float32), ref[name]), name
    assert len(builder.load_report.loaded) == len(dict(model.named_parameters())) and not builder.load_report.created


def test_prefix_resolution_both_ways(tiny_llama):
    """A head model over a bare folder, and a bare model over a head folder: both resolve, as in from_pretrained."""
    w = ModelWeights(tiny_llama, seed=0, prefix="model")
    assert w.has("model.layers.0.self_attn.q_proj.weight")
    assert w.has("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")  # through peft
    assert not w.has("model.layers.0.self_attn.q_proj.lora_A.default.weight")
    bare = ModelWeights(tiny_llama, seed=0, prefix="model")
    assert bare._lookup("layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


def _probe(strategy: str, out: Path, cases: list) -> list[tuple[dict, dict, dict]]:
    """Build each (folder, task, num_labels) case on 2 ranks through `strategy`'s real build path; for each,
    (dist_ft's gathered state, its load report, from_pretrained's state)."""
    specs = [f"{p}:{task}:{n or 0}" for p, task, n in cases]
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
         str(REPO / "tests" / "build_probe.py"), "--strategy", strategy, "--out", str(out), *specs],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [(load_file(out / f"{i}.safetensors"), json.loads((out / f"{i}.json").read_text()),
             _reference(path, task, n)) for i, (path, task, n) in enumerate(cases)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_every_build_path_equals_from_pretrained(tmp_path, strategy, tiny_qwen2, tiny_gpt2, tiny_bert):
    cases = [(tiny_qwen2, "causal_lm", None), (tiny_gpt2, "causal_lm", None),
             (tiny_bert, "sequence_classification", 3)]
    for (path, _, n), (ours, report, ref) in zip(cases, _probe(strategy, tmp_path / "out", cases)):
        created = set(report["created"])
        assert created == ({"classifier.weight", "classifier.bias"} if n else set()), (path, created)
        assert len(report["loaded"]) + len(report["unused"]) >= report["total"]
        assert _compare(ours, ref, created) > 0


@pytest.mark.real_model
# CI time: DDP's in the slow suite (it loads with from_pretrained itself; FSDP2's sharded load is what can go wrong)
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp",
                                      pytest.param("zero3", marks=pytest.mark.slow)])
def test_bundled_models_equal_from_pretrained(tmp_path, strategy):
    from dist_ft.assets import resolve_model_path

    cases = [(resolve_model_path("smollm2-135m-instruct"), "causal_lm", None),
             (resolve_model_path("minilm-l6-v2"), "sequence_classification", 6)]
    for ours, report, ref in _probe(strategy, tmp_path / "out", cases):
        assert len(report["loaded"]) == report["total"], report  # MiniLM: 103 of 103 (was 0)
        assert _compare(ours, ref, set(report["created"])) >= report["total"]
