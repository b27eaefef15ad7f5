"""`dist-ft sweep RECIPE.yaml SWEEP.yaml`: hyperparameter search where every trial is a real run of the recipe.

    method: bayesian              # grid | random | bayesian (Optuna's TPE)
    objective: eval_accuracy      # a metric of the run's last evaluation
    direction: auto               # maximize | minimize | auto (lower for losses, higher otherwise)
    trials: 8
    params:
      training.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}
      method.lora.r: {choice: [4, 8, 16]}
      training.warmup_steps: {int: [0, 20]}

Each trial is `dist-ft train` (or `launch` with nproc_per_node > 1) of the recipe with the trial's values as
overrides, in its own run directory under the sweep's. The study lives in a SQLite file there, so a stopped sweep
resumes where it was (a trial cut off mid-run counts as failed and is not repeated). Pruning stops a trial whose
intermediate evaluations are below the median of earlier trials at the same step. At the end: the table of
trials (trials.md, trials.json), objective.png and importances.png, and best.yaml, a recipe ready to train.

A Weights & Biases sweep file (method, metric, parameters) is read too, translated by sweep_shapes.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from .config import RecipeError, _build, dump_recipe, load_recipe, reported_metrics
from .train.scores import LOWER_IS_BETTER
from .sweep_shapes import translate

KINDS = ("log_uniform", "uniform", "int", "choice")


@dataclass
class SweepConfig:
    method: Literal["grid", "random", "bayesian"] = "bayesian"
    objective: str = "eval_loss"
    direction: Literal["auto", "maximize", "minimize"] = "auto"
    trials: int = 8
    parallel: int = 1
    nproc_per_node: int = 1
    seed: int = 0
    pruning: bool = False
    output_dir: Optional[str] = None
    params: dict = field(default_factory=dict)

    @property
    def maximize(self) -> bool:
        if self.direction == "auto":
            return self.objective not in LOWER_IS_BETTER
        return self.direction == "maximize"


def load_sweep(path: str | Path, recipe_path: str, overrides: list[str] | None = None,
               trials: int | None = None, parallel: int | None = None, log=print) -> SweepConfig:
    """Read and check the sweep file against the recipe; every problem at once (RecipeError). A W&B sweep file is
    translated first (what was translated, and how, is logged)."""
    problems: list[str] = []
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError([f"{path}: cannot be read: {exc}"], str(path)) from exc
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: must hold a mapping (method, objective, params, ...)"], str(path))
    notes: list[str] = []
    data = translate(data, problems, notes)
    for note in notes:
        log(f"[sweep] {note}")
    params = data.pop("params", None)
    cfg = _build(SweepConfig, data, "", problems)
    cfg.trials = trials if trials is not None else cfg.trials
    cfg.parallel = parallel if parallel is not None else cfg.parallel
    for name, value in (("trials", cfg.trials), ("parallel", cfg.parallel), ("nproc_per_node", cfg.nproc_per_node)):
        if isinstance(value, int) and value < 1:  # a wrong type is already reported
            problems.append(f"{name}: {value}; give at least 1")
    if not isinstance(params, dict) or not params:
        problems.append("params: name at least one recipe key to search, e.g. "
                        "training.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}")
        params = {}
    cfg.params = {}
    for key, spec in params.items():
        where = f"params.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            problems.append(f"{where}: give one of {{log_uniform: [low, high]}}, {{uniform: [low, high]}}, "
                            "{int: [low, high]}, {choice: [a, b, ...]}")
            continue
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.{kind}: give a list")
            continue
        if kind != "choice":
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                problems.append(f"{where}.{kind}: give [low, high] numbers with low < high")
                continue
            if kind == "log_uniform" and values[0] <= 0:
                problems.append(f"{where}.log_uniform: low must be > 0")
                continue
            if cfg.method == "grid":
                problems.append(f"{where}: a grid needs listed values; write {{choice: [...]}}")
                continue
        cfg.params[key] = (kind, values)
    # Every value must make a valid recipe: try the extremes of each range and every choice now, not in trial 7.
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as exc:
        problems += exc.problems
        recipe = None
    if recipe is not None:
        for key, (kind, values) in cfg.params.items():
            for v in values:
                try:
                    load_recipe(recipe_path, [*(overrides or []), _override(key, v)])
                except RecipeError as exc:
                    problems += [f"params.{key} = {v!r}: {p}" for p in exc.problems]
        if isinstance(cfg.objective, str) and cfg.objective not in reported_metrics(recipe):
            problems.append(f"objective: {cfg.objective} is not reported by this recipe; choose one of "
                            f"{', '.join(sorted(reported_metrics(recipe)))}")
        if cfg.pruning and not recipe.training.eval_every:
            problems.append("pruning: needs evaluations during training; set training.eval_every in the recipe")
    if problems:
        raise RecipeError(problems, str(path))
    cfg.output_dir = cfg.output_dir or f"{recipe.output_dir.rstrip('/')}-sweep"
    return cfg


def _override(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def _suggest(trial, key: str, kind: str, values: list):
    if kind == "log_uniform":
        return trial.suggest_float(key, values[0], values[1], log=True)
    if kind == "uniform":
        return trial.suggest_float(key, values[0], values[1])
    if kind == "int":
        return trial.suggest_int(key, int(values[0]), int(values[1]))
    return trial.suggest_categorical(key, values)


class TrialFailed(RuntimeError):
    pass


def _evals(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "eval_loss" in r:
            out.append(r)
    return out


def run_sweep(recipe_path: str, overrides: list[str], cfg: SweepConfig, log=print) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump({**{k: v for k, v in cfg.__dict__.items() if k != "params"},
                                                     "params": {k: {kind: v} for k, (kind, v) in cfg.params.items()}},
                                                    sort_keys=False))
    if cfg.method == "grid":
        sampler = optuna.samplers.GridSampler({k: v for k, (_, v) in cfg.params.items()}, seed=cfg.seed)
        total = min(cfg.trials, math.prod(len(v) for _, v in cfg.params.values()))
    elif cfg.method == "random":
        sampler, total = optuna.samplers.RandomSampler(seed=cfg.seed), cfg.trials
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=min(4, max(1, cfg.trials // 2)))
        total = cfg.trials
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if cfg.pruning else \
        optuna.pruners.NopPruner()
    study = optuna.create_study(study_name="dist-ft", storage=f"sqlite:///{root.resolve()}/study.db",
                                load_if_exists=True, sampler=sampler, pruner=pruner,
                                direction="maximize" if cfg.maximize else "minimize")
    # A trial still "running" in the file was cut off with the sweep: it failed; a new one takes its place.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        log(f"[sweep] trial {t.number} was cut off by an earlier stop: marked failed")
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)))
    left = max(0, total - done)
    log(f"[sweep] {cfg.method} search over {', '.join(cfg.params)}: {done} trial(s) done, {left} to run, "
        f"objective {cfg.objective} ({'max' if cfg.maximize else 'min'}imize), study {root / 'study.db'}")

    def objective(trial) -> float:
        values = {k: _suggest(trial, k, kind, v) for k, (kind, v) in cfg.params.items()}
        run_dir = root / f"trial-{trial.number:03d}"
        return _run_trial(trial, recipe_path, overrides, values, run_dir, cfg, log)

    if left:
        study.optimize(objective, n_trials=left, n_jobs=cfg.parallel, catch=(TrialFailed,))
    return summarize(study, root, recipe_path, overrides, cfg, log)


def _run_trial(trial, recipe_path, overrides, values, run_dir: Path, cfg: SweepConfig, log) -> float:
    import optuna

    cmd = [sys.executable, "-m", "dist_ft"]
    trial_overrides = [*overrides, *(_override(k, v) for k, v in values.items()),
                       f"output_dir={run_dir}", "overwrite_output_dir=true"]
    if cfg.nproc_per_node > 1:
        cmd += ["launch", recipe_path, *trial_overrides, "--nproc-per-node", str(cfg.nproc_per_node)]
    else:
        cmd += ["train", recipe_path, *trial_overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"[sweep] trial {trial.number}: " + ", ".join(f"{k}={_short(v)}" for k, v in values.items()))
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seen = 0
        while proc.poll() is None:
            time.sleep(0.5)
            evals = [e for e in _evals(run_dir) if e["step"] > 0]
            for e in evals[seen:]:
                if cfg.objective in e:
                    trial.report(e[cfg.objective], e["step"])
            seen = len(evals)
            if cfg.pruning and seen and trial.should_prune():
                os.killpg(proc.pid, signal.SIGTERM)  # the ranks checkpoint and stop (signals.py)
                proc.wait()
                log(f"[sweep] trial {trial.number}: pruned at step {evals[-1]['step']} "
                    f"({cfg.objective} {evals[-1].get(cfg.objective, float('nan')):.4f})")
                raise optuna.TrialPruned()
    evals = _evals(run_dir)
    if proc.returncode != 0 or not evals or cfg.objective not in evals[-1]:
        log(f"[sweep] trial {trial.number}: failed (exit {proc.returncode}); see {run_dir.parent}/{run_dir.name}.log")
        raise TrialFailed(f"trial {trial.number} exited {proc.returncode}")
    value = float(evals[-1][cfg.objective])
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
    log(f"[sweep] trial {trial.number}: {cfg.objective} {value:.4f} ({time.perf_counter() - t0:.0f} s)")
    return value


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summarize(study, root: Path, recipe_path: str, overrides: list[str], cfg: SweepConfig, log=print) -> dict:
    """The table of trials, the plots, and best.yaml; what was written."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    keys = list(cfg.params)
    rows = [{"trial": t.number, "state": t.state.name.lower(), **{k: t.params.get(k) for k in keys},
             cfg.objective: t.value, "seconds": t.user_attrs.get("seconds")} for t in trials]
    (root / "trials.json").write_text(json.dumps(rows, indent=1))
    header = ["trial", "state", *keys, cfg.objective, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[h] is None else _short(r[h]) for h in header) + " |")
    table = "\n".join(lines)
    (root / "trials.md").write_text(table + "\n")
    log(table)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    result = {"table": root / "trials.md", "trials": len(trials), "complete": len(complete)}
    if not complete:
        log("[sweep] no trial completed: nothing to recommend")
        return result
    best = study.best_trial
    best_overrides = [*overrides, *(_override(k, v) for k, v in best.params.items()),
                      f"output_dir={root / 'best-run'}", "overwrite_output_dir=false"]
    (root / "best.yaml").write_text(f"# dist-ft sweep: trial {best.number}, {cfg.objective} {best.value:.6g}\n"
                                    + dump_recipe(load_recipe(recipe_path, best_overrides)))
    result.update(best=best.number, value=best.value, params=best.params, recipe=root / "best.yaml")
    log(f"[sweep] best: trial {best.number}, {cfg.objective} {best.value:.4f} with "
        + ", ".join(f"{k}={_short(v)}" for k, v in best.params.items()) + f"; recipe {root / 'best.yaml'}")
    result.update(_plots(study, complete, root, cfg, log))
    return result


