"""DDP: every rank holds the whole model; gradients are averaged with one all-reduce per step."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from ..activation_checkpointing import enable_activation_checkpointing
from ..precision import autocast_inputs_cast_once, frozen_linears_in_compute_dtype
from ..spec import spec_for
from ..strategy import OptimizerFactory, Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, builder, make_optimizer: OptimizerFactory) -> None:
        from ...model import is_quantized
        model = builder.build()
        if not is_quantized(model):  # a bitsandbytes base is placed by from_pretrained and refuses .to()
            model = model.to(self.topo.device)
        self._cast = 0
        rules = spec_for(self.name).memory
        if self.recipe is not None and rules.frozen_linears_in_compute_dtype:
            self._cast = frozen_linears_in_compute_dtype(model, self.precision, self.recipe.method)
        if rules.projection_inputs_cast_once:
            autocast_inputs_cast_once(model, self.precision)
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.compile_blocks(model)
        self._module = model
        # Always wrapped, also on one rank: the same code path (and numerics) on 1 and N processes.
        kwargs = {"device_ids": [self.topo.device.index]} if self.topo.device.type == "cuda" else {}
        self.model = DistributedDataParallel(model, **kwargs)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])

    def describe(self) -> str | None:
        if not self._cast:
            return None
        dtype = str(self.precision.compute_dtype).removeprefix("torch.")
        return (f"ddp: {self._cast} frozen Linear weights stored in {dtype}, the copy autocast would make of them "
                "every step")

    def unwrap(self) -> torch.nn.Module:
        return self._module

    def sync_context(self, sync: bool):
        # nanoGPT's trick, through DDP's own API: skip the all-reduce on all but the last micro-step.
        return super().sync_context(sync) if sync else self.model.no_sync()

    def full_state_dict(self, trainable_only: bool = False):
        if not self.topo.is_main:
            return None
        return {k: v.detach().cpu() for k, v in _named_state(self._module, trainable_only).items()}


def _named_state(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    if not trainable_only:
        return state
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}
