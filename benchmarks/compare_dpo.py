"""The DPO job of benchmarks/compare.py: dist_ft against TRL's DPOTrainer and a raw loop, on the same pairs.

    .venv/bin/python benchmarks/compare.py --job dpo --steps 20 --rounds 1

LoRA r16 (all linear layers) on the bundled SmolLM2-135M-Instruct, WordNet preference pairs (a word's own definition
chosen, another word's rejected: configs/smollm2-dpo-wordnet.yaml), DDP on 2 processes x 1 thread, fp32, 4 pairs
per rank per step, `objective: dpo` (beta 0.1) with the reference the same model with its adapter switched off.

Runners, alternated within each round:
  dist_ft   `dist-ft launch` of configs/smollm2-dpo-wordnet.yaml with the job's steps (no forgetting evaluation)
  raw       benchmarks/raw_dpo.py under torchrun: the same calls and step math, no framework (the floor)
  trl       TRL DPOTrainer (benchmarks/trl_dpo.py) under `accelerate launch` (CPU multi-process)

The same work: dist_ft's data pipeline runs once here and its tokenised pairs, in dist_ft's order, are exported
(compare_common.py): the raw loop reads those token ids and answer masks; TRL gets the same records as messages,
tokenises them itself (checked against dist_ft's ids and masks) and reads them in the same order, under dist_ft's
learning-rate schedule; the adapter starts from dist_ft's initial values in all three (tests/test_compare_dpo.py
checks that the three train alike, step by step).

Measured: pairs/s (pairs over the summed step times of steps 3..N) and seconds per step, peak resident memory per
rank, and after the last step the DPO loss of the held-out pairs (trained policy against the adapter-off reference)
and the policy's preference accuracy on them (chosen answer more likely than the rejected one), evaluated the same
way in every runner. Results: benchmarks/results/compare-dpo.{json,md}.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
from pathlib import Path

import yaml

import compare

REPO = compare.REPO
CONFIG = REPO / "configs" / "smollm2-dpo-wordnet.yaml"
HELD_OUT = 128  # the recipe's max_eval_samples
JOB = {"title": "DPO, LoRA r16 on SmolLM2-135M-Instruct, WordNet preference pairs, DDP",
       "model": "smollm2-135m-instruct"}
RUNNERS = [("dist_ft", "dist_ft"), ("raw", "raw"), ("trl", "trl")]


def dpo_recipe(*, model: str, steps: int, out: Path, held_out: int = HELD_OUT) -> dict:
    """configs/smollm2-dpo-wordnet.yaml with the job's model, steps and output; evaluation reduced to the held-out
    pairs (before and after training), the reference named explicitly."""
    r = yaml.safe_load(CONFIG.read_text())
    r.update(output_dir=str(out), overwrite_output_dir=True, eval={"metrics": []})
    r["model"]["path"] = model
    r["data"]["max_eval_samples"] = held_out
    r["objective"]["reference"] = "adapter_off"
    r["training"].update(max_steps=steps, warmup_steps=min(5, steps // 4), eval_every=0)
    return r


def export_pairs(recipe: dict, job_dir: Path, *, positions: int) -> Path:
    """Run dist_ft's data pipeline once and write the pairs the raw loop and TRL read (see compare_common.py)."""
    from dist_ft.assets import resolve_model_path
    from dist_ft.config import recipe_from_dict
    from dist_ft.data.batching import SampleOrder
    from dist_ft.data.dataset import _collect, prepare_data
    from dist_ft.model import LazyTokenizer

    rec = recipe_from_dict(recipe)
    path = resolve_model_path(rec.model.path)
    data = prepare_data(rec, LazyTokenizer(path), log=lambda m: None)  # the trainer's cache entry
    parts, _, _ = _collect(rec, lambda m: None)  # the records behind the pairs, in the same order
    records, held = parts[0].train, parts[0].eval
    if len(records) != len(data.train) or len(held) != len(data.eval):
        raise RuntimeError("tokenisation dropped pairs: the exported pairs cannot be matched to their text")
    d, c = rec.data, rec.data.columns

    def line(ex, r) -> str:
        s = ex.split
        prompt = ([{"role": "system", "content": d.system_prompt}] if d.system_prompt else []) + \
            [{"role": "user", "content": r[c.prompt]}]
        return json.dumps({"chosen_ids": ex.input_ids[:s].tolist(), "chosen_labels": ex.labels[:s].tolist(),
                           "rejected_ids": ex.input_ids[s:].tolist(), "rejected_labels": ex.labels[s:].tolist(),
                           "prompt": prompt, "chosen": [{"role": "assistant", "content": r[c.chosen]}],
                           "rejected": [{"role": "assistant", "content": r[c.rejected]}]}) + "\n"

    job_dir.mkdir(parents=True, exist_ok=True)
    order = SampleOrder(len(data.train), rec.seed, d.shuffle).rows(0, positions)
    (job_dir / "train.jsonl").write_text("".join(line(data.train[i], records[i]) for i in order))
    (job_dir / "eval.jsonl").write_text("".join(line(e, r) for e, r in zip(data.eval, held)))
    o = rec.objective
    compare.write_job(rec, path, job_dir, pad_id=data.pad_token_id, positions=positions, objective=o.kind,
                      beta=o.resolved_beta(), label_smoothing=o.label_smoothing)
    return job_dir


