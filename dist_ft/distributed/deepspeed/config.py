"""DeepSpeed JSON resolved from the recipe by one pure function.

Every value the recipe owns is written "auto" in the templates (configs/deepspeed/*.json) and filled here. A user's
own JSON may set such a value explicitly; where it disagrees with the recipe, every disagreement is reported at
once, each naming both sides and the fix. The user's file is never edited: the resolved JSON is written into the
run directory.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

from ...config import DistributedConfig, Recipe
from ..spec import BackendSpec, spec_for

AUTO = "auto"


def template_name(strategy: str, offload: str) -> str:
    """The shipped template for a strategy and `distributed.offload`. Offloading the optimizer needs DeepSpeed's own
    (CPU) Adam, so those templates carry an optimizer section; their offload devices are "auto" (the recipe says
    which blocks are on). Parameter offload alone keeps dist_ft's optimizer: the resolver writes its block."""
    stage = spec_for(strategy).zero_stage
    if offload in ("optimizer", "all"):
        return f"zero{stage}_offload.json"
    return f"zero{stage}.json"


def load_template(recipe: Recipe) -> tuple[dict, str]:
    d = recipe.distributed
    if d.deepspeed_config is not None:
        path = Path(d.deepspeed_config)
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    name = template_name(d.strategy, d.offload)
    text = (resources.files("dist_ft") / "templates" / "deepspeed" / name).read_text(encoding="utf-8")
    return json.loads(text), f"configs/deepspeed/{name}"


