"""benchmarks/compare.py's DPO job on a tiny model (nothing is timed): dist_ft, the raw loop (benchmarks/raw_dpo.py)
and TRL's DPOTrainer (benchmarks/trl_dpo.py) train the same pairs alike on 2 processes, step by step.

The job is exported once from dist_ft's data pipeline (compare_dpo.export_pairs: the pairs as dist_ft tokenised them,
in its order, and the LoRA adapter's initial values). Asserted: TRL tokenised every pair it trains on exactly as
dist_ft did (ids and answer mask, both sides); at every step the three have the same pairs, real tokens and learning
rate, and the same loss (the mean DPO loss over the step's 8 pairs) and gradient norm; after the last step the same
held-out DPO loss and preference accuracy. This is the "same calls" proof behind the job's pairs/s ratios.

Tolerances: the three runs agree to ~1e-6 (TRL's logged loss is a float32 mean over ranks; TRL's head projects every
position in chunks, dist_ft's and the raw loop's only the answer positions); 1e-4 is far below what a step moves the
loss here (lr 1e-2: > 1e-2 by step 3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import compare  # noqa: E402
import compare_dpo  # noqa: E402

STEPS, NPROC = 3, 2
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], **env) -> None:
    res = subprocess.run(cmd, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dist_ft.testing import make_model

    root = tmp_path_factory.mktemp("compare_dpo")
    model = make_model(root / "tiny", arch="llama", size="tiny")
    recipe = compare_dpo.dpo_recipe(model=str(model), steps=STEPS, out=root / "dist_ft", held_out=8)
    recipe["data"]["max_train_samples"] = 100
    recipe["training"].update(learning_rate=1e-2, warmup_steps=1)  # big enough that each step moves the loss
    job_dir = compare_dpo.export_pairs(recipe, root / "job", positions=STEPS * 4 * NPROC)

    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _run([sys.executable, "-m", "dist_ft", "launch", str(root / "recipe.yaml"), "--nproc-per-node", str(NPROC)])
    records = [json.loads(x) for x in (root / "dist_ft" / "metrics.jsonl").read_text().splitlines()]
    ours = {"steps": [r for r in records if "loss" in r], "evals": [r for r in records if "eval_loss" in r]}

    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC), "--master-port",
          compare._free_port(), str(REPO / "benchmarks" / "raw_dpo.py"), "--job-dir", str(job_dir), "--out",
          str(root / "raw.json")])
    _run(compare_dpo.trl_command(job_dir, root / "trl.json", root / "trl", NPROC), ACCELERATE_USE_CPU="1")
    return ours, json.loads((root / "raw.json").read_text()), json.loads((root / "trl.json").read_text())


def test_dist_ft_raw_loop_and_trl_train_the_same_pairs_alike(runs):
    ours, raw, trl = runs
    steps = ours["steps"]
    print("\nstep  loss (dist_ft, raw, trl)  grad norm (dist_ft, raw, trl)")
    for a, b, c in zip(steps, raw["steps"], trl["steps"]):
        print(f"{a['step']:4d}  {a['loss']:.6f} {b['loss']:.6f} {c['loss']:.6f}  "
              f"{a['grad_norm']:.5f} {b['grad_norm']:.5f} {c['grad_norm']:.5f}")
    assert raw["world_size"] == trl["world_size"] == NPROC
    assert trl["tokenisation_matches"] == {"identical": STEPS * 4 * NPROC, "checked": STEPS * 4 * NPROC}
    assert len(steps) == len(raw["steps"]) == len(trl["steps"]) == STEPS
    for a in steps:
        for b in (raw["steps"][a["step"] - 1], trl["steps"][a["step"] - 1]):
            assert b["pairs"] == a["targets"] == 4 * NPROC and b["useful_tokens"] == a["useful_tokens"]
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), f"step {a['step']}"
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}"
    assert abs(steps[-1]["loss"] - steps[0]["loss"]) > 1e-2  # it trained: far more than the tolerance
    after, before = ours["evals"][-1], ours["evals"][0]
    for other in (raw["heldout"], trl["heldout"]):
        assert other["loss"] == pytest.approx(after["eval_loss"], abs=1e-4)
        assert other["accuracy"] == after["eval_preference_accuracy"]
        assert other["reward_accuracy"] == after["eval_reward_accuracy"]
    assert raw["heldout_before"]["loss"] == pytest.approx(before["eval_loss"], abs=1e-6)  # log 2: no move yet
    assert raw["heldout_before"]["accuracy"] == before["eval_preference_accuracy"]


def _run_record(label, rnd, pairs_per_s, peak=1000.0, loss=0.6):
    steps = [{"step": i + 1, "step_time": 1.0, "pairs": pairs_per_s, "useful_tokens": 100} for i in range(4)]
    return {"label": label, "round": rnd, "steps": steps, "peak_mb": [peak, peak],
            "heldout": {"loss": loss, "accuracy": 0.8, "reward_accuracy": 0.8}}


def test_the_dpo_table_takes_ratios_within_rounds():
    runs = [_run_record("dist_ft", 1, 10), _run_record("raw", 1, 10), _run_record("trl", 1, 5, peak=1500),
            _run_record("dist_ft", 2, 6), _run_record("raw", 2, 6), _run_record("trl", 2, 3, peak=1500)]
    md, rows, goals = compare_dpo.table(runs)
    d = rows[0]
    assert d["runner"] == "dist_ft" and d["x_trl"] == pytest.approx(2.0) and d["x_raw"] == pytest.approx(1.0)
    assert d["pairs_per_s"] == pytest.approx(8.0)  # the median of 10 and 6 (a ratio of medians would differ)
    assert len(goals) == 2 and all("-> met" in g for g in goals)
    assert "| TRL DPOTrainer |" in md and "| dist_ft |" in md
    slow = [_run_record("dist_ft", 1, 6), _run_record("trl", 1, 5)]
    assert "NOT met" in compare_dpo.table(slow)[2][0]  # 1.2x
