"""benchmarks/compare.py's machinery on a tiny model (nothing is timed): the raw loop, fed the examples exported from
dist_ft's pipeline, does exactly dist_ft's work (same losses step by step, same useful tokens, same held-out loss)
on 1 and 2 processes; and the table takes its ratios within rounds."""

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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from dist_ft.testing import make_model

    root = tmp_path_factory.mktemp("compare")
    model = make_model(root / "tiny", arch="llama", size="tiny")
    job = {**compare.JOBS["a"], "model_path": str(model)}
    recipe = compare.job_recipe(job, model=str(model), strategy="ddp", steps=3, out=root / "export")
    recipe["data"]["max_train_samples"] = 200
    recipe["data"]["max_eval_samples"] = 16
    recipe["training"]["learning_rate"] = 1e-2  # big enough that three steps move the loss
    job_dir = compare.export_job(recipe, root / "job", positions=3 * 4 * 2)
    return root, recipe, job_dir


@pytest.mark.parametrize("nproc", [1, 2])
def test_raw_loop_does_dist_fts_work(exported, nproc):
    root, recipe, job_dir = exported
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    recipe = {**recipe, "output_dir": str(root / f"dist_ft-{nproc}")}
    (root / f"r{nproc}.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "dist_ft", "launch", str(root / f"r{nproc}.yaml"), "--nproc-per-node", str(nproc)]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    records = [json.loads(x) for x in (root / f"dist_ft-{nproc}" / "metrics.jsonl").read_text().splitlines()]
    ours = [r for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    heldout = evals[-1]

    out = root / f"raw-{nproc}.json"
    raw_cmd = [str(REPO / "benchmarks" / "raw_loop.py"), "--job-dir", str(job_dir), "--strategy", "ddp",
               "--out", str(out)]
    if nproc > 1:
        raw_cmd = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                   compare._free_port(), *raw_cmd]
    subprocess.run([sys.executable, *raw_cmd], check=True, cwd=REPO, env=env, capture_output=True)
    raw = json.loads(out.read_text())

    assert raw["world_size"] == nproc and len(raw["steps"]) == len(ours) == 3
    assert raw["steps"][0]["loss"] == pytest.approx(ours[0]["loss"], abs=1e-6)
    for a, b in zip(raw["steps"], ours):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["useful_tokens"] == b["useful_tokens"] and a["tokens"] == b["tokens"]
    assert ours[-1]["loss"] != pytest.approx(ours[0]["loss"], abs=1e-3)  # it trained
    assert raw["heldout_loss"] == pytest.approx(heldout, abs=1e-4)
    assert raw["heldout_loss_before"] == pytest.approx(evals[0], abs=1e-5)  # the same evaluation before training


def _run(label, rnd, tps, peak=1000.0, loss=2.0):
    steps = [{"step": i + 1, "step_time": 1.0, "useful_tokens": tps} for i in range(4)]
    return {"label": label, "round": rnd, "steps": steps, "peak_mb": [peak, peak], "heldout_loss": loss}


def test_ratios_are_taken_within_rounds():
    job = compare.JOBS["a"]
    runs = [_run("dist_ft", 1, 100), _run("raw", 1, 100), _run("trl", 1, 50, peak=1200),
            _run("dist_ft packed", 1, 100), _run("trl packed", 1, 90),
            _run("dist_ft", 2, 50), _run("raw", 2, 50), _run("trl", 2, 25, peak=1200),
            _run("dist_ft packed", 2, 50), _run("trl packed", 2, 45)]
    md, rows, extra = compare.table(job, runs, peak_flops=1e9, flops_tok=1e6, nproc=2)
    d, packed = rows[0], next(r for r in rows if r["runner"] == "dist_ft packed")
    # Medians of per-round ratios: 1.0 and 2.0 although the medians of the tokens/s would give other numbers.
    assert d["runner"] == "dist_ft" and d["x_raw"] == pytest.approx(1.0) and d["x_trl"] == pytest.approx(2.0)
    # Packed is set against packed only: 100/90 and 50/45; the raw loop does not pack.
    assert packed["trl_like"] == "trl packed" and packed["x_trl"] == pytest.approx(100 / 90)
    assert packed["x_raw"] is None
    assert d["mfu"] == pytest.approx(1e6 * 75 / 2e9)
    assert any(t.startswith("dist_ft ÷ raw loop") and "-> met" in t for t in extra["targets"])
    assert any(t.startswith("dist_ft ÷ trl >=") and "-> met" in t for t in extra["targets"])
    assert any(t.startswith("dist_ft packed ÷ trl packed") and "NOT met" in t for t in extra["targets"])
    assert not any(t.startswith("dist_ft ÷ trl packed") for t in extra["targets"])
    assert len(extra["targets"]) == 3
    assert "| dist_ft |" in md and "| dist_ft packed |" in md