def _walk_set(cfg: dict, dotted: str, value, source: str, problems: list[str], *, create: bool = False) -> None:
    """Fill cfg[dotted] with value if it is "auto" (or absent and create); report a different explicit value."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        if part not in node:
            if not create:
                return
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            problems.append(f"{source}: {'.'.join(parents)} must be an object")
            return
    if leaf not in node:
        if create:
            node[leaf] = value
        return
    current = node[leaf]
    if current == AUTO:
        node[leaf] = value
    elif current != value and not (isinstance(current, list) and list(value) == current) and not _same_dtype(
            current, value):
        problems.append(f"{source}: {dotted} is {current!r} but the recipe gives {value!r}; write \"auto\" there "
                        "(the recipe decides) or change the recipe to match")


def _same_dtype(a, b) -> bool:
    """DeepSpeed reads "fp32", "float32", "torch.float32" and "float" (any case) as one dtype."""
    fp32 = {"fp32", "float32", "torch.float32", "float"}
    return isinstance(a, str) and isinstance(b, str) and a.lower() in fp32 and b.lower() in fp32


def resolve_deepspeed_config(template: dict, recipe: Recipe, *, world_size: int, hidden_size: int | None = None,
                             source: str = "deepspeed_config") -> tuple[dict, list[str]]:
    """(resolved config, problems). Pure: no files, no processes."""
    cfg = copy.deepcopy(template)
    problems: list[str] = []
    t, d = recipe.training, recipe.distributed
    spec = spec_for(d.strategy)
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        "bf16.enabled": d.precision in ("bf16-mixed", "bf16-true"),
        "fp16.enabled": d.precision == "fp16-mixed",
        "zero_optimization.stage": spec.zero_stage,
        "optimizer.params.lr": t.learning_rate,
        "optimizer.params.betas": [t.adam_beta1, t.adam_beta2],
        "optimizer.params.eps": t.adam_eps,
        "optimizer.params.weight_decay": t.weight_decay,
    }
    # Precision and clipping are written even where the user's JSON leaves them out: DeepSpeed's own defaults
    # (fp32, clipping off) would otherwise replace the recipe's without a word.
    created = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization.stage",
               "gradient_clipping", "bf16.enabled", "fp16.enabled"}
    if d.precision == "bf16-mixed":
        # bf16-mixed keeps fp32 gradients (precision.py), as DDP and FSDP2 (reduce_dtype fp32) do. Left out,
        # DeepSpeed reduces and accumulates them in the model's bf16: 8 bits of mantissa summed over ranks and
        # micro-steps.
        owned |= {"communication_data_type": "fp32", "data_types.grad_accum_dtype": "fp32"}
        created |= {"communication_data_type", "data_types.grad_accum_dtype"}
    if d.precision == "bf16-true":
        # Weights, gradients and optimizer state all in bf16, as under DDP and FSDP2: DeepSpeed keeps no fp32 master
        # copy (bf16_master_weights_and_grads) and no fp32 moments (bf16_optimizer_states).
        owned |= {"bf16.bf16_master_weights_and_grads": True, "bf16.bf16_optimizer_states": True}
        created |= {"bf16.bf16_master_weights_and_grads", "bf16.bf16_optimizer_states"}
    if d.shard_group_size is not None:
        # ZeRO++ hierarchical partitioning (hpZ): a second copy of the weights partitioned within each group of
        # this many ranks, so the all-gathers of forward and backward stay inside a node.
        owned["zero_optimization.zero_hpz_partition_size"] = d.shard_group_size
        created.add("zero_optimization.zero_hpz_partition_size")
    if "optimizer" in cfg:
        problems += _optimizer_problems(cfg["optimizer"], recipe, source)
        created |= {k for k in owned if k.startswith("optimizer.params.")}
    for key, value in owned.items():
        _walk_set(cfg, key, value, source, problems, create=key in created)
    if "scheduler" in cfg:
        kind = cfg["scheduler"].get("type", "?") if isinstance(cfg["scheduler"], dict) else "?"
        # Two schedules on one optimizer fight: DeepSpeed's writes the lr, then dist_ft's scales what it finds.
        problems.append(f"{source}: scheduler ({kind}): dist_ft schedules the learning rate from the recipe; remove "
                        "the scheduler section and set training.learning_rate, training.warmup_steps, "
                        "training.lr_scheduler (cosine | linear | constant) and training.min_lr_ratio instead")
    zero = cfg.setdefault("zero_optimization", {})
    problems += _resolve_offload(zero, d, spec, source)
    # Buckets sized from the model as the DeepSpeed docs advise; overlap and pinning only help on GPUs.
    h = hidden_size or 1024
    fill = {"reduce_bucket_size": h * h, "allgather_bucket_size": int(5e8), "stage3_prefetch_bucket_size":
            int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h,
            # About one transformer block's worth (~12 h^2 parameters) gathered at a time. DeepSpeed's default
            # (1e9) keeps a small model's every parameter gathered between forward and backward.
            "stage3_max_live_parameters": 12 * h * h, "stage3_max_reuse_distance": 12 * h * h}
    for key, value in fill.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    gpu = recipe_uses_gpu()
    if zero.get("overlap_comm") == AUTO:
        zero["overlap_comm"] = gpu
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict) and zero[key].get("pin_memory") == AUTO:
            zero[key]["pin_memory"] = gpu
    leftover = [k for k, v in flatten_keys(cfg).items() if v == AUTO]
    if leftover:
        problems.append(f"{source}: no recipe value fills {', '.join(leftover)}; give them explicit values")
    return cfg, problems


def _resolve_offload(zero: dict, d: DistributedConfig, spec: BackendSpec, source: str) -> list[str]:
    """Fill and check the `zero_optimization` offload blocks: the recipe's `distributed.offload` decides; a
    template's explicit devices must agree with it. Returns the disagreements."""
    problems = []
    want_opt = d.offload in ("optimizer", "all")
    want_param = d.offload in ("params", "all")
    for key, want in (("offload_optimizer", want_opt), ("offload_param", want_param)):
        if isinstance(zero.get(key), dict) and zero[key].get("device") == AUTO:
            if not want:  # the block is not for this recipe's offload
                del zero[key]
                continue
            zero[key]["device"] = "cpu"
        has = isinstance(zero.get(key), dict) and zero[key].get("device", "none") not in ("none", None)
        if has and not want:
            problems.append(f"{source}: zero_optimization.{key} offloads to {zero[key]['device']!r} but "
                            f"distributed.offload is {d.offload!r}; make them agree")
        if want and not has:
            zero[key] = {"device": "cpu", "pin_memory": AUTO}
    if want_param and "params" not in spec.shards:  # a backend offloads only the parameters it shards (ZeRO-3)
        problems.append(f"{source}: parameter offload needs ZeRO stage 3, the strategy is {d.strategy}")
    return problems


