"""Fine-tuning methods compared on real weights: the bundled SmolLM2-135M-Instruct learns WordNet definitions.

    .venv/bin/python benchmarks/methods.py                 # full, lora, qlora, partial; 40 steps each, 2 ranks
    .venv/bin/python benchmarks/methods.py --steps 20 --runs lora,qlora

For each method, one `dist-ft launch` with the same data, steps and batch. Reported: held-out loss on WordNet
definitions before and after, peak memory per rank, seconds per step, trainable parameters, and forgetting: the
change in loss on general text the model was not fine-tuned on (the first 64 topics of CPython's pydoc_data,
128 tokens each), measured on the base model and on each fine-tuned model in this process.
Results: benchmarks/results/methods-smollm2.{json,md}.
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

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

METHODS = {
    "full": ({"kind": "full"}, 5e-5),
    "lora": ({"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}, 1e-3),
    "qlora": ({"kind": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}, 1e-3),
    "partial": ({"kind": "partial", "partial": {"last_blocks": 6, "head": False}}, 1e-4),
    "ia3": ({"kind": "ia3"}, 3e-3),
}


def general_text_loss(model, tok, n: int = 64, max_length: int = 128) -> float:
    """Mean next-token loss on pydoc topics (text the fine-tune never saw)."""
    from dist_ft.data.sources import resolve_source
    records = resolve_source("builtin:pydoc").load()[:n]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for r in records:
            ids = tok(r["text"], truncation=True, max_length=max_length, return_tensors="pt").input_ids
            if ids.size(1) < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.size(1) - 1
    return total / count


def run_one(workdir: Path, name: str, steps: int, nproc: int) -> dict:
    method, lr = METHODS[name]
    out = workdir / name
    recipe = yaml.safe_load((REPO / "dist_ft" / "recipes" / "demo.yaml").read_text())
    recipe.update(output_dir=str(out), overwrite_output_dir=True, method=method)
    recipe["training"].update(max_steps=steps, learning_rate=lr, warmup_steps=min(5, steps // 4))
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", str(nproc)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stdout[-2000:], res.stderr[-3000:], file=sys.stderr)
        return {"method": name, "error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    steps_r = [r for r in records if "loss" in r]
    start = next(r for r in records if r.get("event") == "start")
    end = next(r for r in records if r.get("event") == "end")
    from dist_ft.checkpoint.export import load_trained
    model, tok = load_trained(out)
    return {"method": name, "lr": lr, "trainable": start["trainable_params"], "total": start["total_params"],
            "eval_before": evals[0]["eval_loss"], "eval_after": evals[-1]["eval_loss"],
            "peak_mb": max(end["peak_memory_mb"]), "s_per_step": statistics.median(r["step_time"] for r in steps_r[1:]),
            "wall_s": wall, "general_after": general_text_loss(model, tok)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="full,lora,qlora,partial")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args(argv)
    from dist_ft.assets import resolve_model_path
    from dist_ft.model import load_tokenizer
    from transformers import AutoModelForCausalLM
    base_path = resolve_model_path("smollm2-135m-instruct")
    base_general = general_text_loss(AutoModelForCausalLM.from_pretrained(base_path), load_tokenizer(base_path))
    print(f"[bench] base model: general-text loss {base_general:.4f}", flush=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "dist_ft_methods_bench"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.runs.split(","):
        print(f"[bench] {name} ...", flush=True)
        rows.append(run_one(workdir, name, a.steps, a.nproc))
        print(f"[bench] {rows[-1]}", flush=True)
    lines = ["| method | trainable | held-out loss before -> after | forgetting (general-text loss change) | "
             "peak MiB / rank | s / step |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:60]} | | | | |")
            continue
        lines.append(f"| {r['method']} (lr {r['lr']:g}) | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.1f}%) | "
                     f"{r['eval_before']:.3f} -> {r['eval_after']:.3f} | {r['general_after'] - base_general:+.3f} | "
                     f"{r['peak_mb']:,.0f} | {r['s_per_step']:.2f} |")
    md = "\n".join(lines)
    head = (f"SmolLM2-135M-Instruct on WordNet definitions, {a.steps} steps, {a.nproc} ranks x micro-batch 4, fp32; "
            f"general text (pydoc topics) loss of the base model: {base_general:.4f}")
    print(f"\n{head}\n\n{md}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "methods-smollm2.json").write_text(json.dumps({"base_general": base_general, "rows": rows}, indent=2))
    (RESULTS / "methods-smollm2.md").write_text(f"# Methods\n\nCommand: `python benchmarks/methods.py "
                                                f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{head}\n\n{md}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
