"""DeepSpeed ZeRO stages 1-3 (strategy.py), configured by a JSON filled from the recipe (config.py)."""

from ..spec import BackendSpec, MemoryRules, whole_tensor_refusals


def _zero(stage: int, shards: set, summary: str, refuses: dict, offloads: tuple, memory: MemoryRules):
    name = f"zero{stage}"
    unfreeze = (f"DeepSpeed fixes its trainable set when the engine is built, so {name} cannot unfreeze during "
                "training; use ddp or fsdp")
    compile_ = (f"{name} is not supported: DeepSpeed owns its engine's forward (and ZeRO-3 gathers parameters in "
                "module hooks), which per-block compile would have to trace; use ddp or fsdp, or set "
                "training.compile: false")
    return BackendSpec(
        name=name, summary=summary, strategy=f"{__name__}.strategy:DeepSpeedStrategy", shards=frozenset(shards),
        refuses={"gradual_unfreeze": unfreeze, "compile": compile_, **refuses}, offloads=offloads, state_format="deepspeed",
        requires=("deepspeed", "deepspeed"), engine_config=True, zero_stage=stage, own_loss_scaler=True,
        accelerate_type="DEEPSPEED", launch_config=f"{name}.yaml", memory=memory, kwargs={"stage": stage})


def _whole_params(name: str) -> dict:
    reason = (f"{name} does not shard parameters, so it cannot offload them; use offload: optimizer, or strategy: "
              "zero3")
    hybrid = (f"{name} keeps whole parameters on every rank: there are no per-block gathers to keep inside a node; "
              "use fsdp (or zero3) for hybrid sharding, or remove it")
    return {"offload:params": reason, "offload:all": reason, "shard_group": hybrid}


_OPT = frozenset({"optimizer"})
_ZERO12 = dict(casts_module_to_compute_dtype=True, separate_master=True, buffers="zero_buckets",
               builds_whole_model_on_host=True, offload_moves={"optimizer": _OPT}, optimizer_step="flat_copy",
               cpu_optimizer="deepspeed")

SPECS = (
    _zero(1, {"optimizer"}, "ZeRO-1: optimizer state sharded", _whole_params("zero1"), ("none", "optimizer"),
          MemoryRules(**_ZERO12)),
    _zero(2, {"optimizer", "grads"}, "ZeRO-2: optimizer state and gradients sharded", _whole_params("zero2"),
          ("none", "optimizer"), MemoryRules(**_ZERO12, reduce_every_microstep=True)),
    _zero(3, {"optimizer", "grads", "params"}, "ZeRO-3: parameters, gradients and optimizer state sharded",
          whole_tensor_refusals("zero3"), ("none", "optimizer", "params", "all"),
          MemoryRules(casts_module_to_compute_dtype=True, buffers="zero3_live", hybrid="secondary_weights",
                      offload_moves={"optimizer": _OPT, "params": frozenset({"params"}),
                                     "all": frozenset({"params", "optimizer"})},
                      grads_with_step="cpu", reduce_every_microstep=True, optimizer_step="flat_in_place",
                      cpu_optimizer="deepspeed")),
)
