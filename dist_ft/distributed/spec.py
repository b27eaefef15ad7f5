"""What a sharding backend is and what it accepts: one `BackendSpec` per value of `distributed.strategy`.

Each backend package (ddp/, fsdp/, deepspeed/) declares its specs in its `__init__.py`, next to its Strategy
(`strategy.py`), and imports nothing heavy there, so reading a spec costs no torch or DeepSpeed import. The recipe
check (config.py), preflight, the launcher check (launchers.py, accelerate_config.py) and `dist-ft plan` read
these; none of them compares strategy names. Adding a backend means one new package with its `SPECS` and its
Strategy, listed in `BACKEND_PACKAGES`.

Refusals are keyed by what the recipe asks for (see `requested`): `method:<kind>`, `optimizer:<name>`,
`offload:<value>`, `dora`, `gradual_unfreeze`, `engine_config`, `shard_group`. The value is the reason and the fix,
written to follow the recipe field that asked, e.g. "method.kind: qlora keeps the base ...".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

# The backend packages, in the order `dist-ft schema` and `plan --all-strategies` list them.
BACKEND_PACKAGES = ("ddp", "fsdp", "deepspeed")

SHARDABLE = ("params", "grads", "optimizer")


@dataclass(frozen=True)
class MemoryRules:
    """How `dist-ft plan` counts this backend's memory (see plan/memory.py for the formulas)."""
    # bf16-mixed / fp16-mixed: the module itself is cast to the compute dtype and an fp32 master copy is kept
    # (DeepSpeed); otherwise fp32 parameters are the master copy and autocast computes in 16 bits.
    casts_module_to_compute_dtype: bool = False
    # fp32 and bf16-true keep a separate master partition (a clone) beside the parameters (ZeRO-1/2).
    separate_master: bool = False
    # Which transient buffers the backend allocates during a step: "ddp_buckets" | "fsdp_units" |
    # "zero_buckets" | "zero3_live".
    buffers: str = "ddp_buckets"
    # The whole model is built on the host before it is moved/sharded (ddp, zero1/2 call ModelBuilder.build()).
    builds_whole_model_on_host: bool = False
    # distributed.offload values and what each moves to the host: subset of {"params", "grads", "optimizer"}.
    # Moving "optimizer" without "grads" is ZeRO-Offload: the gradients are reduced into an fp32 partition on the
    # host and the updated weights come back; moving "grads" too means the whole step runs on the host (FSDP2).
    offload_moves: Mapping[str, frozenset] = field(default_factory=dict)
    # bf16-mixed / fp16-mixed by autocast over the stored fp32 parameters (DDP): the embedding output, and so the
    # residual stream between blocks, stays in the parameters' dtype (else it is in the compute dtype).
    residual_in_param_dtype: bool = False
    # Under autocast, an adapter method's frozen Linear weights are stored in the compute dtype, the copy autocast
    # would make of them every step made once (precision.frozen_linears_in_compute_dtype; DDP).
    frozen_linears_in_compute_dtype: bool = False
    # Under autocast, a Llama-like block's norms hand their projections one 16-bit copy of their output instead of
    # autocast's copy per matmul (precision.autocast_inputs_cast_once; DDP): the projections' saved inputs are in
    # the compute dtype, not the residual stream's.
    projection_inputs_cast_once: bool = False
    # When the gradients are counted with the optimizer step rather than on top of the activations, because they
    # exist only from the backward to the step and grow as the backward frees activations: "always" (DDP and
    # FSDP2 set them to None after each step), "cpu" (on CPU only: ZeRO-3's released partitions count once
    # written; on GPUs its buffer is allocated whole at the start of the backward), "never".
    grads_with_step: str = "never"
    # Gradients are reduced after every micro-step (ZeRO-2/3 partition them as they arrive), not once per
    # optimizer step; a backend that shards gradients yet reduces once keeps them unsharded between micro-steps.
    reduce_every_microstep: bool = False
    # The optimizer step on the device: "per_tensor" (torch's fused AdamW on each parameter, in place; adamw_8bit
    # keeps 32-bit states for tensors too small to quantise), "flat_copy" (ZeRO-1/2 flatten the gradient
    # partition into a new fp32 tensor for the step), "flat_in_place" (ZeRO-3 steps on its gradient partitions).
    optimizer_step: str = "per_tensor"
    # The optimizer that steps offloaded state on the host: "torch" or "deepspeed" (DeepSpeedCPUAdam).
    cpu_optimizer: str = "torch"
    # How a sharded tensor is divided over N ranks: "flat" (numel / N of a flattened partition: DeepSpeed) or
    # "rows" (each parameter's dim 0 split like torch.chunk, so rank 0 holds ceil(rows / N) rows of every one:
    # FSDP2; a LoRA A of r < N rows then sits whole on r ranks, not 1/N of it on each).
    split: str = "flat"
    # What `distributed.shard_group_size` does to memory: "mesh" (everything sharded over the group instead of the
    # world: FSDP2's HSDP), "secondary_weights" (a second copy of the weights in the compute dtype partitioned over
    # the group, beside the world-wide partitions: ZeRO++ hpZ), "" (refused).
    hybrid: str = ""