def deepspeed_json_problems(template: dict, recipe: Recipe, *, source: str,
                            world_size: int | None = None) -> list[str]:
    """Everything wrong with a DeepSpeed JSON for this recipe: what the recipe owns (resolve_deepspeed_config),
    then DeepSpeed's own validation of the resolved config. Without a world size (`dist-ft check`), an explicit
    `train_batch_size` is only checked for divisibility; `dist-ft launch` and every rank check it exactly."""
    t = recipe.training
    explicit = template.get("train_batch_size")
    problems = []
    if world_size is None:
        per_rank = t.micro_batch_size * t.gradient_accumulation_steps
        if isinstance(explicit, int) and explicit % per_rank:
            problems.append(f"{source}: train_batch_size {explicit} is not a multiple of training.micro_batch_size "
                            f"x training.gradient_accumulation_steps = {per_rank}; write \"auto\" there")
        template = {k: v for k, v in template.items() if k != "train_batch_size"}
    cfg, resolve = resolve_deepspeed_config(template, recipe, world_size=world_size or 1, source=source)
    problems += resolve
    # DeepSpeed's own verdict too, so that every problem shows at once; less what it says of fields still "auto"
    # (already reported above as left unfilled).
    unfilled = {k for k, v in flatten_keys(cfg).items() if v == AUTO}
    problems += [p for p in deepspeed_problems(cfg, source=source)
                 if not any(f"rejects {k}:" in p for k in unfilled)]
    return problems


def _optimizer_problems(section, recipe: Recipe, source: str) -> list[str]:
    """A DeepSpeed `optimizer` section builds the optimizer inside DeepSpeed (its CPU Adam for offload): it must be
    the recipe's optimizer, with the recipe's hyperparameters (filled into `params` by the caller)."""
    if not isinstance(section, dict) or not isinstance(section.get("params", {}), dict):
        return [f"{source}: optimizer must be an object {{\"type\": \"AdamW\", \"params\": {{...}}}}"]
    kind = str(section.get("type", ""))
    if recipe.training.optimizer != "adamw":
        return [f"{source}: optimizer ({kind}) and training.optimizer {recipe.training.optimizer} disagree; remove "
                "the optimizer section (dist_ft builds the recipe's optimizer) or set training.optimizer: adamw"]
    if kind.lower() not in ("adam", "adamw"):
        return [f"{source}: optimizer type {kind!r}: the recipe trains with AdamW (training.optimizer); write "
                "\"type\": \"AdamW\" or remove the optimizer section"]
    section.setdefault("params", {})
    return []


def deepspeed_problems(cfg: dict, *, source: str) -> list[str]:
    """What DeepSpeed's own config model says of a resolved config, as messages naming each field (it would
    otherwise say it as a traceback on every rank at launch). The global `train_batch_size` is left out: DeepSpeed
    would check it against the world size of this process, and resolve_deepspeed_config checks it against the
    launch's."""
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig({k: copy.deepcopy(v) for k, v in cfg.items() if k != "train_batch_size"})
    except ValidationError as exc:
        # DeepSpeed validates section by section: an error's location starts inside the section.
        return [f"{source}: DeepSpeed rejects {_locate(cfg, [str(x) for x in e['loc']])}: {e['msg']}"
                for e in exc.errors()]
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        return [f"{source}: DeepSpeed rejects the config: {exc}"]
    finally:
        ds_logger.setLevel(level)
    return []


def _locate(cfg: dict, loc: list[str]) -> str:
    """The dotted path in `cfg` of a key that DeepSpeed reports relative to one of its sections."""
    tail = ".".join(loc)
    hits = [k for k in flatten_keys(cfg) if k == tail or k.endswith("." + tail)]
    return hits[0] if hits else (tail or "the config")


def recipe_uses_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def flatten_keys(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_keys(v, key + "."))
        else:
            out[key] = v
    return out
