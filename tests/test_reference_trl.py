"""Causal-LM SFT in dist_ft is reference-equal to TRL's SFTTrainer (issue 19), on a tiny model.

benchmarks/compare.py exports one job from dist_ft's data pipeline (tokenised examples in dist_ft's order, the LoRA
adapter's initial values, the optimiser settings); dist_ft trains it with `dist-ft launch`, TRL with
benchmarks/trl_sft.py, which gives SFTTrainer the records as prompt/completion messages to tokenise itself. Asserted:
TRL tokenised every example it trains on exactly as dist_ft did (ids and loss mask), each step's learning rate,
training loss and gradient norm equal dist_ft's, and so does the held-out loss at the end.

The schedule is the job's (trl_sft.py --schedule job): transformers' warm-up starts at learning rate 0, dist_ft's at
1/W (see trl_sft.py). The second test runs TRL with transformers' own schedule from the same numbers: the learning
rates differ by exactly that one-step shift, and the losses part from step 2 on by far more than the tolerance.

Tolerances: both train bit-identical weights here (the gradient norms and the held-out losses agree exactly); the
logged training losses differ by < 1e-6, from how each reports the step's mean (TRL: a float32 mean over ranks). 1e-5
leaves room for that and nothing else: a step moves the loss by 0.007-0.07 at lr 1e-2 here, a one-step shift of the
warm-up moves step 2 by 0.04, and per-micro-batch normalisation instead of the global target count
(average_tokens_across_devices=False) moves step 1 by 1.3e-3.
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

STEPS, WARMUP, NPROC = 6, 2, 2
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The job exported once, trained by dist_ft on NPROC processes (metrics.jsonl)."""
    from dist_ft.testing import make_model

    root = tmp_path_factory.mktemp("reference_trl")
    model = make_model(root / "tiny", arch="llama", size="tiny")
    job = {**compare.JOBS["a"], "model_path": str(model)}
    recipe = compare.job_recipe(job, model=str(model), strategy="ddp", steps=STEPS, out=root / "dist_ft")
    recipe["data"].update(max_train_samples=200, max_eval_samples=16)
    recipe["training"].update(learning_rate=1e-2, warmup_steps=WARMUP)  # big enough that each step moves the loss
    job_dir = compare.export_job(recipe, root / "job", positions=STEPS * 4 * NPROC)

    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "dist_ft", "launch", str(root / "recipe.yaml"), "--nproc-per-node", str(NPROC)]
    subprocess.run(cmd, check=True, cwd=REPO, env=ENV, capture_output=True)
    records = [json.loads(x) for x in (root / "dist_ft" / "metrics.jsonl").read_text().splitlines()]
    ours = {"steps": [r for r in records if "loss" in r], "heldout_loss": [r for r in records if "eval_loss" in r]}
    return root, job_dir, ours


def run_trl(root: Path, job_dir: Path, schedule: str) -> dict:
    out = root / f"trl-{schedule}.json"
    script = [str(REPO / "benchmarks" / "trl_sft.py"), "--job-dir", str(job_dir), "--out", str(out),
              "--output-dir", str(root / f"trl-{schedule}"), "--packing", "off", "--schedule", schedule]
    # The one accelerate launch that gives a real world size of NPROC on CPU (see benchmarks/compare.py run_trl).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(NPROC),
           "--num_machines", "1", "--main_process_port", compare._free_port(), "--mixed_precision", "no",
           "--dynamo_backend", "no", *script]
    res = subprocess.run(cmd, cwd=REPO, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_trl_trains_what_dist_ft_trains(runs):
    root, job_dir, ours = runs
    trl = run_trl(root, job_dir, "job")
    steps, theirs = ours["steps"], trl["steps"]
    print("\nstep  lr (dist_ft, trl)  loss (dist_ft, trl)  grad norm (dist_ft, trl)")
    for a, b in zip(steps, theirs):
        print(f"{a['step']:4d}  {a['lr']:.6f} {b['lr']:.6f}  {a['loss']:.6f} {b['loss']:.6f}  "
              f"{a['grad_norm']:.5f} {b['grad_norm']:.5f}")
    print(f"held-out loss: dist_ft {ours['heldout_loss'][-1]['eval_loss']:.6f}, trl {trl['heldout_loss']:.6f} "
          f"(before training {ours['heldout_loss'][0]['eval_loss']:.6f})")

    assert trl["world_size"] == NPROC
    # (a) Every example TRL trains on, tokenised by TRL from the messages, is dist_ft's: ids and loss mask.
    assert trl["tokenisation_matches"] == {"identical": STEPS * 4 * NPROC, "checked": STEPS * 4 * NPROC}
    # (b) Step by step: the same schedule, loss (the mean over the step's target tokens on all ranks) and gradient.
    assert len(steps) == len(theirs) == STEPS
    assert [b["useful_tokens"] for b in theirs] == [a["useful_tokens"] for a in steps]
    assert [b["lr"] for b in theirs] == pytest.approx([a["lr"] for a in steps], rel=1e-12)
    for a, b in zip(steps, theirs):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), f"step {a['step']}"
    assert abs(steps[-1]["loss"] - steps[0]["loss"]) > 0.05  # it trained: the tolerance is far below a step's change
    # (c) The held-out loss after the last step, evaluated the same way (compare_common.heldout_loss for TRL).
    assert trl["heldout_loss"] == pytest.approx(ours["heldout_loss"][-1]["eval_loss"], abs=1e-5)


def test_transformers_warmup_is_the_one_difference(runs):
    """TRL with transformers' own schedule, from the same numbers (warmup_steps=2, cosine): step 1 runs at lr 0
    (factor s/W, dist_ft's (s+1)/W), so the losses part from step 2 on by far more than the tolerance above."""
    import math

    root, job_dir, ours = runs
    trl = run_trl(root, job_dir, "transformers")
    steps, theirs = ours["steps"], trl["steps"]
    peak = steps[WARMUP - 1]["lr"]

    def hf(s):  # transformers' get_cosine_schedule_with_warmup, 0-based optimizer step
        return s / WARMUP if s < WARMUP else 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))

    print("\nstep  lr (dist_ft, trl transformers)  loss (dist_ft, trl transformers)")
    for a, b in zip(steps, theirs):
        print(f"{a['step']:4d}  {a['lr']:.6f} {b['lr']:.6f}  {a['loss']:.6f} {b['loss']:.6f}")
    print(f"held-out loss: dist_ft {ours['heldout_loss'][-1]['eval_loss']:.6f}, trl {trl['heldout_loss']:.6f}")
    assert [b["lr"] for b in theirs] == pytest.approx([peak * hf(s) for s in range(STEPS)], rel=1e-12)
    assert theirs[0]["lr"] == 0 and steps[0]["lr"] == peak / WARMUP
    assert theirs[0]["loss"] == pytest.approx(steps[0]["loss"], abs=1e-5)  # nothing has been updated yet
    assert all(abs(b["loss"] - a["loss"]) > 1e-3 for a, b in zip(steps[1:], theirs[1:]))