@dataclass(frozen=True)
class BackendSpec:
    name: str                    # the value of distributed.strategy
    summary: str                 # one line, for `dist-ft schema` and the docs
    strategy: str                # "module:Class" of its Strategy; imported only when this backend is chosen
    shards: frozenset            # what is split over ranks: a subset of SHARDABLE
    refuses: Mapping[str, str] = field(default_factory=dict)  # requested key -> reason and fix (see module doc)
    offloads: tuple = ("none",)  # the distinct distributed.offload choices `plan --all-strategies` compares
    state_format: str = "dcp"    # what save_state writes; a checkpoint resumes under any backend that reads it
    requires: tuple | None = None  # (python package, pip extra) it needs installed
    engine_config: bool = False  # reads distributed.deepspeed_config (its engine's own JSON)
    zero_stage: int | None = None
    own_loss_scaler: bool = False  # fp16 is scaled by the engine's scaler, not torch's GradScaler
    accelerate_type: str = "MULTI_GPU"  # accelerate's distributed_type that starts it
    launch_config: str = ""      # its accelerate config under launch/accelerate/
    memory: MemoryRules = field(default_factory=MemoryRules)
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to the Strategy class
    # "module:function" that shards a meta-device model exactly as setup does, called as f(model, precision=,
    # offload=, pin_memory=) under any process group (a fake one for `dist-ft plan --simulate`); "" when sharding
    # needs a real group (DeepSpeed) or there is nothing to shard (DDP).
    meta_shard: str = ""

    def refusal(self, key: str) -> str | None:
        return self.refuses.get(key)


def whole_tensor_refusals(name: str) -> dict[str, str]:
    """What a backend that shards parameters (no rank ever holds a whole weight) cannot run. It shards QLoRA's
    packed 4-bit base (quantized.py), but not an 8-bit one, nor an offloaded one."""
    virtual = ("is not supported with {n} (peft reads the virtual-token embeddings as whole tensors when it saves "
               "them, which sharding prevents); use ddp, zero1 or zero2: the adapter is tiny and the base is frozen")
    return {
        "method:prompt_tuning": "prompt_tuning " + virtual.format(n=name),
        "method:prefix_tuning": "prefix_tuning " + virtual.format(n=name),
        "dora": f"DoRA magnitudes need the whole weight, which {name} never gathers at start; use ddp, zero1 or "
                "zero2 for DoRA",
        "optimizer:adamw_8bit": f"adamw_8bit quantises whole parameter tensors, which {name} shards; use adamw, or "
                                "ddp/zero1/zero2",
        "qlora:8bit": f"8-bit qlora (LLM.int8) keeps a per-row scale beside int8 weights that {name} cannot shard "
                      "here; use bits: 4, or ddp/zero1/zero2 for 8 bits",
        "qlora:offload": f"qlora with offload is not supported by {name} (the 4-bit constants stay whole on the "
                         "compute device beside the packed weights; offloading them is untested); use offload: none "
                         "(the 4-bit base is a quarter of the 16-bit one), or lora with offload",
    }


NOT_AN_ENGINE = {"engine_config": "only used with zero1/zero2/zero3; remove it or change the strategy"}


def _load() -> dict[str, BackendSpec]:
    specs: dict[str, BackendSpec] = {}
    for pkg in BACKEND_PACKAGES:
        module = importlib.import_module(f"{__package__}.{pkg}")
        for spec in module.SPECS:
            specs[spec.name] = spec
    return specs


_SPECS: dict[str, BackendSpec] | None = None


def all_specs() -> dict[str, BackendSpec]:
    global _SPECS
    if _SPECS is None:
        _SPECS = _load()
    return _SPECS


def names() -> tuple[str, ...]:
    return tuple(all_specs())


def spec_for(name: str) -> BackendSpec:
    try:
        return all_specs()[name]
    except KeyError:
        raise ValueError(f"distributed.strategy: unknown strategy {name!r}; one of {', '.join(names())}") from None


def names_with(predicate) -> list[str]:
    """The backends for which `predicate(spec)` holds: for the "use X or Y" part of a message."""
    return [s.name for s in all_specs().values() if predicate(s)]


def requested(recipe) -> list[tuple[str, str]]:
    """What the recipe asks of its backend, as (refusal key, the recipe field that asks)."""
    m, d, t = recipe.method, recipe.distributed, recipe.training
    keys = [(f"method:{m.kind}", "method.kind"), (f"optimizer:{t.optimizer}", "training.optimizer"),
            (f"offload:{d.offload}", "distributed.offload")]
    if m.kind == "qlora" and m.quant.bits == 8:
        keys.append(("qlora:8bit", "method.quant.bits"))
    if m.kind == "qlora" and d.offload != "none":
        keys.append(("qlora:offload", "distributed.offload"))
    if m.kind == "lora" and m.lora.use_dora:
        keys.append(("dora", "method.lora.use_dora"))
    if m.kind == "partial" and (m.partial.unfreeze_every_steps or m.partial.unfreeze_every_epochs):
        keys.append(("gradual_unfreeze", "method.partial.unfreeze_every_*"))
    if d.deepspeed_config is not None:
        keys.append(("engine_config", "distributed.deepspeed_config"))
    if d.shard_group_size is not None:
        keys.append(("shard_group", "distributed.shard_group_size"))
    if t.compile:
        keys.append(("compile", "training.compile"))
    return keys


def spec_problems(recipe, spec: BackendSpec | None = None) -> list[str]:
    """Everything in `recipe` that its backend (or `spec`) refuses, each naming the field and the fix."""
    spec = spec or spec_for(recipe.distributed.strategy)
    return [f"{where}: {spec.refuses[key]}" for key, where in requested(recipe) if key in spec.refuses]


def make_strategy(name: str, **kwargs):
    """The Strategy of backend `name`, its module imported now (a DDP user needs no DeepSpeed)."""
    spec = spec_for(name)
    module, cls = spec.strategy.split(":")
    return getattr(importlib.import_module(module), cls)(**{**spec.kwargs, **kwargs})
