"""KTO on unpaired preference data (issue 23): the data format (an answer labelled desirable or not, stored with
its mismatched sequence for the KL estimate), the recipe checks, the loss against TRL's KTOTrainer on the same
batch and weights, and training on 1 and 2 real gloo ranks.

    .venv/bin/python -m pytest tests/test_kto.py -q
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe
from dist_ft.config import RecipeError, recipe_from_dict
from dist_ft.data.batching import collate
from dist_ft.data.formats import IGNORE, FormatSpec, tokenize_records
from dist_ft.data.sources import DataError
from dist_ft.train import preference as P

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _spec(**kw):
    columns = {"prompt": "prompt", "completion": "completion", "label": "label"}
    return FormatSpec(format="unpaired_preference", max_length=kw.pop("max_length", 64), too_long="truncate",
                      columns=columns, system_prompt=None, use_chat_template=False)


def _examples(path, n=96, seed=0):
    """Half desirable (the word repeated), half not (random words), in random order."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            w, good = rng.choice(WORDS), rng.random() < 0.5
            answer = " ".join([w] * rng.randint(2, 5)) if good else " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
            fh.write(json.dumps({"prompt": f"say {w} again:", "completion": answer, "label": good}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- data

def test_an_example_is_its_answer_then_its_prompt_with_the_previous_answer(tokenizer):
    recs = [{"prompt": "say alpha:", "completion": "alpha alpha", "label": True},
            {"prompt": "say beta:", "completion": "gamma", "label": "false"}]
    (a, b), stats = tokenize_records(tokenizer, recs, _spec(), "t")
    assert stats.kept == 2 and (a.desirable, b.desirable) == (1, 0)

    def side(prompt, answer):
        p = tokenizer(f"{prompt}\n", add_special_tokens=True)["input_ids"]
        return p, tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    (pa, aa), (pb, ab) = side("say alpha:", "alpha alpha"), side("say beta:", "gamma")
    # Completions rotated by one, as TRL builds KTO's mismatched pairs: the first record takes the last's answer.
    assert a.input_ids.tolist() == pa + aa + pa + ab and a.split == len(pa + aa)
    assert b.input_ids.tolist() == pb + ab + pb + aa
    assert b.labels.tolist() == [IGNORE] * len(pb) + ab + [IGNORE] * len(pb) + aa
    batch = collate([a, b], pad_id=0)  # rows: both own sequences, then both mismatched ones
    assert batch["desirable"].tolist() == [True, False] and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][3, :len(pb + aa)].tolist() == pb + aa


@pytest.mark.parametrize("label, ok", [(True, 1), (0, 0), ("TRUE", 1), (" 0", 0), ("yes", None), (2, None),
                                       (None, None)])
def test_the_label_must_say_true_or_false(tokenizer, label, ok):
    recs = [{"prompt": "p", "completion": "a b", "label": label}]
    if ok is None:
        with pytest.raises(DataError, match="column 'label' must say whether the completion is desirable"):
            tokenize_records(tokenizer, recs, _spec(), "t")
    else:
        assert tokenize_records(tokenizer, recs, _spec(), "t")[0][0].desirable == ok


@pytest.mark.parametrize("objective, data, fix", [
    ({"kind": "kto"}, {"format": "preference"}, "set data.format: unpaired_preference .* or use dpo"),
    ({"kind": "dpo"}, {"format": "unpaired_preference"}, "set data.format: preference"),
    ({"kind": "sft"}, {"format": "unpaired_preference"}, "set objective.kind: kto"),
    ({"kind": "dpo", "kto_desirable_weight": 2.0}, {"format": "preference"}, "only used with objective.kind kto"),
    ({"kind": "kto"}, {"format": "unpaired_preference", "packing": True}, "not packed"),
])
def test_a_kto_recipe_that_cannot_train_is_refused(objective, data, fix):
    with pytest.raises(RecipeError, match=fix):
        recipe_from_dict({"objective": objective, "method": {"kind": "lora"}, "data": data})
    recipe_from_dict({"objective": {"kind": "kto"}, "method": {"kind": "lora"},
                      "data": {"format": "unpaired_preference"}})  # the right pairing is accepted


# ---------------------------------------------------------------------------------------------- TRL

def test_kto_equals_trls_kto_trainer_on_the_same_batch(tiny_llama, tmp_path):
    """TRL's KTOTrainer computes its loss on a batch it collated (own sequences, mismatched KL sequences, labels);
    dist_ft's log-probs, KL reference point and KTO loss on the same token ids, answer masks, policy and reference
    weights agree within 1e-4, with unequal desirable and undesirable weights."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a policy away from its reference (this seed's direction gives a KL estimate above 0)
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    data = {"prompt": ["the cat sat on", "a word means", "once upon a", "to be or"],
            "completion": [" the mat today", " what it says", " dog", " maybe later then"],
            "label": [True, True, False, False]}
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.1,
                         desirable_weight=1.0, undesirable_weight=1.5, report_to=[], use_cpu=True, max_length=64,
                         bf16=False)
    trainer = trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_dict(data), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)

    def rows(prefix):
        ids, comp = batch[f"{prefix}input_ids"].cpu(), batch[f"{prefix}completion_mask"].cpu()
        return {"input_ids": ids, "attention_mask": batch[f"{prefix}attention_mask"].cpu(),
                "labels": ids.masked_fill(comp == 0, IGNORE)}

    with torch.no_grad():
        pi, _ = P.sequence_logps(policy.eval(), rows(""))
        ref, _ = P.sequence_logps(reference, rows(""))
        pi_kl, _ = P.sequence_logps(policy, rows("KL_"))
        ref_kl, _ = P.sequence_logps(reference, rows("KL_"))
    kl = (pi_kl - ref_kl).mean()
    ours = P.kto(pi, ref, batch["label"].bool().cpu(), kl, beta=0.1, desirable_weight=1.0,
                 undesirable_weight=1.5).losses.mean()
    assert float(kl) > 1e-3  # the KL reference point is really in play
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)


# ---------------------------------------------------------------------------------------------- training

def _recipe(tmp_path, model, name, strategy, method, micro=2, **training):
    """micro 2 on 2 ranks, or 4 on 1 rank: the same global batch of 4 examples."""
    out = tmp_path / name
    r = tiny_recipe(model, out, data={"train": str(_examples(tmp_path / "kto.jsonl")), "format": "unpaired_preference",
                                      "eval_fraction": 0.2, "max_train_samples": None, "max_eval_samples": None},
                    method={"kind": method, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                    objective={"kind": "kto", "kto_undesirable_weight": 1.2},
                    training={"max_steps": 6, "eval_every": 3, "learning_rate": 5e-3 if method == "lora" else 1e-3,
                              "micro_batch_size": micro, **training},
                    distributed={"strategy": strategy})
    return out, write_recipe(tmp_path / f"{name}.yaml", r)


@pytest.mark.parametrize("strategy, method", [("ddp", "lora"), ("fsdp", "full"),
                                              pytest.param("zero3", "lora", marks=pytest.mark.slow)])
def test_two_ranks_train_what_one_rank_trains(tmp_path, tiny_llama, strategy, method):
    """The KL reference point is estimated over the whole global batch, so 2 ranks x 2 examples equal 1 rank x 4."""
    one, path1 = _recipe(tmp_path, tiny_llama, "one", strategy, method, micro=4)
    # DDP's 2-rank run accumulates (2 micro-steps of 1): z0 is still over the whole global batch.
    accum = {"micro": 1, "gradient_accumulation_steps": 2} if strategy == "ddp" else {}
    two, path2 = _recipe(tmp_path, tiny_llama, "two", strategy, method, **accum)
    res = run_cli("train", str(path1))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("launch", str(path2), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    (a, ea), (b, eb) = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == list(range(1, 7)) == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "kl", "margin"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (k, a, b)
    for x, y in zip(ea, eb):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-4)
    assert a[-1]["loss"] < a[0]["loss"] and ea[-1]["eval_loss"] < ea[0]["eval_loss"]
    assert a[-1]["margin"] > 0 and ea[-1]["eval_margin"] > ea[0]["eval_margin"]
    if method == "lora":  # step 1: the policy is its reference (adapters start at 0): r = 0, z0 = 0, loss 1 - s(0)
        assert a[0]["kl"] == 0.0 and a[0]["chosen_reward"] == 0.0
        assert 0.5 <= a[0]["loss"] <= 0.6  # 0.5 for each desirable example, 0.6 (weight 1.2) for each undesirable


@pytest.mark.slow
def test_a_kto_run_resumes_exactly(tmp_path, tiny_llama):
    ref, path = _recipe(tmp_path, tiny_llama, "straight", "ddp", "full")
    res = run_cli("launch", str(path), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    out, path = _recipe(tmp_path, tiny_llama, "stopped", "ddp", "full", stop_after_steps=3)
    r = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    r["checkpoint"] = {"every_steps": 3}
    write_recipe(path, r)
    assert run_cli("launch", str(path), "--nproc-per-node", "2").returncode == 0
    res = run_cli("launch", str(path), "--nproc-per-node", "2", "checkpoint.resume=auto",
                  "training.stop_after_steps=null")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reference log-probs of" in res.stdout and "read from" in res.stdout
    a = {r["step"]: r for r in read_metrics(ref)[0]}
    b = {r["step"]: r for r in read_metrics(out)[0]}
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        for k in ("loss", "kl", "chosen_reward"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-6, abs=1e-9), (s, k, a[s], b[s])


def test_the_data_report_counts_desirable_and_undesirable_answers(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama, "data", "ddp", "lora")
    res = run_cli("data", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "data-report" / "report.json").read_text())
    u = rep["unpaired"]
    records = [json.loads(line) for line in (tmp_path / "kto.jsonl").read_text().splitlines()]
    assert u["examples"] == rep["sources"][0]["kept"] and u["desirable"] + u["undesirable"] == u["examples"]
    assert 0 < u["desirable"] < u["examples"] and u["examples"] <= len(records)
    assert "packing" not in rep and "Unpaired preference examples:" in (out / "data-report" / "report.md").read_text()


def test_plan_counts_the_kl_and_reference_forwards_without_their_activations():
    from dist_ft import plan as PL

    cluster = PL.make_cluster(nodes=1, gpus_per_node=8, gpu="H100")

    def plan(kind, fmt):
        r = recipe_from_dict({"model": {"path": "builtin:llama-3-8b"}, "method": {"kind": "lora"},
                              "objective": {"kind": kind}, "data": {"format": fmt, "max_length": 512},
                              "training": {"micro_batch_size": 2},
                              "distributed": {"strategy": "fsdp", "precision": "bf16-mixed"}})
        return PL.make_plan(r, cluster, find_max=False)

    sft, kto = plan("sft", "instruction"), plan("kto", "unpaired_preference")
    fwd_bwd = lambda p: sum(r.device for r in p.rows if r.phase == "fwd_bwd")  # noqa: E731
    assert fwd_bwd(kto) == pytest.approx(fwd_bwd(sft))  # the mismatched and reference rows store no activations
    fwd = kto.speed["forward_flops_per_token"]
    assert kto.speed["train_flops_per_token"] == pytest.approx(sft.speed["train_flops_per_token"] + 3 * fwd)
    assert any("objective kto" in n for n in kto.notes)