# ------------------------------------------------------------------------------------------------ runners

def run_dist_ft(recipe: dict, work: Path, nproc: int, prefix: list[str] = ()) -> dict:
    out = Path(recipe["output_dir"])
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [*prefix, sys.executable, "-m", "dist_ft", "launch", str(path), "--nproc-per-node", str(nproc)]
    run = compare._run(cmd, work / f"{out.name}.log")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": r["step"], "loss": r["loss"], "step_time": r["step_time"], "pairs": r["targets"],
              "useful_tokens": r["useful_tokens"], "tokens": r["tokens"], "reward_accuracy": r["reward_accuracy"],
              "grad_norm": r["grad_norm"], "lr": r["lr"]} for r in records if "loss" in r]
    evals = [{"loss": r["eval_loss"], "accuracy": r["eval_preference_accuracy"],
              "reward_accuracy": r["eval_reward_accuracy"]} for r in records if "eval_loss" in r]
    end = next(r for r in records if r.get("event") == "end")
    return {"steps": steps, "heldout": evals[-1], "heldout_before": evals[0], "peak_mb": end["peak_memory_mb"], **run}


def run_raw(job_dir: Path, work: Path, nproc: int, name: str, prefix: list[str] = ()) -> dict:
    out = work / f"{name}.json"
    cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", compare._free_port(), str(REPO / "benchmarks" / "raw_dpo.py"), "--job-dir", str(job_dir),
           "--out", str(out)]
    return {**compare._run(cmd, work / f"{name}.log"), **json.loads(out.read_text())}


def trl_command(job_dir: Path, out: Path, output_dir: Path, nproc: int) -> list[str]:
    """The one accelerate launch that gives a real world size of nproc on CPU (compare.run_trl says why)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--main_process_port", compare._free_port(), "--mixed_precision", "no",
            "--dynamo_backend", "no", str(REPO / "benchmarks" / "trl_dpo.py"), "--job-dir", str(job_dir),
            "--out", str(out), "--output-dir", str(output_dir)]


def run_trl(job_dir: Path, work: Path, nproc: int, name: str, prefix: list[str] = ()) -> dict:
    out = work / f"{name}.json"
    cmd = [*prefix, *trl_command(job_dir, out, work / name, nproc)]
    run = compare._run(cmd, work / f"{name}.log", env={"ACCELERATE_USE_CPU": "1"})
    return {**run, **json.loads(out.read_text())}


def run_kind(kind: str, job_dir: Path, work: Path, nproc: int, name: str, steps: int, model: str) -> dict:
    if kind == "dist_ft":
        return run_dist_ft(dpo_recipe(model=model, steps=steps, out=work / name), work, nproc)
    return (run_raw if kind == "raw" else run_trl)(job_dir, work, nproc, name)


# ------------------------------------------------------------------------------------------------ the table

def summarise(run: dict, skip: int = 2) -> dict:
    timed = run["steps"][skip:] or run["steps"]
    seconds = sum(s["step_time"] for s in timed)
    return {"pairs_per_s": sum(s["pairs"] for s in timed) / seconds,
            "useful_tokens_per_s": sum(s["useful_tokens"] for s in timed) / seconds,
            "s_per_step": statistics.median(s["step_time"] for s in timed), "peak_mb": max(run["peak_mb"]),
            "heldout_loss": run["heldout"]["loss"], "heldout_accuracy": run["heldout"]["accuracy"],
            "heldout_reward_accuracy": run["heldout"]["reward_accuracy"]}


def table(runs: list[dict]) -> tuple[str, list[dict], list[str]]:
    """Medians over rounds per runner; dist_ft's ratios taken within each round, then their median."""
    by = collections.defaultdict(dict)  # label -> round -> summary
    for r in runs:
        by[r["label"]][r["round"]] = summarise(r)
    labels = [label for label, _ in RUNNERS if label in by]

    def med(label, key):
        return statistics.median(s[key] for s in by[label].values())

    def ratio(a, b):
        vals = [by[a][k]["pairs_per_s"] / by[b][k]["pairs_per_s"] for k in by[a] if k in by[b]]
        return statistics.median(vals) if vals else None

    keys = ("pairs_per_s", "useful_tokens_per_s", "s_per_step", "peak_mb", "heldout_loss", "heldout_accuracy",
            "heldout_reward_accuracy")
    rows = [{"runner": label, **{k: med(label, k) for k in keys},
             "pairs_per_s_rounds": [by[label][k]["pairs_per_s"] for k in sorted(by[label])],
             "others_cpu_max": max(r.get("foreign_cpu", 0.0) for r in runs if r["label"] == label)} for label in labels]
    row = {r["runner"]: r for r in rows}
    if "dist_ft" in row:
        row["dist_ft"]["x_raw"] = ratio("dist_ft", "raw") if "raw" in row else None
        row["dist_ft"]["x_trl"] = ratio("dist_ft", "trl") if "trl" in row else None
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    names = {"dist_ft": "dist_ft", "raw": "raw loop", "trl": "TRL DPOTrainer"}
    lines = ["| runner | pairs/s | s / step | peak MiB / rank | held-out DPO loss | preference accuracy | "
             "dist_ft ÷ TRL | dist_ft ÷ raw |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {names[r['runner']]} | {r['pairs_per_s']:.2f} | {r['s_per_step']:.2f} | {r['peak_mb']:,.0f} | "
                     f"{r['heldout_loss']:.4f} | {r['heldout_accuracy']:.1%} | {f(r.get('x_trl'), '.2f')} | "
                     f"{f(r.get('x_raw'), '.3f')} |")
    noisy = max(r["others_cpu_max"] for r in rows)
    lines.append(f"\nOther processes on the machine took up to {noisy:.0%} of its cores during a run"
                 + (" (the figures above are disturbed)." if noisy > 0.1 else "."))
    return "\n".join(lines), rows, targets(row)


