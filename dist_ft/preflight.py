"""Checks that look outside the recipe (files, installed packages, the hardware), all reported at once and all
done before any process group starts or any model loads. `dist-ft check` runs exactly these."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .assets import alias_available, is_alias
from .config import Recipe, RecipeError, data_sources, eval_sources, source_format
from .data.sources import FILE_SUFFIXES, check_spec
from .data.streaming import stream_problem
from .distributed.precision import hardware_problem
from .distributed.spec import spec_for
from .model import flash_attention_problem
from .model_folder import model_folder_problems

_NEEDED_COLUMNS = {"text": ("text",), "instruction": ("prompt", "response"), "chat": ("messages",),
                   "alpaca": ("instruction", "output"), "sharegpt": ("conversations",),  # alpaca's input is optional
                   "classification": ("text", "label"), "preference": ("prompt", "chosen", "rejected"),
                   "unpaired_preference": ("prompt", "completion", "label")}


def _peek_records(path: Path, n: int = 5) -> list[dict]:
    """The first few records of a local file, for a cheap column check (full reading reports the rest)."""
    if path.suffix == ".jsonl":
        out = []
        with path.open("rb") as fh:
            for raw in fh:
                if raw.strip():
                    try:
                        obj = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        return out  # reported with its line number when the data is read
                    if isinstance(obj, dict):
                        out.append(obj)
                if len(out) >= n:
                    break
        return out
    if path.suffix in (".csv", ".tsv"):
        import csv
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:  # Excel's byte-order mark
            return [row for _, row in zip(range(n), csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv"
                                                                   else ","))]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            names = pq.read_schema(path).names
        except Exception:
            return []
        return [{name: None for name in names}]
    if path.suffix == ".txt":
        return [{"text": ""}]
    if path.suffix == ".json" and path.stat().st_size < 50_000_000:
        try:
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return []
        obj = obj.get("data", obj) if isinstance(obj, dict) else obj
        return [o for o in obj[:n] if isinstance(o, dict)] if isinstance(obj, list) else []
    return []


def data_problems(recipe: Recipe) -> list[str]:
    problems = []
    d = recipe.data
    entries = [(f"data.train[{i}]" if isinstance(d.train, list) else "data.train", s.path, source_format(d, s),
                s.columns or d.columns) for i, s in enumerate(data_sources(d))]
    entries += [(f"data.eval[{i}]" if isinstance(d.eval, list) else "data.eval", s.path, source_format(d, s),
                 s.columns or d.columns) for i, s in enumerate(eval_sources(d))]
    if recipe.model.task == "image_classification":  # a folder of class folders, or a file of images and labels
        from .data.images import source_problem
        return [f"{field}: {problem}" for field, spec, _, _ in entries for problem in [source_problem(spec)]
                if problem]
    for field, spec, fmt, cols in entries:
        columns = dataclasses.asdict(cols)
        if d.streaming and field == "data.train":
            problem = stream_problem(spec)
            if problem:
                problems.append(f"{field}: {problem}")
            continue
        problem = check_spec(spec)
        if problem:
            problems.append(f"{field}: {problem}")
            continue
        path = Path(spec)
        if spec.startswith("builtin:") or path.suffix not in FILE_SUFFIXES:
            continue
        for rec in _peek_records(path)[:1]:
            for role in _NEEDED_COLUMNS[fmt]:
                if columns[role] not in rec:
                    have = ", ".join(map(str, rec)) or "none"
                    problems.append(f"{field}: {spec} has no column {columns[role]!r} that format "
                                    f"{fmt!r} needs (columns: {have}); rename it in the file or set "
                                    f"data.columns.{role}")
    if recipe.eval.forgetting is not None:
        problem = check_spec(recipe.eval.forgetting)
        if problem:
            problems.append(f"eval.forgetting: {problem}")
    return problems


def model_problems(recipe: Recipe) -> list[str]:
    path = recipe.model.path
    if is_alias(path):
        problem = alias_available(path)
        return [f"model.path: {problem}"] if problem else model_folder_problems(recipe)
    p = Path(path)
    if not p.is_dir():
        from .assets import ALIASES
        return [f"model.path: {path} is not a local folder or a built-in alias ({', '.join(ALIASES)}); models are "
                "never downloaded at run time"]
    if not (p / "config.json").is_file():
        return [f"model.path: {path} has no config.json; point it at a Hugging Face model folder"]
    return model_folder_problems(recipe)  # tokenizer ids within the embedding, special tokens, positions


def _model_type(recipe: Recipe) -> str | None:
    try:
        from .assets import resolve_model_path
        return json.loads((resolve_model_path(recipe.model.path) / "config.json").read_text()).get("model_type")
    except Exception:  # noqa: BLE001 - model_problems reports an unreadable model folder
        return None


def package_problems(recipe: Recipe) -> list[str]:
    """Optional packages the recipe needs, with the line that installs them (imports stay lazy until then)."""
    import importlib.util
    needs = []
    if recipe.method.kind == "qlora" or recipe.training.optimizer == "adamw_8bit":
        needs.append(("bitsandbytes", "qlora", "method.kind: qlora / training.optimizer: adamw_8bit"))
    if recipe.method.kind != "full" and recipe.method.kind != "partial":
        needs.append(("peft", "", f"method.kind: {recipe.method.kind}"))
    if recipe.logging.wandb.mode != "disabled":
        needs.append(("wandb", "wandb", "logging.wandb.mode"))
    if recipe.logging.tensorboard:
        needs.append(("tensorboard", "tensorboard", "logging.tensorboard"))
    for metric, pkg in (("rouge", "rouge_score"), ("bleu", "sacrebleu")):
        if metric in recipe.eval.metrics:
            needs.append((pkg, "eval", f"eval.metrics: {metric}"))
    return [f"{field}: needs the {pkg} package: pip install 'dist-ft[{extra}]'" if extra else
            f"{field}: needs the {pkg} package: pip install {pkg}"
            for pkg, extra, field in needs if importlib.util.find_spec(pkg) is None]


def hardware_problems(recipe: Recipe) -> list[str]:
    problems = []
    hw = hardware_problem(recipe.distributed.precision, strategy=recipe.distributed.strategy)
    if hw:
        problems.append(hw)
    impl = recipe.model.attn_implementation
    if impl in ("flash_attention_2", "flash_attention_3"):
        fa = flash_attention_problem(impl, precision=recipe.distributed.precision)
        if fa is None:  # the hardware can: can the architecture?
            fa = flash_attention_problem(impl, precision=recipe.distributed.precision, model_type=_model_type(recipe))
        if fa:
            problems.append(fa)
    return problems


def strategy_problems(recipe: Recipe, *, world_size: int | None = None) -> list[str]:
    """What the backend needs outside the recipe: its package installed (`spec.requires`) and, for a backend
    configured by its engine's own JSON (`spec.engine_config`), that JSON readable and agreeing with the recipe."""
    d = recipe.distributed
    spec = spec_for(d.strategy)
    if spec.requires is not None:
        import importlib.util
        package, extra = spec.requires
        if importlib.util.find_spec(package) is None:
            return [f"distributed.strategy: {d.strategy} needs the {package} package: pip install 'dist-ft[{extra}]'"]
    if not spec.engine_config:
        return []
    from .distributed.deepspeed.config import deepspeed_json_problems, load_template
    try:
        template, source = load_template(recipe)
    except FileNotFoundError:
        return [f"distributed.deepspeed_config: {d.deepspeed_config}: no such file"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"distributed.deepspeed_config: {d.deepspeed_config} is not valid JSON ({exc})"]
    if not isinstance(template, dict):
        return [f"distributed.deepspeed_config: {d.deepspeed_config} must hold a JSON object"]
    return [f"distributed.deepspeed_config: {p}"
            for p in deepspeed_json_problems(template, recipe, source=source, world_size=world_size)]


