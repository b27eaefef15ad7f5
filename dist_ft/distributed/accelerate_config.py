"""What an `accelerate launch` config asked for, compared with the recipe before any work starts.

accelerate hands its config file to the ranks only as environment variables (ACCELERATE_MIXED_PRECISION,
ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_CONFIG_FILE, ACCELERATE_DEEPSPEED_ZERO_STAGE, FSDP_*, ...), read by
accelerate's own `Accelerator`. dist_ft builds no Accelerator: the recipe alone decides precision, sharding,
offload, the DeepSpeed JSON, the optimizer and the schedule. A setting of the accelerate config that dist_ft would
not carry out, and that disagrees with the recipe, is refused here, every one at once, each naming the recipe key
that does the job instead. Settings that agree with the recipe pass.

What passes without comparison:
- values accelerate writes whatever the config says, so that they ask for nothing: mixed_precision "no", dynamo
  backend "NO", the FSDP booleans at false (offload, activation checkpointing);
- settings about how the ranks start or load, not what is trained: zero3_init_flag, fsdp_cpu_ram_efficient_loading,
  fsdp_sync_module_states, fsdp_use_orig_params and the FSDP1 prefetch knobs, cpu affinity, debug;
- fsdp_transformer_layer_cls_to_wrap: dist_ft wraps the model's own `_no_split_modules` blocks (not checkable
  before the model is known).

`accelerate_launch_env(config_file)` computes the variables accelerate would export for a config file, with
accelerate's own functions; `dist-ft check --accelerate-config FILE` and the tests use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import Recipe
from .deepspeed.config import flatten_keys
from .spec import BackendSpec, all_specs, names, names_with, spec_for

_FULL_SHARD = {"true", "1", "full_shard"}  # reshard_after_forward (FSDP2: a bool; FSDP1: a sharding strategy)
_SCHEDULER_KEYS = {  # DeepSpeed scheduler params -> the recipe keys that do their job
    "warmup_num_steps": "training.warmup_steps", "total_num_steps": "training.max_steps",
    "warmup_max_lr": "training.learning_rate", "cos_min_ratio": "training.min_lr_ratio",
    "warmup_min_ratio": "training.min_lr_ratio"}
_SCHEDULER_KINDS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def _yaml(value) -> str:
    return json.dumps(value) if isinstance(value, (str, bool)) or value is None else str(value)


def _launch_type(env: dict[str, str]) -> str | None:
    """accelerate's distributed_type for the launch that set `env` (None when accelerate did not start it). A
    launch that is neither DeepSpeed, FSDP nor Megatron-LM exports nothing of its own: MULTI_GPU."""
    if not any(k.startswith("ACCELERATE_") for k in env):
        return None
    for kind in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        if _true(env.get(f"ACCELERATE_USE_{kind}")):
            return kind
    return "MULTI_GPU"


def _zero_stage(env: dict[str, str]) -> str:
    """The ZeRO stage a DeepSpeed accelerate config gives: its zero_stage, else its deepspeed_config_file's
    zero_optimization.stage ("" when it gives none)."""
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None:
        return stage.strip()
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    try:
        cfg = json.loads(_shipped_or_local(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return ""  # unreadable: deepspeed_file_problems says so
    zero = cfg.get("zero_optimization") if isinstance(cfg, dict) else None
    return str(zero.get("stage", "")) if isinstance(zero, dict) else ""


def accelerate_backend(recipe: Recipe, env: dict[str, str]) -> BackendSpec | None:
    """The backend the accelerate launch that set `env` asks for: the spec whose `accelerate_type` is the config's
    distributed_type (and, for DEEPSPEED, whose `zero_stage` is the config's ZeRO stage); None when the config
    names none. A MULTI_GPU launch starts the ranks as torchrun does, which every backend accepts, so it names its
    own backend only for a recipe whose backend is started that way."""
    kind = _launch_type(env)
    if kind == "MULTI_GPU" and spec_for(recipe.distributed.strategy).accelerate_type != kind:
        return None
    stage = _zero_stage(env) if kind == "DEEPSPEED" else None
    found = [s for s in all_specs().values()
             if s.accelerate_type == kind and (stage is None or str(s.zero_stage) == stage)]
    return found[0] if len(found) == 1 else None


def _stage_fix(stage) -> str:
    """The distributed.strategy that a ZeRO stage named in an accelerate or DeepSpeed config stands for."""
    found = names_with(lambda s: s.accelerate_type == "DEEPSPEED" and str(s.zero_stage) == str(stage))
    if found:
        return f"distributed.strategy: {found[0]}"
    return f"distributed.strategy: {names_with(lambda s: not s.shards)[0]} (ZeRO stage 0 shards nothing)"


def accelerate_problems(recipe: Recipe, env: dict[str, str]) -> list[str]:
    """Every disagreement between the accelerate launch that set `env` and the recipe (empty when accelerate did
    not start this process)."""
    kind = _launch_type(env)
    if kind is None:
        return []
    problems = (_precision_problems(recipe, env) + _compile_problems(env) + _backend_problems(env)
                + _accumulation_problems(recipe, env))
    if kind == "DEEPSPEED":
        problems += _deepspeed_problems(recipe, env)
    elif kind == "FSDP":
        problems += _fsdp_problems(recipe, env)
    return problems


# ---------------------------------------------------------------------------------------------- every launch

def _precision_problems(recipe: Recipe, env: dict[str, str]) -> list[str]:
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    precision = recipe.distributed.precision
    want = {"bf16": "bf16-mixed", "fp16": "fp16-mixed"}.get(mp)
    if mp in ("no", "") or want == precision:
        return []
    if want is None:
        return [f"accelerate config mixed_precision: {mp} but dist_ft has no {mp} training (distributed.precision "
                f"is {precision}: one of fp32, bf16-mixed, fp16-mixed, bf16-true); set mixed_precision: 'no' (or "
                "remove it) in the accelerate config and choose distributed.precision in the recipe"]
    return [f"accelerate config mixed_precision: {mp} but distributed.precision is {precision}; set "
            f"distributed.precision: {want} in the recipe and mixed_precision: 'no' (or remove it) in the "
            "accelerate config"]


def _compile_problems(env: dict[str, str]) -> list[str]:
    backend = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").strip().upper()
    if backend in ("NO", ""):
        return []
    # accelerate would compile the whole wrapped model; dist_ft compiles per block before wrapping (compile.py)
    return [f"accelerate config dynamo_config.dynamo_backend: {backend.lower()}: dist_ft compiles from the recipe, "
            "not the launcher; set training.compile: true in the recipe and dynamo_backend: 'no' (or remove "
            "dynamo_config) in the accelerate config"]


def _backend_problems(env: dict[str, str]) -> list[str]:
    problems = []
    if _true(env.get("ACCELERATE_USE_MEGATRON_LM")):
        problems.append("accelerate config distributed_type: MEGATRON_LM but dist_ft has no Megatron-LM backend; "
                        f"set distributed.strategy ({' | '.join(names())}) in the recipe and start it "
                        "with launch/accelerate/<strategy>.yaml")
    if _true(env.get("ACCELERATE_USE_PARALLELISM_CONFIG")):
        problems.append("accelerate config parallelism_config (tensor/context/sequence parallel sizes) but dist_ft "
                        "shards by data parallelism only (distributed.strategy); remove parallelism_config from the "
                        "accelerate config")
    if any(_true(env.get(k)) for k in ("ACCELERATE_DOWNCAST_BF16", "XLA_DOWNCAST_BF16", "XLA_USE_BF16")):
        problems.append("accelerate config downcast_bf16 (XLA/TPU) but dist_ft does not run on XLA; for bfloat16 "
                        "weights set distributed.precision: bf16-true in the recipe, and remove downcast_bf16 from "
                        "the accelerate config")
    return problems


def _accumulation_problems(recipe: Recipe, env: dict[str, str]) -> list[str]:
    """Gradient accumulation and clipping: accelerate exports them from its deepspeed_config section (and an
    Accelerator reads ACCELERATE_GRADIENT_ACCUMULATION_STEPS under any launcher)."""
    t, problems = recipe.training, []
    where = "deepspeed_config." if _true(env.get("ACCELERATE_USE_DEEPSPEED")) else ""
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto").strip()
    if gas.lower() != "auto":
        if not gas.isdigit():
            problems.append(f"accelerate config {where}gradient_accumulation_steps: {gas} is not a whole number; "
                            "set training.gradient_accumulation_steps in the recipe and remove it from the "
                            "accelerate config")
        elif int(gas) != t.gradient_accumulation_steps:
            problems.append(f"accelerate config {where}gradient_accumulation_steps: {gas} but "
                            f"training.gradient_accumulation_steps is {t.gradient_accumulation_steps}; set "
                            f"training.gradient_accumulation_steps: {gas} in the recipe and remove "
                            "gradient_accumulation_steps from the accelerate config (or make it agree)")
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING", "auto").strip()
    if clip.lower() not in ("auto", "none"):
        try:
            value = float(clip)
        except ValueError:
            value = None
        have = t.max_grad_norm if t.max_grad_norm is not None else 0.0  # DeepSpeed: 0 means no clipping
        if value is None or value != have:
            want = "null" if value == 0.0 else clip
            problems.append(f"accelerate config {where}gradient_clipping: {clip} but training.max_grad_norm is "
                            f"{_yaml(t.max_grad_norm)}; set training.max_grad_norm: {want} in the recipe and remove "
                            "gradient_clipping from the accelerate config (or make it agree)")
    return problems


# ---------------------------------------------------------------------------------------------- DeepSpeed

def _offload_word(optimizer: bool, params: bool) -> str:
    return {(False, False): "none", (True, False): "optimizer", (False, True): "params", (True, True): "all"}[
        (optimizer, params)]


def _offload_problem(recipe: Recipe, what: str, devices: dict[str, tuple[str, str | None]]) -> list[str]:
    """`devices`: {"optimizer" | "params": (the accelerate field's name, its device or None when not set)}."""
    offload = recipe.distributed.offload
    want = {"optimizer": offload in ("optimizer", "all"), "params": offload in ("params", "all")}
    given = {k: (field, dev) for k, (field, dev) in devices.items() if dev is not None}
    bad = [f"{field}: {dev}" for field, dev in given.values() if dev not in ("none", "cpu")]
    if bad:
        return [f"{what} {', '.join(bad)} but dist_ft offloads to the CPU only (distributed.offload is {offload}); "
                "use device cpu or none there, and distributed.offload in the recipe"]
    if all((dev == "cpu") == want[k] for k, (_, dev) in given.items()):
        return []
    has = {k: (given[k][1] == "cpu") if k in given else want[k] for k in want}
    fields = ", ".join(f"{field}: {dev}" for field, dev in given.values())
    return [f"{what} {fields} but distributed.offload is {offload}; set distributed.offload: "
            f"{_offload_word(has['optimizer'], has['params'])} in the recipe, or make the accelerate config agree"]


def _deepspeed_problems(recipe: Recipe, env: dict[str, str]) -> list[str]:
    strategy = recipe.distributed.strategy
    spec = spec_for(strategy)
    if spec.accelerate_type != "DEEPSPEED":
        return [f"launched with an accelerate DeepSpeed config (distributed_type: DEEPSPEED), but "
                f"distributed.strategy is {strategy}; use launch/accelerate/{spec.launch_config} or set "
                f"distributed.strategy: {' | '.join(names_with(lambda s: s.accelerate_type == 'DEEPSPEED'))} in "
                "the recipe"]
    problems = []
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is not None and stage.strip() != str(spec.zero_stage):
        problems.append(f"accelerate config deepspeed_config.zero_stage: {stage.strip()} but distributed.strategy is "
                        f"{strategy}; set {_stage_fix(stage.strip())} in the recipe, or zero_stage: "
                        f"{spec.zero_stage} in the accelerate config")
    devices = {k: (f"deepspeed_config.offload_{name}_device", env[v].strip().lower() if v in env else None)
               for k, name, v in (("optimizer", "optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                                  ("params", "param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"))}
    problems += _offload_problem(recipe, "accelerate config", devices)
    if _true(env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")) and recipe.distributed.precision != "bf16-true":
        problems.append("accelerate config deepspeed_config.zero3_save_16bit_model: true but dist_ft writes final/ "
                        f"in the dtype it trains in (float32 under distributed.precision: "
                        f"{recipe.distributed.precision}); set distributed.precision: bf16-true in the recipe for "
                        "bfloat16 weights, or convert afterwards with `dist-ft export RUN/final OUT --dtype bf16`, "
                        "and zero3_save_16bit_model: false in the accelerate config")
    if env.get("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"):
        problems.append(f"accelerate config deepspeed_config.deepspeed_moe_layer_cls_names: "
                        f"{env['ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES']} but dist_ft marks no MoE leaf modules "
                        "(no recipe key does); remove it from the accelerate config")
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        world = env.get("WORLD_SIZE", "")
        problems += deepspeed_file_problems(recipe, path, world_size=int(world) if world.isdigit() else None)
    return problems


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _shipped_or_local(path: str):
    """The file at `path`; or, where the relative path of a shipped template (the launch/accelerate configs name
    configs/deepspeed/zeroN.json) does not exist from this working directory, that template as installed."""
    local = Path(path)
    parts = local.parts
    if local.is_file() or local.is_absolute() or parts[:2] != ("configs", "deepspeed") or len(parts) != 3:
        return local
    from importlib import resources
    return resources.files("dist_ft") / "templates" / "deepspeed" / parts[2]


def deepspeed_file_problems(recipe: Recipe, path: str, *, world_size: int | None) -> list[str]:
    """The DeepSpeed JSON an accelerate config names (deepspeed_config_file), against the recipe. dist_ft trains
    with its own JSON (the recipe's distributed.deepspeed_config, else configs/deepspeed/), so every explicit
    value of this file must agree with what that JSON and the recipe make; "auto" always agrees."""
    from .deepspeed.config import load_template

    what = f"accelerate config deepspeed_config.deepspeed_config_file {path}:"
    try:
        cfg = json.loads(_shipped_or_local(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{what} cannot be read ({exc}); fix the path, or set distributed.deepspeed_config in the recipe "
                "and remove deepspeed_config_file from the accelerate config"]
    if not isinstance(cfg, dict):
        return [f"{what} is not a JSON object"]
    d, t = recipe.distributed, recipe.training
    if d.deepspeed_config is not None and _same_file(d.deepspeed_config, path):
        return []  # the recipe's own JSON: resolve_deepspeed_config checks it against the recipe
    flat = flatten_keys(cfg)
    problems, owned = [], set()

    def check(key: str, want, recipe_key: str, fix) -> None:
        owned.add(key)
        if key in flat and flat[key] != "auto" and flat[key] != want:
            problems.append(f"{what} {key} is {_yaml(flat[key])} but {recipe_key} is {_yaml(want)}; set "
                            f"{fix(flat[key])} in the recipe, or write \"auto\" there (the recipe decides)")

    check("train_micro_batch_size_per_gpu", t.micro_batch_size, "training.micro_batch_size",
          lambda v: f"training.micro_batch_size: {v}")
    check("gradient_accumulation_steps", t.gradient_accumulation_steps, "training.gradient_accumulation_steps",
          lambda v: f"training.gradient_accumulation_steps: {v}")
    owned.add("train_batch_size")
    tbs = flat.get("train_batch_size", "auto")
    batch = t.micro_batch_size * t.gradient_accumulation_steps * (world_size or 0)
    if tbs != "auto" and world_size is not None and tbs != batch:
        problems.append(f"{what} train_batch_size is {_yaml(tbs)} but training.micro_batch_size x "
                        f"training.gradient_accumulation_steps x {world_size} rank(s) is {batch}; set those recipe "
                        "keys to match, or write \"auto\" there (the recipe decides)")
    owned.add("gradient_clipping")
    clip = flat.get("gradient_clipping", "auto")
    if clip != "auto" and clip != (t.max_grad_norm if t.max_grad_norm is not None else 0.0):
        problems.append(f"{what} gradient_clipping is {_yaml(clip)} but training.max_grad_norm is "
                        f"{_yaml(t.max_grad_norm)}; set training.max_grad_norm: {'null' if clip == 0 else clip} in "
                        "the recipe, or write \"auto\" there (the recipe decides)")
    for section, mode in (("bf16", "bf16-mixed"), ("bfloat16", "bf16-mixed"), ("fp16", "fp16-mixed")):
        key = f"{section}.enabled"
        owned.add(key)
        value = flat.get(key, "auto")
        if value != "auto" and bool(value) != (d.precision == mode):
            fix = mode if value else "fp32"
            problems.append(f"{what} {key} is {_yaml(value)} but distributed.precision is {d.precision}; set "
                            f"distributed.precision: {fix} in the recipe, or write \"auto\" there (the recipe "
                            "decides)")
    check("zero_optimization.stage", spec_for(d.strategy).zero_stage, "the ZeRO stage of distributed.strategy",
          _stage_fix)
    devices = {}
    for k, key in (("optimizer", "zero_optimization.offload_optimizer.device"),
                   ("params", "zero_optimization.offload_param.device")):
        owned.add(key)
        # "auto" (the shipped offload templates): the recipe's distributed.offload decides.
        devices[k] = (key, str(flat[key]).lower() if flat.get(key, "auto") != "auto" else None)
    problems += _offload_problem(recipe, what, devices)
    owned.add("optimizer.type")
    kind = flat.get("optimizer.type")
    if kind is not None and (str(kind).lower() not in ("adam", "adamw") or t.optimizer != "adamw"):
        problems.append(f"{what} optimizer.type is {_yaml(kind)} but dist_ft trains with training.optimizer: "
                        f"{t.optimizer}; choose training.optimizer (adamw | adamw_8bit) in the recipe and remove "
                        "the optimizer section (or give type AdamW with \"auto\" params)")
    check("optimizer.params.lr", t.learning_rate, "training.learning_rate", lambda v: f"training.learning_rate: {v}")
    check("optimizer.params.betas", [t.adam_beta1, t.adam_beta2], "[training.adam_beta1, training.adam_beta2]",
          lambda v: f"training.adam_beta1/adam_beta2: {v}")
    check("optimizer.params.eps", t.adam_eps, "training.adam_eps", lambda v: f"training.adam_eps: {v}")
    check("optimizer.params.weight_decay", t.weight_decay, "training.weight_decay",
          lambda v: f"training.weight_decay: {v}")
    if "scheduler" in cfg:
        problems.append(_scheduler_problem(what, cfg["scheduler"], recipe))
    problems += _other_keys_problem(what, path, flat, owned, recipe, load_template)
    return problems


def _scheduler_problem(what: str, section, recipe: Recipe) -> str:
    t = recipe.training
    kind = section.get("type") if isinstance(section, dict) else None
    params = section.get("params", {}) if isinstance(section, dict) else {}
    hints = [f"{_SCHEDULER_KEYS[k]} for {k}" for k in (params if isinstance(params, dict) else {})
             if k in _SCHEDULER_KEYS]
    if kind in _SCHEDULER_KINDS:
        hints.insert(0, f"training.lr_scheduler: {_SCHEDULER_KINDS[kind]} for {kind}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return (f"{what} has a scheduler section ({kind or 'no type'}) but dist_ft schedules the learning rate from the "
            f"recipe (training.lr_scheduler: {t.lr_scheduler}, training.warmup_steps: {t.warmup_steps}, "
            f"training.min_lr_ratio: {t.min_lr_ratio}, training.learning_rate: {t.learning_rate}); set those in "
            f"the recipe{hint} and remove the scheduler section")


def _other_keys_problem(what: str, path: str, flat: dict, owned: set, recipe: Recipe, load_template) -> list[str]:
    """Tuning values (buckets, overlap, loss-scale settings, ...) the recipe does not own: dist_ft takes them
    from its own JSON, so this file's must be the same there (or "auto")."""
    try:
        template, source = load_template(recipe)
    except (OSError, ValueError):
        return []  # the recipe's own deepspeed_config is unreadable: preflight says so
    theirs = flatten_keys(template)
    differ = [f"{k}: {_yaml(v)}" for k, v in flat.items()
              if k not in owned and not k.startswith("scheduler.") and v != "auto" and theirs.get(k) != v]
    if not differ:
        return []
    shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
    return [f"{what} sets {shown}, which dist_ft takes from {source} instead; set distributed.deepspeed_config: "
            f"{path} in the recipe to train with this file (\"auto\" values are filled from the recipe)"]


# ---------------------------------------------------------------------------------------------- FSDP

def _fsdp_problems(recipe: Recipe, env: dict[str, str]) -> list[str]:
    d = recipe.distributed
    spec = spec_for(d.strategy)
    if spec.accelerate_type != "FSDP":
        return [f"launched with an accelerate FSDP config (distributed_type: FSDP), but distributed.strategy is "
                f"{d.strategy}; use launch/accelerate/{spec.launch_config} or set distributed.strategy: "
                f"{' | '.join(names_with(lambda s: s.accelerate_type == 'FSDP'))} in the recipe"]
    problems, what = [], "accelerate config fsdp_config."
    version = env.get("FSDP_VERSION", "2").strip()
    if version != "2":
        problems.append(f"{what}fsdp_version: {version} but dist_ft's fsdp strategy is FSDP2 (fully_shard); set "
                        "fsdp_version: 2 in the accelerate config")
    for key, field in (("FSDP_SHARDING_STRATEGY", "fsdp_sharding_strategy"),
                       ("FSDP_RESHARD_AFTER_FORWARD", "fsdp_reshard_after_forward")):
        value = env.get(key)
        if value is None or value.strip().lower() in _FULL_SHARD:
            continue
        low = value.strip().lower()
        fix = {"false": "distributed.strategy: zero2 (sharded gradients and optimizer state, whole parameters)",
               "shard_grad_op": "distributed.strategy: zero2 (sharded gradients and optimizer state, whole "
                                "parameters)",
               "2": "distributed.strategy: zero2", "no_shard": "distributed.strategy: ddp",
               "3": "distributed.strategy: ddp"}.get(low, "distributed.strategy: fsdp with full sharding (dist_ft "
                                                          "has no hybrid sharding)")
        problems.append(f"{what}{field}: {value.strip()} but dist_ft's fsdp strategy shards fully (parameters "
                        f"resharded after forward); set {fix} in the recipe, or {field}: "
                        f"{'true' if 'RESHARD' in key else 'FULL_SHARD'} (or remove it) in the accelerate config")
    if _true(env.get("FSDP_OFFLOAD_PARAMS")) and d.offload == "none":
        problems.append(f"{what}fsdp_offload_params: true but distributed.offload is none; set distributed.offload: "
                        "all in the recipe (FSDP2 offload keeps parameters, gradients and optimizer state on the "
                        "CPU) and fsdp_offload_params: false (or remove it) in the accelerate config")
    if _true(env.get("FSDP_ACTIVATION_CHECKPOINTING")) and not d.activation_checkpointing:
        problems.append(f"{what}fsdp_activation_checkpointing: true but distributed.activation_checkpointing is "
                        "false; set distributed.activation_checkpointing: true in the recipe and "
                        "fsdp_activation_checkpointing: false (or remove it) in the accelerate config")
    if _true(env.get("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD")):
        problems.append(f"{what}fsdp_activation_checkpointing_offload: true but dist_ft keeps checkpointed "
                        "activations in device memory (no recipe key offloads them); use "
                        "distributed.activation_checkpointing: true in the recipe and remove it from the "
                        "accelerate config")
    policy = env.get("FSDP_AUTO_WRAP_POLICY")
    if policy is not None and policy.strip().upper() != "TRANSFORMER_BASED_WRAP":
        problems.append(f"{what}fsdp_auto_wrap_policy: {policy.strip()} but dist_ft shards each transformer block "
                        "(the model's _no_split_modules), then the root; set fsdp_auto_wrap_policy: "
                        "TRANSFORMER_BASED_WRAP (or remove it) in the accelerate config")
    sd = env.get("FSDP_STATE_DICT_TYPE")
    if sd is not None and sd.strip().upper() != "SHARDED_STATE_DICT":
        problems.append(f"{what}fsdp_state_dict_type: {sd.strip()} but dist_ft writes sharded checkpoints "
                        "(checkpoint.every_steps) and a whole model in final/ (`dist-ft export` makes one from any "
                        "checkpoint); set fsdp_state_dict_type: SHARDED_STATE_DICT (or remove it) in the accelerate "
                        "config")
    if env.get("FSDP_IGNORED_MODULES"):
        problems.append(f"{what}fsdp_ignored_modules: {env['FSDP_IGNORED_MODULES']} but dist_ft shards every "
                        "module; use method.kind (lora, partial, ...) in the recipe to leave weights untrained, and "
                        "remove fsdp_ignored_modules from the accelerate config")
    return problems


# ---------------------------------------------------------------------------------------------- a config file

def accelerate_launch_env(config_file: str | Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file FILE` exports to its ranks, computed with accelerate's own
    launch functions (no process is started), plus WORLD_SIZE from num_processes. Raises ValueError when accelerate
    rejects the file."""
    import contextlib
    import io
    import logging

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (prepare_deepspeed_cmd_env, prepare_multi_gpu_env,
                                         prepare_simple_launcher_cmd_env)

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "dist_ft", "train", "-"])
    quiet = logging.getLogger("accelerate")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, defaults, mp_from_config = _validate_launch_command(args)
            if args.use_deepspeed and not args.cpu:  # as accelerate's launch_command decides
                fields = list(defaults.deepspeed_config) if defaults else []
                args.deepspeed_fields_from_accelerate_config = ",".join(
                    fields + (["mixed_precision"] if mp_from_config else []))
                _, env = prepare_deepspeed_cmd_env(args)
            elif (args.use_fsdp or args.use_megatron_lm or args.multi_gpu) and not args.cpu:
                env = prepare_multi_gpu_env(args)
            else:
                _, env = prepare_simple_launcher_cmd_env(args)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ValueError(f"accelerate rejects {config_file}: {exc}") from exc
    finally:
        quiet.level = level
    prefixes = ("ACCELERATE_", "FSDP_", "XLA_", "MEGATRON_LM_", "PARALLELISM_CONFIG_")
    out = {k: v for k, v in env.items() if k.startswith(prefixes)}
    out["WORLD_SIZE"] = str(args.num_processes)
    return out
