"""Sweep files written for other tools, translated into dist-ft's own shape (sweep.py) before it is checked.

Weights & Biases' sweep configuration (https://docs.wandb.ai/guides/sweeps/sweep-config-keys):

    method: bayes                          # -> method: bayesian (grid and random keep their names)
    metric: {name: eval_loss, goal: minimize}   # -> objective: eval_loss, direction: minimize
    run_cap: 12                            # -> trials: 12
    parameters:
      training.learning_rate: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-3}
      method.lora.r: {values: [4, 8, 16]}
      training: {parameters: {warmup_steps: {min: 0, max: 20}}}   # nested: training.warmup_steps

Parameters: `values` -> choice; `value` -> a choice of one; `uniform`, `int_uniform` (and min/max without a
distribution: int_uniform when both are integers, as W&B infers), `log_uniform_values` -> log_uniform;
`log_uniform`, whose min and max are natural-log exponents, -> log_uniform [e^min, e^max] (the same
distribution, said in the log); `q_uniform` -> a choice of the multiples of q in [min, max]; on a grid,
int_uniform -> a choice of every integer. Everything else (normal, beta, quantised log distributions,
probabilities, early_terminate, program, command, project, entity, metric.target) is refused, naming the field
and what to write instead.

Also `objective: {metric: NAME, direction: maximize}` -> objective: NAME, direction: maximize.
"""

from __future__ import annotations

import math

import yaml

WANDB_METHODS = {"bayes": "bayesian", "grid": "grid", "random": "random"}
WANDB_ONLY = ("metric", "parameters", "run_cap", "name", "description", "early_terminate", "program", "command",
              "project", "entity")
_REFUSED = {
    "early_terminate": "dist-ft prunes trials by the median rule, not hyperband; remove it, or write pruning: true",
    "program": "each trial is `dist-ft train RECIPE` with the trial's values as overrides; remove it",
    "command": "each trial is `dist-ft train RECIPE` with the trial's values as overrides; remove it",
    "project": "trials log where the recipe's logging.wandb says; set logging.wandb.project there and remove it here",
    "entity": "trials log where the recipe's logging.wandb says; set logging.wandb.entity there and remove it here",
}
_PARAM_KEYS = ("distribution", "min", "max", "q", "values", "value", "probabilities", "mu", "sigma", "a", "b")
_SUPPORTED = "values, value, or distribution uniform | int_uniform | log_uniform_values | log_uniform | q_uniform"
MAX_LISTED = 256  # values a q_uniform range or a grid's int_uniform may expand to


def is_wandb(data: dict) -> bool:
    return any(k in data for k in ("metric", "parameters", "run_cap")) or data.get("method") == "bayes"


def translate(data: dict, problems: list[str], notes: list[str]) -> dict:
    """dist-ft's sweep shape from `data` (returned unchanged when it is already that); problems and notes appended."""
    data = dict(data)
    objective = data.get("objective")
    if isinstance(objective, dict):
        data.update(_objective(data, objective, problems))
    elif objective is not None and not isinstance(objective, str):
        problems.append(f"objective: {objective!r}; give a metric name (objective: eval_loss) or "
                        "{metric: eval_loss, direction: minimize}")
        data.pop("objective")
    if not is_wandb(data):
        return data
    out = {k: v for k, v in data.items() if k not in WANDB_ONLY}
    if data.get("method") in WANDB_METHODS:
        out["method"] = WANDB_METHODS[data["method"]]
    for key, fix in _REFUSED.items():
        if key in data:
            problems.append(f"{key}: {fix}")
    for key in ("name", "description"):
        if key in data:
            notes.append(f"{key}: not used (the sweep's directory is its output_dir)")
    if "run_cap" in data:
        if "trials" in data:
            problems.append("run_cap: the file also sets trials; keep one of them")
        out["trials"] = data["run_cap"]
    if "metric" in data:
        if "objective" in data or "direction" in data:
            problems.append("metric: the file also sets objective/direction; keep one of them")
        out.update(_metric(data["metric"], problems))
    if "parameters" in data:
        if "params" in data:
            problems.append("parameters: the file also has params (dist-ft's shape); keep one of them")
        params: dict = {}
        if isinstance(data["parameters"], dict):
            _parameters(data["parameters"], "", out.get("method"), params, problems, notes)
        else:
            problems.append(f"parameters: give a mapping of recipe keys to {_SUPPORTED}")
        out["params"] = params
        if out.get("method") == "grid" and "trials" not in out and params \
                and all(next(iter(s)) == "choice" for s in params.values()):
            out["trials"] = math.prod(len(s["choice"]) for s in params.values())  # W&B runs the whole grid
    notes.append("a Weights & Biases sweep file, read as: " + yaml.safe_dump(
        out, default_flow_style=True, sort_keys=False, width=1 << 20).strip())
    return out


def _objective(data: dict, obj: dict, problems: list[str]) -> dict:
    out: dict = {}
    for key in obj:
        if key not in ("metric", "direction"):
            problems.append(f"objective.{key}: unknown key; write objective: {{metric: NAME, direction: "
                            "maximize | minimize}")
    if not isinstance(obj.get("metric"), str) or not obj.get("metric"):
        problems.append("objective.metric: give the metric's name, e.g. objective: {metric: eval_loss}")
        out["objective"] = "eval_loss"  # a placeholder so that the rest can still be checked
    else:
        out["objective"] = obj["metric"]
    if "direction" in obj:
        if "direction" in data:
            problems.append("objective.direction: direction is also set at the top level; keep one of them")
        out["direction"] = obj["direction"]
    return out