# What tools keep in the run directory before training starts (`dist-ft slurm` writes its batch script and the
# job's log there, `dist-ft data` its report, `dist-ft doctor` its findings): none makes the folder "already used",
# and overwrite_output_dir leaves them alone.
LAUNCHER_FILES = frozenset({"slurm", "data-report", "doctor"})


def output_problems(recipe: Recipe) -> list[str]:
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir: {out} exists and is not a folder; choose another output_dir"]
    resume = recipe.checkpoint.resume
    if resume is not None and recipe.overwrite_output_dir:
        return ["overwrite_output_dir: true would delete the checkpoints checkpoint.resume continues from; set one "
                "of them only"]
    if resume not in (None, "auto") and not Path(resume).is_dir():
        return [f"checkpoint.resume: {resume} does not exist; give a checkpoints/step-N folder, a run directory, "
                "or auto"]
    if out.is_dir() and any(c.name not in LAUNCHER_FILES for c in out.iterdir()) and not recipe.overwrite_output_dir and resume is None:
        return [f"output_dir: {out} already holds files; choose a new output_dir, set checkpoint.resume: auto to "
                "continue the run in it, or set overwrite_output_dir: true to replace them"]
    return []


def preflight(recipe: Recipe, *, source: str = "recipe", check_output: bool = True,
              world_size: int | None = None) -> None:
    """`world_size`: where the launcher knows it (`dist-ft launch`), batch sizes are checked for it exactly."""
    problems = (model_problems(recipe) + data_problems(recipe) + hardware_problems(recipe)
                + strategy_problems(recipe, world_size=world_size) + package_problems(recipe))
    group = recipe.distributed.shard_group_size
    if group is not None and world_size is not None and world_size % group:
        problems.append(f"distributed.shard_group_size: {group} does not divide the world size {world_size}; give "
                        "the ranks per node (or another divisor)")
    if check_output:
        problems += output_problems(recipe)
    if problems:
        raise RecipeError(problems, source)
