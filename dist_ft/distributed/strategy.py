"""The small interface between the trainer and a sharding backend.

The trainer only ever calls these methods; it never names a backend. Each backend lives in its own package
(ddp/, fsdp/, deepspeed/) with its spec, and is imported only when chosen (spec.make_strategy), so a DDP user needs
no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .precision import PrecisionPlan
from .topology import Topology

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool  # a non-finite gradient on any rank: no update was made
    loss_scale: float | None = None  # fp16-mixed: the loss scale after this step (halved by a skipped step)


class Strategy(ABC):
    """One per backend: builds the model and optimizer its way, then runs backward, clip and step its way."""

    name: str = "?"
    state_format: str = "dcp"  # what save_state writes; a checkpoint resumes under any strategy that reads it

    def __init__(self, *, topo: Topology, precision: PrecisionPlan, activation_checkpointing: bool, recipe=None):
        self.topo = topo
        self.precision = precision
        self.activation_checkpointing = activation_checkpointing
        self.recipe = recipe
        self.model: torch.nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None
        # fp16 needs a dynamic loss scale, on CPU as on CUDA. DeepSpeed keeps its own (deepspeed_zero.py). Under
        # FSDP2 the gradients are DTensors, whose inf check is reduced over the mesh (DTensor's handler for
        # _amp_foreach_non_finite_check_and_unscale_), so this plain scaler skips a step on every rank or on none.
        self.scaler = torch.amp.GradScaler(topo.device.type) if precision.needs_scaler else None
        # Parameters whose gradients are dropped before the step (gradual unfreezing: not yet open).
        self.grad_mask: list[torch.nn.Parameter] = []

    # ------------------------------------------------------------------------------------------------ setup
    def compile_blocks(self, model: torch.nn.Module) -> None:
        """training.compile: each transformer block compiled before the backend wraps or shards `model`
        (compile.py); backends that support it call this at that point of their setup."""
        if self.recipe is None or not self.recipe.training.compile:
            return
        from ..config import RecipeError
        from .compile import compile_blocks, why_not_compilable
        why = why_not_compilable(self.topo.device)
        if why:
            raise RecipeError([f"training.compile: {why}"])
        compile_blocks(model)

    @abstractmethod
    def setup(self, builder, make_optimizer: OptimizerFactory) -> None:
        """Build the model through `builder` (model.ModelBuilder: `build()` whole, or `build_meta()` plus
        `weights()` for shard-wise loading), shard it, and create the optimizer over its trainable parameters."""

    def frozen_copy(self, builder) -> torch.nn.Module:
        """A second model from the starting weights, frozen (objective.reference: copy), held as this backend holds
        the policy's weights: here whole on every rank (DDP). Forward is called on what this returns, under
        forward_context(), without gradients."""
        from ..model import is_quantized
        model = builder.build()
        if not is_quantized(model):  # a bitsandbytes base is placed by from_pretrained and refuses .to()
            model = model.to(self.topo.device)
        return model.requires_grad_(False).eval()

    def config_record(self) -> dict:
        """The backend's own resolved configuration, if it has one, for the run's config record (W&B, TensorBoard):
        {name: JSON-able dict}."""
        return {}

    def describe(self) -> str | None:
        """What the backend was configured to do, as read back from it (logged once after setup)."""
        return None

    @abstractmethod
    def unwrap(self) -> torch.nn.Module:
        """The user's model (a Hugging Face or PEFT module), for saving and generation."""

    # ------------------------------------------------------------------------------------------------ step
    def forward_context(self):
        return self.precision.autocast_context(self.topo.device)

    def sync_context(self, sync: bool):
        """Gradient synchronisation is skipped on all but the last micro-step of an accumulation."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, max_grad_norm: float | None) -> StepResult:
        for p in self.grad_mask:
            p.grad = None  # no update, no optimizer state, and not in the clipping norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        norm = _to_float(norm)
        # The norm is global (gradients are already reduced), so every rank takes the same decision.
        skipped = not math.isfinite(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan, and lowers the scale
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped, self.loss_scale())

    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (None without loss scaling)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # ------------------------------------------------------------------------------------------------ state
    @abstractmethod
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """The whole model's state on rank 0 (CPU tensors), None on other ranks. A collective: call on every rank."""

    def gathered_units(self, units) -> Iterator[dict[str, torch.Tensor] | None]:
        """The tensors of each unit in `units` (checkpoint/hf_folder.py `SaveUnit`s: state-dict names of the model
        `unwrap()` returns), whole and on the CPU, on rank 0 (None elsewhere), one unit at a time: the caller writes
        and drops each before asking for the next. A collective: every rank iterates it to the end. Here every rank
        holds the whole model already (DDP, ZeRO-1/2): only the unit's copy to the host is made."""
        state = self.unwrap().state_dict(keep_vars=True)
        for unit in units:
            yield ({n: state[n].detach().cpu() for n in unit.tensors} if self.topo.is_main else None)

    # ------------------------------------------------------------------------------------------------ checkpoints
    @property
    def trainable_only(self) -> bool:
        """Checkpoints of adapter methods leave out the frozen base weights."""
        if self.recipe is None or self.recipe.method.kind == "full":
            return False
        pc = self.recipe.method.partial
        return not (self.recipe.method.kind == "partial" and (pc.unfreeze_every_steps or pc.unfreeze_every_epochs))

    def prepare_resume(self, folder: Path, manifest: dict, *, allow_pickle: Iterable[str] = ()) -> None:
        """Called before setup when resuming (a backend that must configure itself for loading does it here).
        `allow_pickle`: the files checkpoint.allow_pickle trusts, for any converter the backend runs."""

    def save_state(self, folder: Path) -> None:
        """Write model and optimizer state, sharded, into `folder`. A collective: every rank calls it."""
        from . import dcp_state
        dcp_state.save(self.model, self.optimizer, folder, trainable_only=self.trainable_only)

    def load_state(self, folder: Path, manifest: dict) -> None:
        """Fill model and optimizer from `folder` (after setup). A collective."""
        from . import dcp_state
        dcp_state.load(self.model, self.optimizer, folder, trainable_only=self.trainable_only)

    def trainable_state(self) -> dict[str, torch.Tensor] | None:
        """The trainable tensors, whole, on rank 0 (None elsewhere). A collective that gathers nothing frozen."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return state if self.topo.is_main else None

    def read_trainable(self, folder: Path) -> dict[str, torch.Tensor]:
        """The trainable tensors as stored in `folder` (this process alone, no collective): to verify a save."""
        from . import dcp_state
        return dcp_state.read_model_tensors(folder)

    def extra_state(self) -> dict:
        """Small JSON-able state beyond model and optimizer (the loss scale)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        pass


def _to_float(norm) -> float:
    if hasattr(norm, "full_tensor"):  # a DTensor norm from sharded parameters
        norm = norm.full_tensor()
    return float(norm)
