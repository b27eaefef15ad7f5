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


@pytest.mark.parametrize("nproc, precision", [pytest.param(1, "fp32", marks=pytest.mark.slow), (2, "fp32"), pytest.param(2, "bf16-mixed", marks=pytest.mark.slow),
                                              pytest.param(2, "bf16-true", marks=pytest.mark.slow)])
def test_raw_loop_does_dist_fts_work(exported, nproc, precision):
    root, recipe, job_dir = exported
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    name = f"{nproc}-{precision}"
    recipe = {**recipe, "output_dir": str(root / f"dist_ft-{name}"),
              "distributed": {**recipe["distributed"], "precision": precision}}
    (root / f"r{name}.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "dist_ft", "launch", str(root / f"r{name}.yaml"), "--nproc-per-node", str(nproc)]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    records = [json.loads(x) for x in (root / f"dist_ft-{name}" / "metrics.jsonl").read_text().splitlines()]
    ours = [r for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    heldout = evals[-1]

    out = root / f"raw-{name}.json"
    raw_cmd = [str(REPO / "benchmarks" / "raw_loop.py"), "--job-dir", str(job_dir), "--strategy", "ddp",
               "--out", str(out), "--precision", precision]
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
    # The held-out batches differ from the training ones in padding: in 16 bits, rounding then differs by ~1e-4.
    tol = 1e-4 if precision == "fp32" else 1e-3
    assert raw["heldout_loss"] == pytest.approx(heldout, abs=tol)
    assert raw["heldout_loss_before"] == pytest.approx(evals[0], abs=tol / 10)  # the same evaluation before training


def _run(label, rnd, tps, peak=1000.0, loss=2.0, precision="fp32"):
    steps = [{"step": i + 1, "step_time": 1.0, "useful_tokens": tps} for i in range(4)]
    kind = label.split(" ")[0]
    opt = {"strategy": "ddp", "precision": precision, "packing": "packed" in label}
    return {"label": label, "round": rnd, "steps": steps, "peak_mb": [peak, peak], "heldout_loss": loss,
            "kind": kind, "opt": opt}


def test_ratios_are_taken_within_rounds():
    job = compare.JOBS["a"]
    runs = [_run("dist_ft", 1, 100), _run("raw", 1, 100), _run("trl", 1, 50, peak=1200),
            _run("dist_ft packed", 1, 100), _run("trl packed", 1, 90),
            _run("dist_ft", 2, 50), _run("raw", 2, 50), _run("trl", 2, 25, peak=1200),
            _run("dist_ft packed", 2, 50), _run("trl packed", 2, 45)]
    md, rows, extra = compare.table(job, runs, peaks={"fp32": 1e9}, flops_tok=1e6, nproc=2)
    d, packed = rows[0], next(r for r in rows if r["runner"] == "dist_ft packed")
    # Medians of per-round ratios: 1.0 and 2.0 although the medians of the tokens/s would give other numbers.
    assert d["runner"] == "dist_ft" and d["x_raw"] == pytest.approx(1.0) and d["x_trl"] == pytest.approx(2.0)
    # Packed is set against packed only: 100/90 and 50/45; the raw loop does not pack.
    assert packed["trl_like"] == "trl packed" and packed["x_trl"] == pytest.approx(100 / 90)
    assert packed["x_raw"] is None
    assert d["mfu"] == pytest.approx(1e6 * 75 / 2e9)
    assert any(t.startswith("dist_ft ÷ raw >= 0.95") and "-> met" in t for t in extra["targets"])
    assert any(t.startswith("dist_ft ÷ trl >=") and "-> met" in t for t in extra["targets"])
    assert any(t.startswith("dist_ft packed ÷ trl packed") and "NOT met" in t for t in extra["targets"])
    assert not any(t.startswith("dist_ft ÷ trl packed") for t in extra["targets"])
    assert len(extra["targets"]) == 3
    assert "| dist_ft |" in md and "| dist_ft packed |" in md


def test_precision_runs_are_set_against_their_own_kind_and_fp32():
    """--precisions fp32,bf16-mixed,bf16-true: the runners of each precision, TRL in fp32 and bf16-mixed only, no
    packed pair; each dist_ft row against the raw loop and TRL of its precision and against dist_ft fp32, MFU against
    the peak of its dtype, and the issue's targets (>= 2.2x / 2.5x fp32, loss within 1%, mixed peak <= fp32)."""
    job = compare.JOBS["a"]
    labels = [label for label, _, _ in compare.runners_for(job, ["fp32", "bf16-mixed", "bf16-true"])]
    assert labels == ["dist_ft fp32", "raw fp32", "trl fp32", "dist_ft bf16-mixed", "raw bf16-mixed",
                      "trl bf16-mixed", "dist_ft bf16-true", "raw bf16-true"]
    assert compare.selected("dist_ft,trl@bf16-mixed", "trl", "bf16-mixed")
    assert not compare.selected("dist_ft,trl@bf16-mixed", "trl", "fp32")
    assert not compare.selected("dist_ft,trl@bf16-mixed", "raw", "bf16-mixed")
    runs = []
    for rnd, scale in [(1, 1.0), (2, 2.0)]:
        runs += [_run("dist_ft fp32", rnd, 100 * scale, peak=1800, loss=2.50),
                 _run("dist_ft bf16-mixed", rnd, 230 * scale, peak=1500, loss=2.51, precision="bf16-mixed"),
                 _run("raw bf16-mixed", rnd, 240 * scale, peak=1500, precision="bf16-mixed"),
                 _run("trl bf16-mixed", rnd, 150 * scale, peak=1900, loss=2.52, precision="bf16-mixed"),
                 _run("dist_ft bf16-true", rnd, 240 * scale, peak=1300, loss=2.60, precision="bf16-true")]
    md, rows, extra = compare.table(job, runs, peaks={"fp32": 1e9, "bf16": 2.2e9}, flops_tok=1e6, nproc=2)
    row = {r["runner"]: r for r in rows}
    mixed, true = row["dist_ft bf16-mixed"], row["dist_ft bf16-true"]
    assert mixed["x_fp32"] == pytest.approx(2.3) and true["x_fp32"] == pytest.approx(2.4)
    assert mixed["x_raw"] == pytest.approx(230 / 240) and mixed["x_trl"] == pytest.approx(230 / 150)
    assert true["raw_like"] is None and true["trl_like"] is None  # no such runs here
    assert mixed["mfu"] == pytest.approx(1e6 * 345 / (2.2e9 * 2)) and row["dist_ft fp32"]["mfu"] == \
        pytest.approx(1e6 * 150 / 2e9)
    t = {x.split(" ÷ ")[0] + " ÷ " + x.split(" ÷ ")[1].split(" ")[0]: x for x in extra["targets"]}
    assert "-> met" in t["dist_ft bf16-mixed ÷ dist_ft"] and "2.20" in t["dist_ft bf16-mixed ÷ dist_ft"]
    assert "NOT met" in t["dist_ft bf16-true ÷ dist_ft"]  # 2.4x < 2.5x, and 4% off in loss
    assert "NOT met" in t["dist_ft bf16-mixed ÷ raw"]  # 0.958 < 0.97
    assert "-> met" in t["dist_ft bf16-mixed ÷ trl"]
    assert "dist_ft ÷ its fp32" in md


def test_compiled_runs_are_set_against_eager_with_compile_time_apart():
    """--compile: dist_ft compiled after each eager dist_ft; its row against eager (not against fp32 or as the
    eager row of another), compile seconds summed over all steps, the steps after the first two timed."""
    job = compare.JOBS["a"]
    labels = [(label, opt.get("compile", False)) for label, _, opt in compare.runners_for(job, ["fp32"], compile=True)]
    assert labels[:3] == [("dist_ft", False), ("dist_ft compiled", True), ("raw", False)]
    runs = []
    for rnd, scale in [(1, 1.0), (2, 2.0)]:
        eager, comp = _run("dist_ft", rnd, 100 * scale), _run("dist_ft compiled", rnd, 125 * scale, loss=2.001)
        comp["opt"]["compile"] = True
        comp["steps"][0].update(step_time=40.0, compile_s=39.0)  # the compiling steps are not timed (skip 2)
        comp["steps"][1].update(compile_s=0.5)
        runs += [comp, eager, _run("raw", rnd, 100 * scale)]
    md, rows, extra = compare.table(job, runs, peaks={"fp32": 1e9}, flops_tok=1e6, nproc=2)
    row = {r["runner"]: r for r in rows}
    c = row["dist_ft compiled"]
    assert c["eager_like"] == "dist_ft" and c["x_eager"] == pytest.approx(1.25) and c["compile_s"] == 39.5
    assert c["raw_like"] is None and c["x_raw"] is None and c["fp32_like"] is None  # the raw loop is eager; it is fp32
    bf16 = compare.table(job, runs + [{**_run("dist_ft compiled bf16", 1, 250, precision="bf16-mixed"),
                                       "opt": {"strategy": "ddp", "precision": "bf16-mixed", "packing": False,
                                               "compile": True}}],
                         peaks={"fp32": 1e9, "bf16": 2e9}, flops_tok=1e6, nproc=2)[1][-1]
    assert bf16["fp32_like"] == "dist_ft compiled" and bf16["x_fp32"] == pytest.approx(2.0)  # compiled against compiled
    assert row["dist_ft"]["x_raw"] == pytest.approx(1.0) and "eager_like" not in row["dist_ft"]
    assert any(t.startswith("dist_ft compiled against dist_ft: 1.25x") and "40 s compiling" in t
               and "same loss" in t for t in extra["targets"])
    assert "compiled ÷ eager" in md and "| 1.25 | 40 |" in md


def test_the_long_context_job_runs_the_fused_loss_benchmark(monkeypatch):
    """--job long is benchmarks/fused_loss.py's measurement (one micro-step's head-and-loss memory) with its
    defaults: 4,096 tokens, Llama-3's 128k vocabulary."""
    import fused_loss
    calls = []
    monkeypatch.setattr(fused_loss, "main", lambda argv=None: calls.append(argv) or 0)
    assert compare.main(["--job", "long"]) == 0 and calls == [[]]
    defaults = fused_loss.parser().parse_args([])
    assert defaults.seq == 4096 and defaults.vocab == 128_256
