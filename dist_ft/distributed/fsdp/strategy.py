"""FSDP2: parameters, gradients and optimizer state sharded across ranks with `fully_shard`.

Wrap order (fixed, as in torchtitan and torchtune): build on the meta device with the method applied ->
activation checkpointing -> `fully_shard` every transformer block, then the root (`shard_model`) -> allocate only
the local shards -> fill them row-range by row-range from the safetensors files (no rank ever holds a whole copy) ->
check nothing is left on meta.

Transformer blocks are found from the model itself: the classes named in `_no_split_modules` (every Hugging Face
decoder declares them), else the repeated children of the first `nn.ModuleList`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ...blocks import input_embeddings, transformer_blocks
from ..activation_checkpointing import enable_activation_checkpointing
from ..precision import PrecisionPlan
from ..strategy import OptimizerFactory, Strategy


def shard_mesh(world: int, group: int | None, device_type: str):
    """The device mesh for `distributed.shard_group_size`: None (FSDP2's default, one shard group of every rank),
    or a 2-D (replicate, shard) mesh. Ranks r*G .. r*G+G-1 form shard group r: every launcher numbers a node's
    ranks consecutively, so a group of the GPUs of one node keeps the per-block all-gathers and reduce-scatters
    inside it, and only the all-reduce of each rank's gradient shard across groups crosses nodes (HSDP)."""
    if group is None or group == world:
        return None
    if world % group:
        raise ValueError(f"distributed.shard_group_size {group} does not divide the world size {world}: give the "
                         "ranks per node, or another divisor of the world size")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // group, group), mesh_dim_names=("replicate", "shard"))


def shard_model(model: torch.nn.Module, *, precision: PrecisionPlan, offload: str, pin_memory: bool,
                mesh=None) -> None:
    """`fully_shard` every transformer block, then the untied embeddings, then the root: the wrap order of `setup`.
    `mesh`: a 2-D mesh for hybrid sharding (`shard_mesh`), else every rank is one shard group.

    Allocates nothing on a meta-device model (the shards stay on meta), so `dist-ft plan --simulate` runs this same
    function under a fake process group of any size (plan/simulate.py).
    """
    kwargs = {} if mesh is None else {"mesh": mesh}
    if precision.autocast:
        # FSDP casts the gathered parameters itself; gradients are reduced in fp32.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.compute_dtype, reduce_dtype=torch.float32)
    if offload in ("params", "all", "optimizer"):
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=pin_memory)
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    # Untied input and output embeddings get units of their own (as in torchtitan): with a large vocabulary
    # they are the biggest tensors, and in the root unit they would stay gathered for the whole step.
    inp, outp = input_embeddings(model), model.get_output_embeddings()
    if inp is not None and outp is not None and inp.weight is not outp.weight:
        fully_shard(inp, **kwargs)
        fully_shard(outp, **kwargs)
    fully_shard(model, **kwargs)


@dataclass(frozen=True)
class Placement:
    params: torch.device  # where the local parameter shards are allocated
    buffers: torch.device  # where buffers (position_ids, token_type_ids, rotary tables) live


def placement(*, offload: str, device: torch.device) -> Placement:
    """Where `to_empty` puts parameters and where buffers go, given `distributed.offload` and the rank's device.

    With a CPU offload policy FSDP2 wants the sharded parameters in host memory and copies them to the device for
    each unit's compute. Buffers are not sharded or managed by FSDP: they are read in the forward on the compute
    device, so they must live there (BERT indexes its position_ids/token_type_ids buffers with device tensors).
    """
    params = torch.device("cpu") if offload != "none" else device
    return Placement(params=params, buffers=device)


def move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Every buffer of `model` to `device` in place (parameters stay where they are)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


class FSDP2Strategy(Strategy):
    name = "fsdp"

    def setup(self, builder, make_optimizer: OptimizerFactory) -> None:
        self.model = self._sharded(builder, frozen=False)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def frozen_copy(self, builder) -> torch.nn.Module:
        """Sharded exactly as the policy: each block gathered for its forward and freed after it."""
        return self._sharded(builder, frozen=True).eval()

    def _sharded(self, builder, *, frozen: bool) -> torch.nn.Module:
        offload = self.recipe.distributed.offload if self.recipe is not None else "none"
        model = builder.build_meta()
        if frozen:
            model.requires_grad_(False)
        elif self.activation_checkpointing:
            enable_activation_checkpointing(model)
        if not frozen:
            self.compile_blocks(model)  # before sharding: FSDP2's per-block hooks stay outside the compiled code
        group = self.recipe.distributed.shard_group_size if self.recipe is not None else None
        shard_model(model, precision=self.precision, offload=offload, pin_memory=self.topo.device.type == "cuda",
                    mesh=shard_mesh(self.topo.world_size, group, self.topo.device.type))
        buffers = {n: b.clone() for n, b in model.named_buffers() if b.device.type != "meta"}
        where = placement(offload=offload, device=self.topo.device)
        model.to_empty(device=where.params)
        move_buffers(model, where.buffers)
        weights = builder.weights(model)
        self._load_shards(model, weights, buffers)
        return model

    def _load_shards(self, model: torch.nn.Module, weights, buffers: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if isinstance(p, DTensor):
                    local = p.to_local()
                    # One mesh dimension shards dim 0 (the other, under hybrid sharding, replicates).
                    (axis, placement), = [(i, q) for i, q in enumerate(p.placements) if isinstance(q, Shard)]
                    assert placement.dim == 0, placement
                    # fully_shard splits dim 0 like torch.chunk: ceil(n / group) rows per rank, the last ones short.
                    rows_per_rank = -(-p.shape[0] // p.device_mesh.size(axis)) if p.dim() else 0
                    start = p.device_mesh.get_local_rank(axis) * rows_per_rank
                    stop = start + (local.shape[0] if p.dim() else 0)
                    if local.numel():
                        local.copy_(weights.rows(name, p.shape, start, stop, local.dtype))
                else:
                    p.copy_(weights.rows(name, p.shape, 0, p.shape[0] if p.dim() else 0, p.dtype))
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
        if left:
            raise RuntimeError(f"still on the meta device after loading: {left[:5]}")

    def unwrap(self) -> torch.nn.Module:
        return self.model

    def sync_context(self, sync: bool):
        self.model.set_requires_gradient_sync(sync)
        return super().sync_context(sync)

    def full_state_dict(self, trainable_only: bool = False):
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.topo.is_main:
            return None
        if trainable_only:
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        return state

    def gathered_units(self, units):
        """One unit at a time, each tensor all-gathered and (on rank 0) copied to the CPU before the next: no rank
        holds more than one tensor beyond rank 0's current unit."""
        state = self.model.state_dict(keep_vars=True)  # the sharded DTensors themselves
        for unit in units:
            yield _gather_to_main({n: state[n] for n in unit.tensors}, self.topo.is_main)


def _gather_to_main(tensors: dict[str, torch.Tensor], is_main: bool) -> dict[str, torch.Tensor] | None:
    out: dict[str, torch.Tensor] | None = {} if is_main else None
    with torch.no_grad():
        for name, t in tensors.items():
            if isinstance(t, DTensor):
                if t.device.type != t.device_mesh.device_type:  # CPU-offloaded shards, a GPU process group
                    t = t.to(t.device_mesh.device_type)
                t = t.full_tensor()  # a collective over the mesh (any placements: 1-D or hybrid)
            if out is not None:
                out[name] = t.detach().cpu()
    return out
