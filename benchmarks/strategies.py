"""Peak memory per rank and throughput of every strategy, side by side in one invocation, on 2 ranks.

    .venv/bin/python benchmarks/strategies.py                          # ~130M Llama-shaped model, full fine-tuning
    .venv/bin/python benchmarks/strategies.py --size 1.1b --steps 3 \\
        --runs fsdp:all:full,zero3:all:full,fsdp:none:lora:ac          # TinyLlama-sized model

Each run is a real `dist-ft launch` with glibc told to return freed memory (MALLOC_MMAP_THRESHOLD_=131072,
MALLOC_TRIM_THRESHOLD_=0), else freed pages stay resident and hide the sharding. Peak memory is each rank's
peak resident set size (CUDA max allocated on GPUs). Results go to benchmarks/results/strategies-<size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_RUNS = ("ddp:none:full,fsdp:none:full,fsdp:all:full,zero1:none:full,zero2:none:full,"
                "zero2:optimizer:full,zero3:none:full,zero3:all:full,ddp:none:full:ac,fsdp:none:full:ac,"
                "zero3:none:full:ac")


def model_folder(size: str) -> Path:
    from dist_ft.assets import cache_root
    from dist_ft.testing import make_model

    folder = cache_root() / "bench" / f"llama-{size}"
    if not (folder / "config.json").exists():
        print(f"[bench] building a random Llama-shaped {size} model in {folder} (once)", flush=True)
        make_model(folder, arch="llama", size=size, vocab_size=32000)
    return folder


def run_one(model: Path, workdir: Path, *, strategy: str, offload: str, method: str, ac: bool, steps: int,
            micro: int, seq: int, nproc: int) -> dict:
    name = f"{strategy}-{offload}-{method}{'-ac' if ac else ''}"
    out = workdir / name
    recipe = {
        "output_dir": str(out), "overwrite_output_dir": True, "seed": 0,
        "model": {"path": str(model)},
        "data": {"train": "builtin:fortunes", "format": "text", "max_length": seq, "packing": True,
                 "max_train_samples": 4000, "max_eval_samples": 1, "eval_fraction": 0.01},
        "method": {"kind": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "training": {"max_steps": steps, "micro_batch_size": micro, "learning_rate": 1e-5, "warmup_steps": 0},
        "distributed": {"strategy": strategy, "offload": offload, "activation_checkpointing": ac,
                        "precision": "fp32"},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", str(nproc)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
        return {"run": name, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_r = [r for r in records if "loss" in r]
    end = next(r for r in records if r.get("event") == "end")
    timed = steps_r[1:] or steps_r  # the first step pays for warm-up
    return {"run": name, "strategy": strategy, "offload": offload, "method": method, "activation_checkpointing": ac,
            # Training peak: rank 0's from its last step record (before the final save), the other ranks' whole-run
            # peak (they write nothing whole). The final save gathers the whole model on rank 0 under FSDP2 and
            # ZeRO-3: reported on its own, it is a one-off and not what sharding is about.
            "peak_mb_per_rank": max([steps_r[-1]["peak_memory_mb"], *end["peak_memory_mb"][1:]]),
            "peak_mb_with_save": max(end["peak_memory_mb"]), "peak_mb_ranks": end["peak_memory_mb"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "s_per_step": statistics.median(r["step_time"] for r in timed),
            "final_loss": steps_r[-1]["loss"], "wall_s": wall}


def write_results(stem: str, title: str, script: str, argv: list[str] | None, body: str, data) -> None:
    """benchmarks/results/<stem>.json and .md: the data, and the title, the command that made it and the body."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / f"{stem}.md").write_text(f"# {title}\n\nCommand: `python benchmarks/{script} {args}`\n\n{body}\n")


def table(rows: list[dict], ref: dict | None) -> str:
    lines = ["| run | peak MiB / rank, training | x DDP | with the final save | tokens/s | x DDP | s / step | "
             "final loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        mem_x = f"{r['peak_mb_per_rank'] / ref['peak_mb_per_rank']:.2f}" if ref else "-"
        tok_x = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        lines.append(f"| {r['run']} | {r['peak_mb_per_rank']:,.0f} | {mem_x} | {r['peak_mb_with_save']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {tok_x} | "
                     f"{r['s_per_step']:.2f} | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="130m", choices=["tiny", "small", "130m", "1.1b"])
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated strategy:offload:method[:ac]")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args(argv)
    model = model_folder(a.size)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"dist_ft_bench_{a.size}"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in a.runs.split(","):
        strategy, offload, method, *rest = spec.split(":")
        print(f"[bench] {spec} ...", flush=True)
        row = run_one(model, workdir, strategy=strategy, offload=offload, method=method, ac="ac" in rest,
                      steps=a.steps, micro=a.micro_batch, seq=a.seq, nproc=a.nproc)
        print(f"[bench] {row}", flush=True)
        rows.append(row)
    ref = next((r for r in rows if r.get("strategy") == "ddp" and r.get("method") == "full" and "error" not in r),
               None)
    md = table(rows, ref)
    print(f"\n{a.size} Llama-shaped model, {a.nproc} ranks, micro-batch {a.micro_batch} x {a.seq} tokens, fp32\n")
    print(md)
    write_results(f"strategies-{a.size}", f"Strategies, {a.size} model, {a.nproc} ranks", "strategies.py", argv, md,
                  rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
