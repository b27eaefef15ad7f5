"""DeepSpeed ZeRO stages 1-3 (optionally with CPU offload) behind the strategy interface.

The JSON comes from configs/deepspeed/ (or the user's file) resolved by deepspeed_config.resolve_deepspeed_config
and written into the run directory. dist_ft's own process group is reused (DeepSpeed wraps it), the loss is
normalised by dist_ft's step math (so DeepSpeed must not divide by the accumulation steps again), and the
accumulation boundary is set explicitly on every micro-step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from .activation_checkpointing import enable_activation_checkpointing
from .deepspeed_config import load_template, resolve_deepspeed_config
from .strategy import OptimizerFactory, StepResult, Strategy, _to_float


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("distributed.strategy zero1/zero2/zero3 needs DeepSpeed: pip install 'dist-ft[deepspeed]'"
                          ) from exc
    return deepspeed


class DeepSpeedStrategy(Strategy):
    state_format = "deepspeed"
    TAG = "ds"  # the one tag inside a dist_ft checkpoint's state/ folder

    def __init__(self, *, stage: int, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage
        self.name = f"zero{stage}"
        self.engine = None
        self._load_universal = False

    def resolved_config(self, hidden_size: int | None) -> dict:
        template, source = load_template(self.recipe)
        cfg, problems = resolve_deepspeed_config(template, self.recipe, world_size=self.topo.world_size,
                                                 hidden_size=hidden_size, source=source)
        if problems:
            from ..config import RecipeError
            raise RecipeError(problems, source)
        if self._load_universal:
            cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "load_universal": True}
        return cfg

    def setup(self, builder, make_optimizer: OptimizerFactory) -> None:
        deepspeed = _import_deepspeed()
        # zero.Init reads the launcher's variables; a single process started by hand has none.
        for key, value in (("LOCAL_RANK", self.topo.local_rank), ("RANK", self.topo.rank),
                           ("WORLD_SIZE", self.topo.world_size)):
            os.environ.setdefault(key, str(value))
        # DeepSpeed adopts dist_ft's process group (it sees it is initialised) instead of making its own.
        deepspeed.init_distributed(dist_backend=self.topo.backend, auto_mpi_discovery=False)
        cfg = self.resolved_config(getattr(builder.config(), "hidden_size", None))
        if self.stage == 3:
            # Parameters are partitioned as they are created, then filled one at a time: no rank ever holds
            # more than one whole parameter.
            # transformers' own ZeRO-3 path: with this object alive, from_config builds under zero.Init and
            # gathers each parameter for its initialiser.
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds_config = HfDeepSpeedConfig(cfg)
            model = builder.build_meta(context=contextlib.nullcontext())
            weights = builder.weights()
            self._load_partitioned(model, weights, deepspeed)
            weights.close()
        else:
            model = builder.build()
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.topo.is_main:
            out = Path(self.recipe.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "deepspeed_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        params = [p for p in model.parameters() if p.requires_grad]
        client = None if "optimizer" in cfg else make_optimizer(params)
        groups = None
        if client is None:  # DeepSpeed builds the (CPU) optimizer; keep dist_ft's weight-decay groups.
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client, model_parameters=groups or params, config=cfg,
            dist_init_required=False)
        self.model = self.engine
        # The scheduler drives the torch optimizer inside DeepSpeed's ZeRO wrapper (same param_group dicts).
        self.optimizer = getattr(optimizer, "optimizer", optimizer)

    def _load_partitioned(self, model: torch.nn.Module, weights, deepspeed) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                shape = getattr(p, "ds_shape", p.shape)
                # Gathered whole on every rank for the moment of the copy; rank 0's values are broadcast back
                # into the partitions when the context closes.
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.topo.is_main:
                        p.data.copy_(weights.rows(name, shape, 0, shape[0] if len(shape) else 0, p.dtype))

    def unwrap(self) -> torch.nn.Module:
        return self.engine.module

    def forward_context(self):
        # DeepSpeed casts the module itself for bf16/fp16: no autocast on top.
        return contextlib.nullcontext()

    def sync_context(self, sync: bool):
        self.engine.set_gradient_accumulation_boundary(sync)
        return super().sync_context(sync)

    def backward(self, loss: torch.Tensor) -> None:
        # dist_ft already divided by the global target count: DeepSpeed must not divide by the steps again.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float | None) -> StepResult:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clips (gradient_clipping from the recipe), steps, zeroes gradients
        norm = self.engine.get_global_grad_norm()
        norm = _to_float(norm) if norm is not None else float("nan")
        applied = getattr(self.engine, "was_step_applied", lambda: True)()
        return StepResult(norm, not applied)

    def full_state_dict(self, trainable_only: bool = False):
        if self.stage == 3:
            # Gathers every partition to rank 0 (a collective); other ranks get None.
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.topo.is_main else None
        if not self.topo.is_main:
            return None
        state = {k: v.detach().cpu() for k, v in state.items()}
        if trainable_only:
            names = {n for n, p in self.engine.module.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        return state

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_state(self, folder: Path) -> None:
        # DeepSpeed's own layout: every rank writes its optimizer partition, the model states once.
        self.engine.save_checkpoint(str(folder), tag=self.TAG, client_state={}, save_latest=False,
                                    exclude_frozen_parameters=self.trainable_only)

    def trainable_state(self):
        params = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        if self.stage == 3:
            import deepspeed
            # Only the trainable partitions are gathered (the frozen base stays sharded).
            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                state = {n: p.detach().cpu().clone() for n, p in params} if self.topo.is_main else None
            return state
        return {n: p.detach().cpu().clone() for n, p in params} if self.topo.is_main else None

    def read_trainable(self, folder: Path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from ..safe_load import deepspeed_loads_weights_only
        with deepspeed_loads_weights_only():
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=self.TAG,
                                                            exclude_frozen_parameters=True)

    def prepare_resume(self, folder: Path, manifest: dict) -> None:
        """A ZeRO checkpoint loads only on the world size (and stage) that wrote it. Otherwise convert it once to
        DeepSpeed's universal format (per-parameter fp32 weights and optimizer moments) and load that."""
        if manifest.get("world_size") == self.topo.world_size and manifest.get("strategy") == self.name:
            return
        import subprocess
        import sys

        import torch.distributed as dist

        universal = folder.parent / "universal"
        if self.topo.is_main and not (universal / self.TAG).is_dir():
            tmp = folder.parent / ".universal.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            # Through our guard: the converter unpickles every ZeRO file (safe_load.py).
            cmd = [sys.executable, "-m", "dist_ft.safe_load", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(folder / self.TAG), "--output_folder", str(tmp / self.TAG),
                   "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                from ..checkpoint import CheckpointError
                raise CheckpointError(f"{folder}: converting the ZeRO checkpoint (world size "
                                      f"{manifest.get('world_size')}, {manifest.get('strategy')}) for world size "
                                      f"{self.topo.world_size} ({self.name}) failed:\n{res.stderr[-2000:]}")
            os.replace(tmp, universal)
        dist.barrier()
        self._universal_dir = universal
        self._load_universal = True

    def load_state(self, folder: Path, manifest: dict) -> None:
        source = getattr(self, "_universal_dir", None) if self._load_universal else folder
        from ..safe_load import deepspeed_loads_weights_only
        with deepspeed_loads_weights_only():  # DeepSpeed itself would unpickle with weights_only=False
            path, _ = self.engine.load_checkpoint(str(source), tag=self.TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False,
                                                  load_module_strict=not self.trainable_only)
        if path is None:
            from ..checkpoint import CheckpointError
            raise CheckpointError(f"{source / self.TAG}: DeepSpeed found no checkpoint to load")

    def close(self) -> None:
        self.engine = None