def targets(row: dict) -> list[str]:
    """Issue 23: >= 1.25x TRL's pairs/s at equal or lower peak memory per rank (equal: within 1%, what BLAS's buffer
    pool moves), the same held-out DPO loss (within 0.01); and the raw loop's bar, >= 0.95x at equal memory."""
    out, d = [], row.get("dist_ft")
    if d is None:
        return out
    if d.get("x_trl") is not None:
        t = row["trl"]
        dloss = d["heldout_loss"] - t["heldout_loss"]
        ok = d["x_trl"] >= 1.25 and d["peak_mb"] <= t["peak_mb"] * 1.01 and abs(dloss) <= 0.01
        out.append(f"dist_ft ÷ TRL DPOTrainer >= 1.25 pairs/s at equal or lower peak memory, the same held-out DPO "
                   f"loss (±0.01): {d['x_trl']:.2f}x, {d['peak_mb']:,.0f} vs {t['peak_mb']:,.0f} MiB, loss "
                   f"{dloss:+.4f} -> {'met' if ok else 'NOT met'}")
    if d.get("x_raw") is not None:
        r = row["raw"]
        ok = d["x_raw"] >= 0.95 and d["peak_mb"] <= r["peak_mb"] * 1.01
        out.append(f"dist_ft ÷ raw loop >= 0.95 pairs/s at equal (within 1%) or lower peak memory: {d['x_raw']:.3f}, "
                   f"{d['peak_mb']:,.0f} vs {r['peak_mb']:,.0f} MiB -> {'met' if ok else 'NOT met'}")
    return out


# ------------------------------------------------------------------------------------------------ profiling

IN_LOOP = {"dist_ft": compare.IN_LOOP["dist_ft"], "raw": ("main (raw_dpo.py", "main (benchmarks/raw_dpo.py"),
           "trl": ("_inner_training_loop (transformers/trainer.py",)}
CATEGORIES = [  # (category, any of these in a stack); the first match wins
    *compare.CATEGORIES[:4],  # collectives, optimizer step, clipping, backward
    # The reference: dist_ft's ReferencePolicy.logps, the raw loop's reference_logps; TRL 1.16.0 calls it inline.
    ("reference forward (adapter off, no grad)", ("logps (dist_ft/train/reference.py", "reference_logps (",
                                                  "dpo_trainer.py:1336")),
    ("TRL's fused head: log-probs, entropy, top-1 at every position", ("_ChunkedLogProbFunction",)),
    compare.CATEGORIES[5],  # forward (model)
    ("log-probs of the answers (log-softmax, gather)", ("sequence_logps (",)),
    ("TRL's per-step metrics", ("dpo_trainer.py:15", "dpo_trainer.py:160")),  # _compute_loss, after the loss
    ("data (rows, collate)", compare.CATEGORIES[6][1] + ("collate_pairs", "DataCollatorForPreference")),
]
NOT_STEP = compare.NOT_STEP + ("heldout_preference", "same_tokens")


