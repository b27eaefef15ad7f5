"""NEFTune (training.neftune_alpha): noise of transformers' formula on the input embeddings in training forwards,
none in evaluation or generation; a run with it trains, evaluates and generates before training exactly as one
without it; a bad alpha is refused."""

import json
import math

import pytest
import torch

from conftest import read_metrics, run_cli, tiny_recipe, write_jsonl, write_recipe
from dist_ft.config import RecipeError, recipe_from_dict

ALPHA = 5.0
METHODS = {"full": {"kind": "full"},
           "lora": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
           "prompt_tuning": {"kind": "prompt_tuning", "prompt": {"num_virtual_tokens": 4}}}


def _build(model_path, tmp_path, method="full", alpha=None):
    from dist_ft.model import ModelBuilder, load_tokenizer
    recipe = recipe_from_dict(tiny_recipe(model_path, tmp_path / "unused", method=METHODS[method],
                                          training={"neftune_alpha": alpha}))
    tok = load_tokenizer(model_path)
    return ModelBuilder(recipe, model_path, num_labels=None, label_names=[], pad_token_id=tok.pad_token_id,
                        dtype=torch.float32, attn_implementation="sdpa").build()


def _ids(batch=4, length=24, seed=0):
    return torch.randint(4, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", list(METHODS))
def test_training_forwards_get_noise_of_the_papers_scale(tmp_path, tiny_llama, method):
    model = _build(tiny_llama, tmp_path, method, ALPHA)
    emb = model.get_input_embeddings()
    ids = _ids()
    clean = torch.nn.functional.embedding(ids, emb.weight).detach()
    model.train()
    torch.manual_seed(1)
    noise = (emb(ids) - clean).detach()
    L, d = ids.shape[1], emb.weight.shape[1]
    bound = ALPHA / math.sqrt(L * d)  # the paper's alpha / sqrt(L d), L the (padded) row length
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() >= 0.99 * bound  # ~6,000 draws: the largest lies within 1% of the edge
    assert abs(float(noise.mean())) < 0.05 * bound
    assert float(noise.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform on [-b, b]
    assert not torch.equal(emb(ids), emb(ids))  # fresh noise every forward
    model.eval()
    assert torch.equal(emb(ids), clean)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_no_noise_in_evaluation_or_generation(tmp_path, tiny_llama, method):
    noisy, plain = _build(tiny_llama, tmp_path, method, ALPHA), _build(tiny_llama, tmp_path, method)
    ids = _ids(batch=2, length=12)
    with torch.no_grad():
        noisy.train(), plain.train()  # (tiny Llama has no dropout: training mode alone changes nothing)
        assert not torch.allclose(noisy(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-3)
        noisy.eval(), plain.eval()
        assert torch.equal(noisy(input_ids=ids).logits, plain(input_ids=ids).logits)
        kwargs = dict(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6, do_sample=False,
                      eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        a, b = noisy.generate(**kwargs), plain.generate(**kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) == 6 and all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def test_alpha_must_be_positive_and_is_off_by_default(tmp_path, tiny_llama):
    def alpha(value):
        return recipe_from_dict(tiny_recipe(tiny_llama, tmp_path, training={"neftune_alpha": value})).training

    assert recipe_from_dict(tiny_recipe(tiny_llama, tmp_path)).training.neftune_alpha is None
    assert alpha(5).neftune_alpha == 5 and alpha(None).neftune_alpha is None
    for bad in (0, -5):
        with pytest.raises(RecipeError, match=r"training\.neftune_alpha: must be > 0"):
            alpha(bad)


def test_a_model_without_input_embeddings_is_refused_naming_the_field():
    from dist_ft.methods import add_neftune
    with pytest.raises(RecipeError, match=r"training\.neftune_alpha: Linear has no input embedding"):
        add_neftune(torch.nn.Linear(4, 4), ALPHA)


def _run_recipe(tmp_path, model, name, alpha, micro=4, **extra):
    records = [{"prompt": f"Spell the number {i} twice.", "response": f"{i} {i}"} for i in range(80)]
    data = write_jsonl(tmp_path / "inst.jsonl", records)
    out = tmp_path / name
    r = tiny_recipe(model, out, data={"train": str(data), "format": "instruction", "max_length": 40,
                                      "eval_fraction": 0.15, "max_train_samples": None, "max_eval_samples": None},
                    training={"max_steps": 6, "micro_batch_size": micro, "neftune_alpha": alpha},
                    eval={"metrics": ["exact_match"], "generation": {"max_new_tokens": 4, "sample_size": 4}},
                    **extra)
    return out, write_recipe(tmp_path / f"{name}.yaml", r)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_llama):
    base = tmp_path_factory.mktemp("clean")
    out, path = _run_recipe(base, tiny_llama, "clean", None)
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "NEFTune" not in res.stdout
    return out


def _generations(out, step=0):
    return [json.loads(x) for x in (out / "generations" / f"step-{step:08d}.jsonl").read_text().splitlines()]


def test_a_run_trains_with_noise_and_evaluates_and_generates_without(tmp_path, tiny_llama, clean_run):
    out, path = _run_recipe(tmp_path, tiny_llama, "neftune", ALPHA)
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "[method] NEFTune: noise alpha 5 on the input embeddings, training forwards only" in res.stdout
    (train, evals), (clean_train, clean_evals) = read_metrics(out), read_metrics(clean_run)
    before, clean_before = ({k: v for k, v in e[0].items() if k != "time"} for e in (evals, clean_evals))
    assert before["step"] == 0 and before == clean_before  # before training: same weights, no noise
    assert set(before) >= {"eval_loss", "eval_exact_match"}
    assert _generations(out) == _generations(clean_run) and len(_generations(out)) == 4
    losses, clean = [r["loss"] for r in train], [r["loss"] for r in clean_train]
    assert len(losses) == len(clean) == 6
    assert all(abs(a - b) > 1e-4 * abs(b) for a, b in zip(losses, clean)), (losses, clean)  # every step noisy
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # and it learns


def test_two_fsdp2_ranks_add_the_noise(tmp_path, tiny_llama, clean_run):
    """The hook is on the embedding module itself, so it fires inside FSDP2's sharded model too: the first step's
    loss leaves the clean run's (which two ranks match to 1e-4, tests/test_strategies.py), the evaluation before
    training does not."""
    out, path = _run_recipe(tmp_path, tiny_llama, "fsdp", ALPHA, micro=2,  # the same global batch
                            distributed={"strategy": "fsdp"})
    res = run_cli("launch", str(path), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (train, evals), (clean_train, clean_evals) = read_metrics(out), read_metrics(clean_run)
    assert evals[0]["eval_loss"] == pytest.approx(clean_evals[0]["eval_loss"], rel=1e-5)
    assert abs(train[0]["loss"] - clean_train[0]["loss"]) > 1e-3 * abs(clean_train[0]["loss"])