def _plots(study, complete, root: Path, cfg: SweepConfig, log) -> dict:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[sweep] matplotlib is not installed: no plots (pip install 'dist-ft[plots]')")
        return {}
    out = {}
    xs = [t.number for t in complete]
    ys = [t.value for t in complete]
    running = [max(ys[:i + 1]) if cfg.maximize else min(ys[:i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, ys, "o", label="trial")
    ax.step(xs, running, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(cfg.objective)
    ax.set_title(f"{cfg.method} sweep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "objective.png", dpi=110)
    plt.close(fig)
    out["objective_plot"] = root / "objective.png"
    if len(complete) >= 3 and len(cfg.params) >= 1:
        import optuna
        try:  # PED-ANOVA needs no scikit-learn (fANOVA would)
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError) as exc:
            log(f"[sweep] no parameter importances: {exc}")
            return out
        (root / "importances.json").write_text(json.dumps(imp, indent=1))
        fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(imp)))
        ax.barh(list(imp)[::-1], list(imp.values())[::-1])
        ax.set_xlabel("importance (PED-ANOVA)")
        fig.tight_layout()
        fig.savefig(root / "importances.png", dpi=110)
        plt.close(fig)
        out["importances_plot"] = root / "importances.png"
        log("[sweep] importances: " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    return out
