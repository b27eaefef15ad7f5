"""The small interface between the trainer and a sharding backend, and the factory that picks one.

The trainer only ever calls these methods; it never names DDP, FSDP or DeepSpeed. Each backend lives in its own
module (ddp.py, fsdp.py, deepspeed_zero.py) and is imported only when chosen, so a DDP user needs no DeepSpeed.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .precision import PrecisionPlan
from .topology import Topology

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool  # a non-finite gradient on any rank: no update was made


class Strategy(ABC):
    """One per backend: builds the model and optimizer its way, then runs backward, clip and step its way."""

    name: str = "?"

    def __init__(self, *, topo: Topology, precision: PrecisionPlan, activation_checkpointing: bool, recipe=None):
        self.topo = topo
        self.precision = precision
        self.activation_checkpointing = activation_checkpointing
        self.recipe = recipe
        self.model: torch.nn.Module | None = None  # what forward is called on
        self.optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------------------------------------ setup
    @abstractmethod
    def setup(self, builder, make_optimizer: OptimizerFactory) -> None:
        """Build the model through `builder` (model.ModelBuilder: `build()` whole, or `build_meta()` plus
        `weights()` for shard-wise loading), shard it, and create the optimizer over its trainable parameters."""

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
        loss.backward()

    def step(self, max_grad_norm: float | None) -> StepResult:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        norm = _to_float(norm)
        # The norm is global (gradients are already reduced), so every rank takes the same decision.
        skipped = not math.isfinite(norm)
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # ------------------------------------------------------------------------------------------------ state
    @abstractmethod
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
        """The whole model's state on rank 0 (CPU tensors), None on other ranks. A collective: call on every rank."""

    def close(self) -> None:
        pass


def _to_float(norm) -> float:
    if hasattr(norm, "full_tensor"):  # a DTensor norm from sharded parameters
        norm = norm.full_tensor()
    return float(norm)


def make_strategy(name: str, **kwargs) -> Strategy:
    if name == "ddp":
        from .ddp import DDPStrategy
        return DDPStrategy(**kwargs)
    if name == "fsdp":
        from .fsdp import FSDP2Strategy
        return FSDP2Strategy(**kwargs)
    if name in ("zero1", "zero2", "zero3"):
        from .deepspeed_zero import DeepSpeedStrategy
        return DeepSpeedStrategy(stage=int(name[-1]), **kwargs)
    raise ValueError(f"distributed.strategy: unknown strategy {name!r}")
