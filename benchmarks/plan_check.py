"""`dist-ft plan` against measurement: the predicted per-rank peak next to the measured one, on this machine.

    .venv/bin/python benchmarks/plan_check.py                       # 130M and SmolLM2 cases (~15 min on 2 cores)
    .venv/bin/python benchmarks/plan_check.py --with-1b              # also two 1.1B cases (~10 min more)

Each case is a real 2-rank `dist-ft launch` (benchmarks/strategies.py's runner: glibc told to return freed memory,
peak resident set per rank), and the plan of the very same recipe for a 2-process CPU "cluster" (on CPU the device
is the process). Prints predicted, measured, ratio and whether it is within +-15%; writes
benchmarks/results/plan-check.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from strategies import model_folder, run_one  # noqa: E402

CASES = {
    "130m": ["ddp:none:full", "ddp:none:lora", "fsdp:none:full", "fsdp:none:lora:ac", "zero2:none:full",
             "zero3:none:full", "zero3:all:full", "zero3:none:full:ac"],
    "smollm2": ["ddp:none:lora", "fsdp:none:full"],
    "1.1b": ["fsdp:all:full", "fsdp:none:lora:ac", "zero3:none:full"],
}
TOLERANCE = 0.15
RESULTS_JSON = REPO / "benchmarks" / "results" / "plan-check.json"


def predict(recipe_path: Path, nproc: int) -> float:
    from dist_ft.config import load_recipe
    from dist_ft.plan import GIB, make_cluster, make_plan

    plan = make_plan(load_recipe(recipe_path), make_cluster(nodes=1, gpus_per_node=nproc, gpu="cpu"),
                     find_max=False)
    # On CPU the process is the device: its peak is the larger of training and building/loading the model.
    return max(plan.device_total, plan.cpu_load_peak) / GIB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--with-1b", action="store_true")
    p.add_argument("--only", default=None, help="e.g. 130m:ddp:none:full (comma-separated)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    cases = [(size, spec) for size, specs in CASES.items() for spec in specs
             if size != "1.1b" or args.with_1b]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [(s, c) for s, c in cases if f"{s}:{c}" in wanted]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dft-plan-check-") as tmp:
        for size, spec in cases:
            if size == "smollm2":
                from dist_ft.assets import resolve_model_path
                model = resolve_model_path("smollm2-135m-instruct")
            else:
                model = model_folder(size)
            strategy, offload, method, *rest = spec.split(":")
            work = Path(tmp) / f"{size}-{spec.replace(':', '-')}"
            work.mkdir()
            micro = 1 if size == "1.1b" else 2
            res = run_one(model, work, strategy=strategy, offload=offload, method=method, ac="ac" in rest,
                          steps=args.steps, micro=micro, seq=256, nproc=2)
            recipe = next(work.glob("*.yaml"))
            predicted = predict(recipe, 2)
            row = {"case": f"{size} {res['run']}", "predicted_gib": round(predicted, 3)}
            if "error" in res:
                row["error"] = res["error"][:120]
            else:
                measured = res["peak_mb_per_rank"] / 1024
                row.update(measured_gib=round(measured, 3), ratio=round(predicted / measured, 3),
                           within=abs(predicted / measured - 1) <= TOLERANCE, s_per_step=round(res["s_per_step"], 2))
            rows.append(row)
            print(f"[plan-check] {row}", flush=True)
    results = RESULTS_JSON
    if args.only and results.is_file():  # a re-check of some cases: keep the others' rows
        fresh = {r["case"]: r for r in rows}
        old = json.loads(results.read_text())
        rows = [fresh.pop(r["case"], r) for r in old] + list(fresh.values())
    lines = ["# `dist-ft plan` against measured peaks (2 CPU ranks, seq 256)", "",
             "Command: `python benchmarks/plan_check.py" + (" --with-1b" if args.with_1b else "") + "`", "",
             "| case | predicted GiB / rank | measured GiB / rank | predicted / measured | within +-15% |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['predicted_gib']:.2f} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['case']} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {r['ratio']:.2f} | "
                         f"{'yes' if r['within'] else 'NO'} |")
    ok = [r for r in rows if r.get("within")]
    lines += ["", f"{len(ok)} of {len(rows)} within +-{TOLERANCE:.0%}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "benchmarks" / "results"
    (out / "plan-check.md").write_text(text)
    RESULTS_JSON.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
