"""`dist-ft report RUN_DIR`: report.md and PNG plots from a run's metrics.jsonl, finished or still running.

A run that was resumed logged the steps after its checkpoint again; the last record of each step wins, so the
plots show the run as it finally went.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def read_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file; is {run_dir} a dist_ft run directory?")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # the line being written right now
    return out


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    by_step = {r["step"]: r[key] for r in records
               if "step" in r and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _plot(path: Path, title: str, ylabel: str, lines: list[tuple[str, list, list, str]], log_y: bool = False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for label, xs, ys, style in lines:
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=4)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _preference_plots(records: list[dict], plots: Path) -> list[tuple[str, str]]:
    """A preference objective's rewards, margin and accuracies (training steps and evaluations)."""
    made = []
    series = {k: _series(records, k) for k in ("chosen_reward", "rejected_reward", "margin", "eval_chosen_reward",
                                               "eval_rejected_reward", "reward_accuracy", "eval_reward_accuracy",
                                               "eval_preference_accuracy")}
    if series["chosen_reward"][0] or series["eval_chosen_reward"][0]:
        _plot(plots / "rewards.png", "Implicit rewards", "reward",
              [(k.replace("_", " "), *series[k], "o-" if k.startswith("eval") else "-")
               for k in ("chosen_reward", "rejected_reward", "margin", "eval_chosen_reward", "eval_rejected_reward")])
        made.append(("Rewards", "rewards.png"))
    if series["reward_accuracy"][0] or series["eval_preference_accuracy"][0]:
        _plot(plots / "preference_accuracy.png", "Pairs ranked right", "share of pairs",
              [(k.replace("_", " "), *series[k], "o-" if k.startswith("eval") else "-")
               for k in ("reward_accuracy", "eval_reward_accuracy", "eval_preference_accuracy")])
        made.append(("Preference accuracy", "preference_accuracy.png"))
    return made


def make_report(run_dir: str | Path) -> tuple[Path, str]:
    """Write report.md and plots into run_dir; return (report path, short summary)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    train = [r for r in records if "loss" in r]
    starts = [r for r in records if r.get("event") == "start"]
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    s_loss, loss = _series(records, "loss")
    s_eval, ev = _series(records, "eval_loss")
    if s_loss or s_eval:
        _plot(plots / "loss.png", "Loss", "loss (nats / token)",
              [("train", s_loss, loss, "-"), ("eval", s_eval, ev, "o-")])
        made.append(("Loss", "loss.png"))
    for key, title, ylabel, name in (("lr", "Learning rate", "lr", "lr.png"),
                                     ("tokens_per_s", "Throughput (all ranks)", "tokens / s", "throughput.png"),
                                     ("peak_memory_mb", "Peak memory (rank 0)", "MiB", "memory.png")):
        xs, ys = _series(records, key)
        if xs:
            _plot(plots / name, title, ylabel, [(key, xs, ys, "-")])
            made.append((title, name))
    made += _preference_plots(records, plots)
    checkpoints = [r["step"] for r in records if r.get("event") == "checkpoint"]
    rows = [("steps logged", f"{max(s_loss) if s_loss else 0}"),
            ("status", "finished" if end else "running or stopped"),
            ("world size", f"{starts[-1].get('world_size')}" if starts else "?"),
            ("resumed", f"{len(starts) - 1} time(s)" if len(starts) > 1 else "no")]
    if loss:
        rows.append(("train loss first -> last", f"{loss[0]:.4f} -> {loss[-1]:.4f}"))
    if ev:
        rows.append(("eval loss first -> best -> last", f"{ev[0]:.4f} -> {min(ev):.4f} -> {ev[-1]:.4f}"))
    _, acc = _series(records, "eval_preference_accuracy")
    if acc:
        rows.append(("held-out preference accuracy first -> last", f"{acc[0]:.1%} -> {acc[-1]:.1%}"))
    timed = [r for r in train if "tokens_per_s" in r][1:] or train
    if timed and "tokens_per_s" in timed[0]:
        rows.append(("median tokens/s", f"{statistics.median(r['tokens_per_s'] for r in timed):,.0f}"))
        if "mfu" in timed[0]:
            rows.append(("median MFU", f"{100 * statistics.median(r['mfu'] for r in timed):.1f}%"))
    if end and end.get("peak_memory_mb"):
        rows.append(("peak memory per rank (MiB)", ", ".join(f"{m:,.0f}" for m in end["peak_memory_mb"])))
    if checkpoints:
        rows.append(("checkpoints at steps", ", ".join(map(str, checkpoints))))
    md = [f"# Run report: {run_dir.name}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    for title, name in made:
        md += [f"## {title}", "", f"![{title}](plots/{name})", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(md))
    summary = "; ".join(f"{k} {v}" for k, v in rows)
    return report, summary