def _metric(metric, problems: list[str]) -> dict:
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        problems.append("metric: give {name: METRIC, goal: minimize | maximize}")
        return {}
    out = {"objective": metric["name"]}
    for key, value in metric.items():
        if key == "goal":
            if value not in ("minimize", "maximize"):
                problems.append(f"metric.goal: {value!r} is not minimize | maximize")
            else:
                out["direction"] = value
        elif key == "target":
            problems.append("metric.target: a sweep runs its trials to the end; remove target (trials, or --trials, "
                            "sets how many)")
        elif key != "name":
            problems.append(f"metric.{key}: unknown key; metric takes name and goal")
    return out


def _parameters(params: dict, prefix: str, method, out: dict, problems: list[str], notes: list[str]) -> None:
    for key, spec in params.items():
        name = f"{prefix}{key}"
        where = f"parameters.{name}"
        if not isinstance(spec, dict):
            problems.append(f"{where}: {spec!r}; give a mapping: {_SUPPORTED} (a constant: {{value: {spec!r}}})")
            continue
        if "parameters" in spec:  # W&B's nested parameters: the keys of a recipe section
            if len(spec) > 1 or not isinstance(spec["parameters"], dict):
                problems.append(f"{where}: nested parameters hold only a `parameters` mapping")
                continue
            _parameters(spec["parameters"], name + ".", method, out, problems, notes)
            continue
        translated = _parameter(spec, where, method, problems, notes)
        if translated is not None:
            out[name] = translated


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parameter(spec: dict, where: str, method, problems: list[str], notes: list[str]) -> dict | None:
    bad = [k for k in spec if k not in _PARAM_KEYS]
    if bad:
        problems.append(f"{where}.{bad[0]}: unknown key; a W&B parameter takes {_SUPPORTED}")
        return None
    dist = spec.get("distribution")
    if "probabilities" in spec:
        problems.append(f"{where}.probabilities: listed values are drawn with equal chance here; remove "
                        "probabilities")
        return None
    if "value" in spec:
        if dist not in (None, "constant") or len(spec) > 1 + ("distribution" in spec):
            problems.append(f"{where}: a constant takes only value (and distribution: constant)")
            return None
        return {"choice": [spec["value"]]}
    if "values" in spec:
        if dist not in (None, "categorical") or len(spec) > 1 + ("distribution" in spec):
            problems.append(f"{where}: listed values take only values (and distribution: categorical)")
            return None
        if not isinstance(spec["values"], list) or not spec["values"]:
            problems.append(f"{where}.values: give a non-empty list")
            return None
        return {"choice": spec["values"]}
    low, high = spec.get("min"), spec.get("max")
    if dist is None:
        if low is None and high is None:
            problems.append(f"{where}: give {_SUPPORTED}")
            return None
        dist = "int_uniform" if isinstance(low, int) and isinstance(high, int) and _number(low) and _number(high) \
            else "uniform"  # as W&B infers it
    if dist in ("categorical", "constant"):
        problems.append(f"{where}: distribution {dist} needs {'values' if dist == 'categorical' else 'value'}")
        return None
    if dist not in ("uniform", "int_uniform", "log_uniform_values", "log_uniform", "q_uniform"):
        problems.append(f"{where}.distribution: {dist} is not available; write {_SUPPORTED} (e.g. distribution: "
                        "log_uniform_values with min and max, or values: [...])")
        return None
    if not (_number(low) and _number(high)):
        problems.append(f"{where}: distribution {dist} needs numbers min and max")
        return None
    extra = [k for k in spec if k not in ("distribution", "min", "max") + (("q",) if dist == "q_uniform" else ())]
    if extra:
        problems.append(f"{where}.{extra[0]}: not used by distribution {dist}; remove it")
        return None
    if dist == "uniform":
        return {"uniform": [low, high]}
    if dist == "log_uniform_values":
        return {"log_uniform": [low, high]}
    if dist == "log_uniform":
        values = [math.exp(low), math.exp(high)]
        notes.append(f"{where}: W&B's log_uniform takes natural-log exponents: read as log_uniform "
                     f"[e^{low}, e^{high}] = [{values[0]:.6g}, {values[1]:.6g}] (log_uniform_values says it directly)")
        return {"log_uniform": values}
    if dist == "int_uniform":
        if not (isinstance(low, int) and isinstance(high, int)):
            problems.append(f"{where}: int_uniform needs integer min and max")
            return None
        if method == "grid":
            return _listed(list(range(low, high + 1)), where, problems)
        return {"int": [low, high]}
    q = spec.get("q", 1)
    if not _number(q) or q <= 0:
        problems.append(f"{where}.q: give a number > 0")
        return None
    # W&B rounds a uniform draw to the nearest multiple of q: the multiples of q within [min, max].
    ks = range(math.ceil(low / q - 1e-9), math.floor(high / q + 1e-9) + 1)
    whole = all(isinstance(v, int) for v in (low, high, q))
    values = [k * q if whole else round(k * q, 12) for k in ks]
    listed = _listed(values, where, problems)
    if listed is not None:
        notes.append(f"{where}: q_uniform read as a choice of its {len(values)} values")
    return listed


def _listed(values: list, where: str, problems: list[str]) -> dict | None:
    if not values or len(values) > MAX_LISTED:
        problems.append(f"{where}: expands to {len(values)} values; give min, max (and q) that hold 1 to "
                        f"{MAX_LISTED}, or list them in values")
        return None
    return {"choice": values}
