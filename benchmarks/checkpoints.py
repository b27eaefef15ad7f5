"""Checkpoint save and load time and size per strategy, side by side in one invocation, on 2 ranks.

    .venv/bin/python benchmarks/checkpoints.py                     # ~130M Llama-shaped model
    .venv/bin/python benchmarks/checkpoints.py --runs fsdp:full,zero3:lora

For each strategy:method, one `dist-ft launch` trains 1 step and stops with a checkpoint
(training.stop_after_steps), a second resumes from it (checkpoint.resume: auto) and trains 1 more. Save time
(write + hash + manifest + rename), load time (model + optimizer + RNG, after the checksum check) and the size on
disk come from the runs' metrics.jsonl; the checksum verification time is the difference between the resumed
run's start and the load, so it is printed apart. Results: benchmarks/results/checkpoints-<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import REPO, model_folder, write_results  # noqa: E402

DEFAULT_RUNS = "ddp:full,fsdp:full,zero2:full,zero3:full,ddp:lora,fsdp:lora,zero3:lora"


def _launch(path: Path, nproc: int, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", str(nproc),
                          *overrides], capture_output=True, text=True, env=env, cwd=REPO)
    return res, time.perf_counter() - t0


def run_one(model: Path, workdir: Path, strategy: str, method: str, nproc: int, seq: int) -> dict:
    name = f"{strategy}-{method}"
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    recipe = {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model)},
        "data": {"train": "builtin:fortunes", "format": "text", "max_length": seq, "max_train_samples": 400,
                 "max_eval_samples": 1, "eval_fraction": 0.01},
        "method": {"kind": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "training": {"max_steps": 2, "micro_batch_size": 1, "learning_rate": 1e-5},
        "distributed": {"strategy": strategy, "precision": "fp32"},
        "checkpoint": {"every_steps": 1, "keep_last": 1},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res, _ = _launch(path, nproc, "training.stop_after_steps=1")
    if res.returncode == 0:
        res, _ = _launch(path, nproc, "checkpoint.resume=auto")
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
        return {"run": name, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in records if r.get("event") == "checkpoint"]
    resumed = [r for r in records if r.get("event") == "start" and "load_seconds" in r][-1]
    first = saves[0]
    return {"run": name, "strategy": strategy, "method": method, "save_s": first["seconds"],
            "load_s": resumed["load_seconds"], "mib": first["bytes"] / 2**20, "files": first["files"]}


def table(rows: list[dict]) -> str:
    lines = ["| run | size MiB | files | save s | load s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:60]} | | | |")
        else:
            lines.append(f"| {r['run']} | {r['mib']:,.1f} | {r['files']} | {r['save_s']:.2f} | {r['load_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="130m", choices=["tiny", "small", "130m", "1.1b"])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated strategy:method")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args(argv)
    model = model_folder(a.size)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"dist_ft_ckpt_bench_{a.size}"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.runs.split(","):
        strategy, method = spec.split(":")
        print(f"[bench] {spec} ...", flush=True)
        rows.append(run_one(model, workdir, strategy, method, a.nproc, a.seq))
        print(f"[bench] {rows[-1]}", flush=True)
    md = table(rows)
    print(f"\nCheckpoints of a {a.size} Llama-shaped model (fp32, AdamW), {a.nproc} ranks\n\n{md}")
    write_results(f"checkpoints-{a.size}", f"Checkpoints, {a.size} model, {a.nproc} ranks", "checkpoints.py", argv,
                  "Save: write + sha256 + manifest + rename. Load: model + optimizer + RNG (after the checksum "
                  f"check).\n\n{md}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
