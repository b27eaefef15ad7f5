"""Evaluation and sweeps: metrics against hand-computed values; generated answers and their scores the same on 1
rank and on 2 FSDP2 ranks; the forgetting signal; keep_best and final: best; grid and random sweeps that finish,
resume after being killed, and leave a best recipe that `dist-ft check` accepts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from dist_ft.train.scores import classification_metrics, generation_metrics, normalize_answer

from conftest import REPO, read_metrics, run_cli, tiny_recipe, write_jsonl, write_recipe


# ------------------------------------------------------------------------------------------- by hand

def test_classification_metrics_by_hand():
    # rows: true, columns: predicted. Class a: tp 3, fn 1, fp 1; b: tp 1, fn 1, fp 1; c: tp 0, fn 0, fp 0.
    cm = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    m = classification_metrics(cm, ["a", "b", "c"], detail=True)
    f1_a = 2 * 0.75 * 0.75 / 1.5  # precision 3/4, recall 3/4
    f1_b = 0.5  # precision 1/2, recall 1/2
    assert m["eval_accuracy"] == pytest.approx(4 / 6)
    assert m["eval_f1_per_class"] == pytest.approx({"a": f1_a, "b": f1_b})  # c absent: left out
    assert m["eval_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert m["eval_confusion"] == cm.tolist()


def test_generation_metrics_by_hand():
    preds = ["The cat sat.", "the cat sat on the mat", "x"]
    refs = ["the cat  SAT", "the cat sat on a mat", "y"]
    assert normalize_answer(preds[0]) == normalize_answer(refs[0]) == "the cat sat"
    m = generation_metrics(preds, refs, ["exact_match", "rouge", "bleu"])
    assert m["eval_exact_match"] == pytest.approx(1 / 3)
    # ROUGE-1 F: 1, 5/6 (5 of 6 unigrams on each side), 0. ROUGE-2: 1, 3/5, 0. ROUGE-L (LCS 5 of 6): 1, 5/6, 0.
    assert m["eval_rouge1"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    assert m["eval_rouge2"] == pytest.approx((1 + 3 / 5 + 0) / 3)
    assert m["eval_rougeL"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    # Corpus BLEU of the second pair alone: n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no penalty).
    one = generation_metrics(preds[1:2], refs[1:2], ["bleu"])["eval_bleu"]
    assert one == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)


# ------------------------------------------------------------------------------------------- in runs

def _instruction_data(tmp_path):
    records = [{"prompt": f"Spell the number {i} twice.", "response": f"{i} {i}"} for i in range(80)]
    return write_jsonl(tmp_path / "inst.jsonl", records)


def _gen_recipe(tmp_path, model, name, **sections):
    out = tmp_path / name
    r = tiny_recipe(model, out, data={"train": str(_instruction_data(tmp_path)), "format": "instruction",
                                      "max_length": 40, "eval_fraction": 0.15, "max_train_samples": None,
                                      "max_eval_samples": None},
                    method={"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, **sections)
    return out, write_recipe(tmp_path / f"{name}.yaml", r)


def _evals(out):
    return read_metrics(out)[1]


def test_generated_answers_and_scores_equal_on_one_rank_and_two_fsdp_ranks(tmp_path, tiny_llama):
    """Sampling on (per-prompt seeds), every generation metric, and the forgetting loss: the sharded evaluation
    equals the one-process one, answer by answer."""
    ev = {"metrics": ["exact_match", "rouge", "bleu"], "forgetting": "builtin:pydoc", "forgetting_samples": 6,
          "generation": {"max_new_tokens": 5, "sample_size": 7, "do_sample": True, "temperature": 1.5}}
    one, one_path = _gen_recipe(tmp_path, tiny_llama, "one", eval=ev, training={"max_steps": 2})
    two, two_path = _gen_recipe(tmp_path, tiny_llama, "two", eval=ev, training={"max_steps": 2,
                                                                             "micro_batch_size": 2},  # same global
                                distributed={"strategy": "fsdp"})
    assert run_cli("train", str(one_path)).returncode == 0
    res = run_cli("launch", str(two_path), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    # Before training both hold the same weights: the answers must be the same, text for text. (After training
    # the weights differ in the last bits, as summation orders differ, and a sampled token may then differ.)
    a = [json.loads(x) for x in (one / "generations" / "step-00000000.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (two / "generations" / "step-00000000.jsonl").read_text().splitlines()]
    assert len(a) == 7 and a == b, (a, b)
    assert len({x["answer"] for x in a}) > 1  # sampled, distinct texts: the comparison means something
    ea, eb = _evals(one)[0], _evals(two)[0]
    for key in ("eval_exact_match", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_bleu", "eval_generated"):
        assert ea[key] == eb[key], key
    for ea, eb in zip(_evals(one), _evals(two)):
        for key in ("eval_loss", "eval_forgetting_loss"):
            assert ea[key] == pytest.approx(eb[key], rel=1e-5), key
    assert (two / "generations" / "step-00000002.jsonl").is_file()


def test_forgetting_is_measured_before_training_and_reported_as_a_change(tmp_path, tiny_llama):
    out, path = _gen_recipe(tmp_path, tiny_llama, "forget", eval={"forgetting": "builtin:pydoc",
                                                                  "forgetting_samples": 8},
                            training={"max_steps": 4, "eval_every": 2, "learning_rate": 3e-2})
    assert run_cli("train", str(path)).returncode == 0
    evals = _evals(out)
    assert [e["step"] for e in evals] == [0, 2, 4]
    base = evals[0]["eval_forgetting_loss"]
    assert evals[0]["eval_forgetting_delta"] == 0
    for e in evals[1:]:
        assert e["eval_forgetting_delta"] == pytest.approx(e["eval_forgetting_loss"] - base)
    assert evals[-1]["eval_forgetting_delta"] != 0  # a high learning rate moves it


def test_keep_best_survives_keep_last_and_final_can_be_the_best(tmp_path, tiny_llama):
    """keep_best on eval_loss with best_mode: max (the *worst* loss: the first evaluation, as training lowers it)
    makes the best checkpoint an early one, deterministically. keep_last 1 must not delete it, and final: best
    must hold its weights: evaluated again, they give the numbers recorded at that step."""
    out, path = _gen_recipe(tmp_path, tiny_llama, "best", training={"max_steps": 6, "eval_every": 1,
                                                                     "learning_rate": 1e-2},
                            checkpoint={"every_steps": 1, "keep_last": 1, "keep_best": "eval_loss",
                                        "best_mode": "max", "final": "best"})
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    evals = _evals(out)
    periodic = [e for e in evals if 0 < e["step"] < 6]
    worst = max(periodic, key=lambda e: e["eval_loss"])
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["step"] == worst["step"] and best["metric"] == "eval_loss"
    names = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert names == sorted({f"step-{worst['step']:08d}", "step-00000006"}), names
    assert "final/ holds the best checkpoint" in res.stdout + res.stderr
    again = evals[-1]  # the evaluation of the loaded best weights, written last
    assert again["step"] == worst["step"] and again["eval_loss"] == pytest.approx(worst["eval_loss"], rel=1e-6)


def test_eval_settings_that_cannot_work_are_refused(tmp_path, tiny_llama):
    _, path = _gen_recipe(tmp_path, tiny_llama, "bad", eval={"metrics": ["acuracy", "rouge", "confusion"]},
                          checkpoint={"keep_best": "eval_accuracy", "final": "best"})
    res = run_cli("check", str(path))
    assert res.returncode == 2
    for needle in ("did you mean 'accuracy'", "confusion needs classification data", "checkpoint.keep_best",
                   "needs evaluations during training"):
        assert needle in res.stderr, (needle, res.stderr)


# ------------------------------------------------------------------------------------------- sweeps

def _sweep_files(tmp_path, model, method, **extra):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, out, training={"max_steps": 3},
                                                           method={"kind": "lora", "lora": {"r": 4, "alpha": 8}}))
    params = {"training.learning_rate": {"choice": [1e-3, 1e-2]}, "method.lora.r": {"choice": [2, 4]}} \
        if method == "grid" else {"training.learning_rate": {"log_uniform": [1e-4, 1e-2]},
                                  "method.lora.r": {"choice": [2, 4]}}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"method": method, "objective": "eval_loss", "trials": 4, "params": params,
                                     **extra}))
    return recipe, sweep, tmp_path / "run-sweep"


def _rows(root):
    return json.loads((root / "trials.json").read_text())


# CI time (~33 s): both in the slow suite; the killed sweep's test (CI) runs a sweep to its end too
@pytest.mark.parametrize("method", [pytest.param("random", marks=pytest.mark.slow),
                                    pytest.param("grid", marks=pytest.mark.slow)])
def test_a_four_trial_sweep_finishes_and_its_best_recipe_checks(tmp_path, tiny_llama, method):
    recipe, sweep, root = _sweep_files(tmp_path, tiny_llama, method)
    res = run_cli("sweep", str(recipe), str(sweep), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = _rows(root)
    assert [r["state"] for r in rows] == ["complete"] * 4
    if method == "grid":  # every point of the 2 x 2 grid once
        assert sorted((r["training.learning_rate"], r["method.lora.r"]) for r in rows) == \
            [(1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)]
    best = min(rows, key=lambda r: r["eval_loss"])
    # The objective is the run's own last evaluation.
    assert best["eval_loss"] == read_metrics(root / f"trial-{best['trial']:03d}")[1][-1]["eval_loss"]
    text = (root / "best.yaml").read_text()
    assert f"trial {best['trial']}" in text
    assert run_cli("check", str(root / "best.yaml")).returncode == 0
    r = yaml.safe_load(text)
    assert r["method"]["lora"]["r"] == best["method.lora.r"]
    assert r["training"]["learning_rate"] == pytest.approx(best["training.learning_rate"])
    assert (root / "objective.png").stat().st_size > 0 and (root / "importances.png").stat().st_size > 0
    assert "| trial | state |" in res.stdout


def test_a_killed_sweep_resumes(tmp_path, tiny_llama):
    recipe, sweep, root = _sweep_files(tmp_path, tiny_llama, "random")
    cmd = [sys.executable, "-m", "dist_ft", "sweep", str(recipe), str(sweep)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (root / "trial-001.log").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running trial, as a node failure would
    proc.wait()
    res = run_cli("sweep", str(recipe), str(sweep), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "trial 1 was cut off by an earlier stop: marked failed" in res.stdout
    rows = _rows(root)
    assert rows[0]["state"] == "complete" and rows[1]["state"] == "fail"
    assert sum(r["state"] == "complete" for r in rows) == 4 and len(rows) == 5
    assert "0 trial(s) done" not in res.stdout  # trial 0 was not run again
    # and it ends as an uninterrupted sweep does (test_a_four_trial_sweep_..., slow): the best of the completed
    # trials written as a recipe that checks, and the plots
    done = [r for r in rows if r["state"] == "complete"]
    best = min(done, key=lambda r: r["eval_loss"])
    assert f"trial {best['trial']}" in (root / "best.yaml").read_text()
    assert run_cli("check", str(root / "best.yaml")).returncode == 0
    assert (root / "objective.png").stat().st_size > 0


def test_a_bad_sweep_file_is_refused_with_every_problem(tmp_path, tiny_llama):
    recipe, sweep, _ = _sweep_files(tmp_path, tiny_llama, "grid")
    sweep.write_text(yaml.safe_dump({"method": "grid", "objective": "eval_acc", "trials": 0, "metod": 1,
                                     "params": {"training.learning_rate": {"log_uniform": [1e-4, 1e-2]},
                                                "method.lora.r": {"choice": [2, -1]}}}))
    res = run_cli("sweep", str(recipe), str(sweep))
    assert res.returncode == 2
    for needle in ("metod: unknown key", "trials: 0", "a grid needs listed values", "method.lora.r = -1",
                   "objective: eval_acc"):
        assert needle in res.stderr, (needle, res.stderr)