def profile_runners(job_dir: Path, work: Path, steps: int, nproc: int) -> str:
    """Each runner once under py-spy: where its training steps' time goes, by category."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise SystemExit("--profile needs py-spy: pip install 'dist-ft[bench]'")
    lines = []
    for kind in ("dist_ft", "raw", "trl"):
        out = work / f"profile-{kind}.txt"
        prefix = [str(spy), "record", "--subprocesses", "--idle", "--rate", "50", "--format", "raw", "-o", str(out),
                  "--"]
        if kind == "dist_ft":
            run = run_dist_ft(dpo_recipe(model=JOB["model"], steps=steps, out=work / "profile-dist_ft"), work, nproc,
                              prefix)
        else:
            run = (run_raw if kind == "raw" else run_trl)(job_dir, work, nproc, f"profile-{kind}", prefix)
        shares = compare.where_time_goes(out, kind, in_loop=IN_LOOP, categories=CATEGORIES, not_step=NOT_STEP)
        step = summarise(run)["s_per_step"]
        lines.append(f"\n{kind} ({steps} steps under py-spy, median {step:.2f} s/step; samples of both ranks inside "
                     f"the training steps):\n")
        lines += [f"  {share:6.1%}  {share * step:6.3f} s/step  {cat}" for cat, share in list(shares.items())[:14]]
        lines.append(f"  (raw stacks: {out})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the job

def run_job(*, steps: int, rounds: int, nproc: int, only: set[str] | None, work: Path, argv: list[str] | None,
            argv_text: str, profile: bool = False) -> None:
    model = JOB["model"]
    work.mkdir(parents=True, exist_ok=True)
    positions = steps * 4 * nproc
    print(f"[compare] job dpo: {JOB['title']}; exporting {positions} pairs from dist_ft's pipeline", flush=True)
    job_dir = export_pairs(dpo_recipe(model=model, steps=steps, out=work / "export"), work / "job",
                           positions=positions)
    if profile:
        text = profile_runners(job_dir, work, steps, nproc)
        print(text)
        compare.RESULTS.mkdir(parents=True, exist_ok=True)
        head = f"# Where the time goes, job dpo\n\nCommand: `python benchmarks/compare.py {argv_text}`\n\n"
        (compare.RESULTS / "compare-dpo-profile.md").write_text(f"{head}```\n{text}\n```\n")
        return
    runs, failures = [], []
    for rnd in range(1, rounds + 1):
        for label, kind in RUNNERS:
            if only and kind not in only:
                continue
            name = f"{label}-r{rnd}"
            print(f"[compare] round {rnd}: {label} ...", flush=True)
            try:
                res = run_kind(kind, job_dir, work, nproc, name, steps, model)
            except RuntimeError as exc:  # one failed runner must not lose the others' figures
                print(f"[compare]   failed: {exc}", flush=True)
                failures.append(f"{label} (round {rnd}): {str(exc).splitlines()[0]}")
                continue
            res.update(label=label, round=rnd)
            s = summarise(res)
            print(f"[compare]   {s['pairs_per_s']:.2f} pairs/s, {s['s_per_step']:.2f} s/step, peak {res['peak_mb']} "
                  f"MiB, held-out DPO loss {s['heldout_loss']:.4f}, preference accuracy {s['heldout_accuracy']:.1%} "
                  f"({res['wall_s']:.0f} s; other processes took {res['foreign_cpu']:.0%} of the cores meanwhile)",
                  flush=True)
            runs.append(res)
    md, rows, goals = table(runs)
    before = next((r["heldout_before"] for r in runs if r.get("heldout_before")), None)
    head = (f"Job dpo: {JOB['title']}; {steps} steps of {4 * nproc} pairs ({nproc} processes x 1 thread, 4 pairs "
            f"each), fp32, beta 0.1, reference = adapter off; {rounds} round(s) alternating the runners. Medians over "
            f"steps 3..{steps} and over rounds; ratios taken within each round. Held-out: {HELD_OUT} pairs"
            + (f" (before training: DPO loss {before['loss']:.4f}, preference accuracy {before['accuracy']:.1%})."
               if before else "."))
    text = f"{head}\n\n{md}\n\nTargets:\n" + "\n".join(f"- {t}" for t in goals)
    trl = next((r for r in runs if r["label"] == "trl"), None)
    if trl is not None:
        m = trl["tokenisation_matches"]
        text += f"\n\nTRL tokenised {m['identical']} of the {m['checked']} pairs it trained on exactly as dist_ft did."
    if failures:
        text += "\n\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures)
    print("\n" + text)
    compare.write_results("compare-dpo", "dist_ft vs raw loop vs TRL DPOTrainer, job dpo", "compare.py", argv, text,
                          {"command": f"python benchmarks/compare.py {argv_text}", "job": "dpo", "title": JOB["title"],
                           "steps": steps, "rounds": rounds, "nproc": nproc, "rows": rows, "targets": goals,
                           "failures": failures, "runs": runs})
