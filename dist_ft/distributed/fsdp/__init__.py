"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded per transformer block (strategy.py)."""

from ..spec import NOT_AN_ENGINE, BackendSpec, MemoryRules, whole_tensor_refusals

_ALL = frozenset({"params", "grads", "optimizer"})

SPECS = (
    BackendSpec(
        name="fsdp", summary="FSDP2: parameters, gradients and optimizer state sharded, gathered one block at a time",
        strategy=f"{__name__}.strategy:FSDP2Strategy", shards=_ALL,
        refuses={**NOT_AN_ENGINE, **whole_tensor_refusals("fsdp"),
                 "offload:optimizer": "FSDP2 offloads parameters together with their optimizer state; use offload: "
                                      "all (or params), or zero1/zero2 for optimizer-only offload"},
        offloads=("none", "all"), accelerate_type="FSDP", launch_config="fsdp.yaml",
        meta_shard=f"{__name__}.strategy:shard_model",
        memory=MemoryRules(buffers="fsdp_units", hybrid="mesh", offload_moves={"params": _ALL, "all": _ALL},
                           grads_with_step="always", cpu_optimizer="torch", split="rows")),
)
