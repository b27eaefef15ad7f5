"""Preference training end to end (issue 23): pairs from data files (plain strings and chat conversations), the
objective's step on 1 and 2 real gloo ranks under DDP, FSDP2 and ZeRO-3 with LoRA (dpo: the reference is the model
with its adapters off) and full fine-tuning (orpo, simpo: no reference), and an exact resume.

    .venv/bin/python -m pytest tests/test_preference_training.py -q
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe
from dist_ft.config import RecipeError, recipe_from_dict
from dist_ft.data.batching import collate
from dist_ft.data.formats import IGNORE, FormatSpec, tokenize_records

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _pairs(path, n=96, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            w = rng.choice(WORDS)
            fh.write(json.dumps({"prompt": f"say {w} again:", "chosen": " ".join([w] * rng.randint(2, 5)),
                                 "rejected": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))}) + "\n")
    return path


def _spec(**kw):
    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "text": "text"}
    return FormatSpec(format="preference", max_length=kw.pop("max_length", 64), too_long=kw.pop("too_long", "truncate"),
                      columns=columns, system_prompt=None, use_chat_template=kw.pop("use_chat_template", False))


# ---------------------------------------------------------------------------------------------- data

def test_a_pair_becomes_chosen_then_rejected_with_only_the_answers_as_targets(tokenizer):
    rec = {"prompt": "say alpha again:", "chosen": "alpha alpha", "rejected": "beta gamma delta"}
    (ex,), stats = tokenize_records(tokenizer, [rec], _spec(), "t")
    assert stats.kept == 1 and ex.split > 0
    prompt = tokenizer("say alpha again:\n", add_special_tokens=True)["input_ids"]
    chosen = tokenizer("alpha alpha", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rejected = tokenizer("beta gamma delta", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.input_ids.tolist() == prompt + chosen + prompt + rejected and ex.split == len(prompt + chosen)
    assert ex.labels.tolist() == [IGNORE] * len(prompt) + chosen + [IGNORE] * len(prompt) + rejected
    batch = collate([ex, ex], pad_id=0)  # rows i and i + 2 are a pair: every chosen row, then every rejected one
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0, :ex.split].tolist() == ex.input_ids[:ex.split].tolist()
    assert batch["input_ids"][2, :len(ex.input_ids) - ex.split].tolist() == ex.input_ids[ex.split:].tolist()


def test_a_conversation_prompt_trains_on_the_last_answer_only(tokenizer):
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
             {"role": "user", "content": "say alpha"}]
    rec = {"prompt": convo, "chosen": "alpha", "rejected": [{"role": "assistant", "content": "beta beta"}]}
    (ex,), _ = tokenize_records(tokenizer, [rec], _spec(), "t")
    for ids, labels, answer in ((ex.input_ids[:ex.split], ex.labels[:ex.split], "alpha"),
                                (ex.input_ids[ex.split:], ex.labels[ex.split:], "beta beta")):
        target = tokenizer.decode(ids[labels != IGNORE].tolist())
        assert answer in target and "hello there" not in target, target  # the prompt's assistant turn is context


def test_pairs_too_long_are_counted_and_a_pair_with_an_empty_answer_is_dropped(tokenizer):
    long = " ".join(["alpha"] * 80)
    recs = [{"prompt": "p", "chosen": long, "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": " "}]
    examples, stats = tokenize_records(tokenizer, recs, _spec(max_length=16), "t")
    assert len(examples) == 1 and stats.truncated == 1 and stats.dropped_empty == 1
    assert examples[0].split == 16
    examples, stats = tokenize_records(tokenizer, recs[:1], _spec(max_length=16, too_long="drop"), "t")
    assert examples == [] and stats.dropped_too_long == 1


@pytest.mark.parametrize("objective, method, data, fix", [
    ({"kind": "dpo"}, "lora", {"format": "instruction"}, "set data.format: preference"),
    ({"kind": "dpo", "reference": "adapter_off"}, "full", {"format": "preference"}, "needs an adapter method"),
    ({"kind": "orpo", "reference": "copy"}, "full", {"format": "preference"}, "needs no reference"),
    ({"kind": "sft"}, "lora", {"format": "preference"}, "set objective.kind: dpo"),
    ({"kind": "orpo", "reference": "adapter_off"}, "lora", {"format": "preference"}, "needs no reference"),
    ({"kind": "ipo", "label_smoothing": 0.1}, "lora", {"format": "preference"}, "only used with objective.kind dpo"),
])
def test_a_recipe_that_cannot_train_its_objective_is_refused(objective, method, data, fix):
    with pytest.raises(RecipeError, match=fix):
        recipe_from_dict({"objective": objective, "method": {"kind": method}, "data": data})


def test_packed_pairs_give_each_sequence_the_log_prob_it_has_alone(tokenizer, tiny_llama, tmp_path):
    """Pairs packed into rows (each chosen and rejected sequence a sample of its own: positions restart) give every
    sequence the log-prob and target count it has in an unpacked batch: no sequence sees another."""
    from transformers import AutoModelForCausalLM

    from dist_ft.data.batching import pack
    from dist_ft.train.preference import sequence_logps

    records = [json.loads(line) for line in _pairs(tmp_path / "p.jsonl", n=12).read_text().splitlines()]
    examples, _ = tokenize_records(tokenizer, records, _spec(), "t")
    rows = pack(examples, 256)
    assert len(rows) < len(examples) / 2  # several pairs share a row
    order = [int(i) for r in range(len(rows)) for i in rows.examples_of(r)]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    with torch.no_grad():
        packed, n_packed = sequence_logps(model, collate(list(rows), pad_id=0))
        alone, n_alone = sequence_logps(model, collate([examples[i] for i in order], pad_id=0))
    assert n_packed.tolist() == n_alone.tolist() and int(n_alone.min()) > 0
    assert torch.allclose(packed, alone, atol=1e-5, rtol=1e-5), (packed - alone).abs().max()
    with torch.no_grad():  # the same rows with one position sequence per row: the sequences would see each other
        crossed = collate(list(rows), pad_id=0)
        crossed["position_ids"] = torch.arange(crossed["input_ids"].size(1)).repeat(crossed["input_ids"].size(0), 1)
        assert not torch.allclose(sequence_logps(model, crossed)[0], alone, atol=1e-3)


# ---------------------------------------------------------------------------------------------- training

def _recipe(tmp_path, model, name, strategy, method, objective, micro=2, offload="none", packing=False, **training):
    """micro 2 on 2 ranks, or 4 on 1 rank: the same global batch of 4 pairs (of 4 packed rows)."""
    out = tmp_path / name
    r = tiny_recipe(model, out, data={"train": str(_pairs(tmp_path / "pairs.jsonl")), "format": "preference",
                                      "eval_fraction": 0.2, "max_train_samples": None, "max_eval_samples": None,
                                      "packing": packing, "max_length": 96 if packing else 48},
                    method={"kind": method, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, objective=objective,
                    training={"max_steps": 6, "eval_every": 3,
                              "learning_rate": 1e-3 if method == "full" else 5e-3, "micro_batch_size": micro,
                              **training},
                    distributed={"strategy": strategy, "offload": offload})
    return out, write_recipe(tmp_path / f"{name}.yaml", r)


SLOW = pytest.mark.slow
CASES = [pytest.param("ddp", "lora", {"kind": "dpo"}, "none", marks=SLOW),  # CI time: DDP LoRA packed and QLoRA stay pytest.param("fsdp", "full", {"kind": "orpo"}, "none", marks=SLOW),
         ("zero3", "lora", {"kind": "dpo"}, "none"),
         ("fsdp", "full", {"kind": "dpo"}, "none"),  # the reference precomputed from the starting weights
         pytest.param("zero3", "full", {"kind": "ipo"}, "none", marks=SLOW),
         pytest.param("fsdp", "lora", {"kind": "ipo"}, "none", marks=SLOW),
         pytest.param("ddp", "full", {"kind": "simpo"}, "none", marks=SLOW),
         pytest.param("zero3", "full", {"kind": "orpo"}, "none", marks=SLOW)]


# The other backends and methods: ZeRO-1, ZeRO-2 with the optimizer offloaded, QLoRA (4-bit base; the reference is
# the quantised base with the adapters off) under DDP and ZeRO-2.
MORE = [pytest.param("zero1", "full", {"kind": "dpo"}, "none", marks=SLOW),
        pytest.param("zero2", "lora", {"kind": "dpo"}, "optimizer", marks=SLOW),  # CI time
        ("ddp", "qlora", {"kind": "dpo"}, "none"),
        pytest.param("zero2", "qlora", {"kind": "ipo"}, "none", marks=pytest.mark.slow),
        pytest.param("zero2", "full", {"kind": "dpo"}, "optimizer", marks=pytest.mark.slow)]


# Packed pairs: LoRA (reference: adapters off, over the packed rows) and full (precomputed: looked up by the pairs
# each packed row holds).
PACKED = [("ddp", "lora", {"kind": "dpo"}, "packed"),
          pytest.param("fsdp", "full", {"kind": "dpo"}, "packed", marks=SLOW),  # CI time
          pytest.param("zero3", "full", {"kind": "simpo"}, "packed", marks=SLOW)]


@pytest.mark.parametrize("strategy, method, objective, offload", CASES + MORE + PACKED)
def test_two_ranks_train_what_one_rank_trains(tmp_path, tiny_llama, strategy, method, objective, offload):
    packing, offload = offload == "packed", "none" if offload == "packed" else offload
    one, path1 = _recipe(tmp_path, tiny_llama, "one", strategy, method, objective, micro=4, offload=offload,
                         packing=packing)
    # DDP's 2-rank run accumulates (2 micro-steps of 1): the global batch is the same.
    accum = {"micro": 1, "gradient_accumulation_steps": 2} if strategy == "ddp" else {}
    two, path2 = _recipe(tmp_path, tiny_llama, "two", strategy, method, objective, offload=offload, packing=packing,
                         **accum)
    res = run_cli("train", str(path1))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("launch", str(path2), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    (a, ea), (b, eb) = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == list(range(1, 7)) == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6), (a, b)
        assert x["margin"] == pytest.approx(y["margin"], rel=1e-3, abs=1e-5)
    for x, y in zip(ea, eb):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-4)
        assert x["eval_preference_accuracy"] == y["eval_preference_accuracy"]
    assert ea[-1]["eval_loss"] < ea[0]["eval_loss"]  # it learns to prefer
    assert packing or a[-1]["loss"] < a[0]["loss"]  # (packed: steps hold 8 or 9 pairs, the last batch's loss is noisy)
    if objective["kind"] == "dpo" and method != "qlora":
        assert abs(a[0]["loss"] - np.log(2)) < 1e-6  # step 1: the policy is its reference (adapters start at 0)
        assert ea[-1]["eval_reward_accuracy"] > 0.5
        res = run_cli("report", str(two))  # the report plots the rewards and the accuracies
        assert res.returncode == 0 and "held-out preference accuracy" in res.stdout, res.stdout + res.stderr
        assert (two / "plots" / "rewards.png").is_file() and (two / "plots" / "preference_accuracy.png").is_file()


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "full"])
def test_a_preference_run_resumes_exactly(tmp_path, tiny_llama, method):
    """LoRA (reference: adapters off) and full fine-tuning (reference: precomputed from the starting weights and
    read back from the cache by the resumed run, never from the resumed weights)."""
    ref, path = _recipe(tmp_path, tiny_llama, "straight", "ddp", method, {"kind": "dpo"})
    res = run_cli("launch", str(path), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("computing the reference log-probs" in res.stdout) == (method == "full")
    out, path = _recipe(tmp_path, tiny_llama, "stopped", "ddp", method, {"kind": "dpo"}, stop_after_steps=3)
    r = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    r["checkpoint"] = {"every_steps": 3}
    write_recipe(path, r)
    assert run_cli("launch", str(path), "--nproc-per-node", "2").returncode == 0
    res = run_cli("launch", str(path), "--nproc-per-node", "2", "checkpoint.resume=auto",
                  "training.stop_after_steps=null")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ("reference log-probs of" in res.stdout and "read from" in res.stdout) == (method == "full")
    a = {r["step"]: r for r in read_metrics(ref)[0]}
    b = {r["step"]: r for r in read_metrics(out)[0]}
    assert sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-9), (s, a[s], b[s])
        assert b[s]["chosen_reward"] == pytest.approx(a[s]["chosen_reward"], rel=1e-5, abs=1e-9)


def test_plan_counts_two_sequences_per_pair_and_the_reference_forward():
    """`dist-ft plan` of a preference recipe: a micro-batch of pairs holds twice the activations of the same SFT
    micro-batch; DPO's reference adds one forward's FLOPs per token, ORPO (no reference) does not."""
    from dist_ft import plan as P

    cluster = P.make_cluster(nodes=1, gpus_per_node=8, gpu="H100")

    def plan(kind, fmt, micro):
        r = recipe_from_dict({"model": {"path": "builtin:llama-3-8b"}, "method": {"kind": "lora"},
                              "objective": {"kind": kind}, "data": {"format": fmt, "max_length": 512},
                              "training": {"micro_batch_size": micro},
                              "distributed": {"strategy": "fsdp", "precision": "bf16-mixed"}})
        return P.make_plan(r, cluster, find_max=False)

    sft, sft2 = plan("sft", "instruction", 2), plan("sft", "instruction", 4)
    dpo, orpo = plan("dpo", "preference", 2), plan("orpo", "preference", 2)
    fwd_bwd = lambda p: sum(r.device for r in p.rows if r.phase == "fwd_bwd")  # noqa: E731
    assert fwd_bwd(dpo) == pytest.approx(fwd_bwd(sft2)) == pytest.approx(fwd_bwd(orpo))  # 2 pairs = 4 rows
    assert fwd_bwd(dpo) > 1.5 * fwd_bwd(sft)
    fwd = dpo.speed["forward_flops_per_token"]
    assert dpo.speed["train_flops_per_token"] == pytest.approx(orpo.speed["train_flops_per_token"] + fwd)
    assert orpo.speed["train_flops_per_token"] == pytest.approx(sft.speed["train_flops_per_token"])
    assert dpo.speed["tokens_per_rank_per_step"] == 2 * sft.speed["tokens_per_rank_per_step"]
    assert any("reference policy" in n for n in dpo.notes) and any("no reference" in n for n in orpo.notes)


def test_the_data_report_shows_pair_lengths(tmp_path, tiny_llama):
    out, path = _recipe(tmp_path, tiny_llama, "data", "ddp", "lora", {"kind": "dpo"})
    res = run_cli("data", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "data-report" / "report.json").read_text())
    pairs = rep["pairs"]
    assert pairs["pairs"] == rep["sources"][0]["kept"] and pairs["chosen"]["max"] <= 48
    assert "packing" not in rep and "Preference pairs:" in (out / "data-report" / "report.md").read_text()


@pytest.mark.parametrize("strategy, method", [pytest.param("ddp", "full", marks=pytest.mark.slow),
                                              pytest.param("fsdp", "full", marks=pytest.mark.slow),
                                              ("zero3", "full"), pytest.param("ddp", "lora", marks=pytest.mark.slow)])
def test_a_frozen_copy_as_reference_trains_what_the_other_references_train(tmp_path, tiny_llama, strategy, method):
    """reference: copy (a second, frozen model held as the backend holds the policy: replicated, sharded, or a
    ZeRO-3 inference engine) gives the numbers of the precomputed reference (full) or of the adapters switched off
    (LoRA), step by step on 2 ranks."""
    other = "precomputed" if method == "full" else "adapter_off"
    a_out, a = _recipe(tmp_path, tiny_llama, "other", strategy, method, {"kind": "dpo", "reference": other})
    b_out, b = _recipe(tmp_path, tiny_llama, "copy", strategy, method, {"kind": "dpo", "reference": "copy"})
    for path in (a, b):
        res = run_cli("launch", str(path), "--nproc-per-node", "2")
        assert res.returncode == 0, res.stderr[-3000:]
    assert "frozen copy of the starting weights" in res.stdout
    (x, ex), (y, ey) = read_metrics(a_out), read_metrics(b_out)
    assert len(x) == len(y) == 6
    for r, s in zip(x, y):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5, abs=1e-7), (x, y)
        assert r["chosen_reward"] == pytest.approx(s["chosen_reward"], rel=1e-4, abs=1e-7)
    for r, s in zip(ex, ey):
        assert r["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-5)
    assert x[-1]["margin"] > 0.01  # the policy really moved from its reference


def test_plan_counts_a_frozen_copy_as_a_second_set_of_weights():
    from dist_ft import plan as P

    cluster = P.make_cluster(nodes=1, gpus_per_node=8, gpu="H100")

    def plan(reference):
        r = recipe_from_dict({"model": {"path": "builtin:llama-3-8b"}, "method": {"kind": "full"},
                              "objective": {"kind": "dpo", "reference": reference},
                              "data": {"format": "preference", "max_length": 512},
                              "distributed": {"strategy": "fsdp", "precision": "bf16-mixed"}})
        return {row.key: row for row in P.make_plan(r, cluster, find_max=False).rows}

    pre, cop = plan("precomputed"), plan("copy")
    assert "reference" not in pre and cop["parameters"].device > 0
    assert cop["reference"].device == pytest.approx(cop["parameters"].device)
