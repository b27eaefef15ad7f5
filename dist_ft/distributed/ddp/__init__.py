"""DDP: every rank holds the whole model and optimizer; gradients are all-reduced (strategy.py)."""

from ..spec import NOT_AN_ENGINE, BackendSpec, MemoryRules

_NO_OFFLOAD = "ddp keeps everything on the device; use fsdp or zero1/zero2/zero3 to offload"

SPECS = (
    BackendSpec(
        name="ddp", summary="DistributedDataParallel: whole model and optimizer on every rank",
        strategy=f"{__name__}.strategy:DDPStrategy", shards=frozenset(),
        refuses={**NOT_AN_ENGINE, **{f"offload:{o}": _NO_OFFLOAD for o in ("optimizer", "params", "all")},
                 "shard_group": "ddp shards nothing (every rank holds the whole model), so there is no shard group; "
                                "use fsdp (or zero3) for hybrid sharding, or remove it"},
        launch_config="ddp.yaml",
        memory=MemoryRules(buffers="ddp_buckets", builds_whole_model_on_host=True, residual_in_param_dtype=True,
                           frozen_linears_in_compute_dtype=True, projection_inputs_cast_once=True,
                           grads_with_step="always")),
)
