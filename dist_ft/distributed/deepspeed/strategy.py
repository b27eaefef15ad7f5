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

from ..activation_checkpointing import enable_activation_checkpointing
from .config import deepspeed_problems, load_template, resolve_deepspeed_config
from ..strategy import OptimizerFactory, StepResult, Strategy, _to_float


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError("distributed.strategy zero1/zero2/zero3 needs DeepSpeed: pip install 'dist-ft[deepspeed]'"
                          ) from exc
    return deepspeed


def _share_fp32_master(zero_optimizer) -> int:
    """Let ZeRO-3 update an fp32 model's partitions in place instead of through a second fp32 copy. Returns bytes freed.

    DeepSpeed means to share them when the partition already has the master dtype and device, but its test compares a
    torch.device with a device-name string, which is never equal: an fp32 run then holds every partition twice, a
    quarter of ZeRO-3's steady memory. Must run before the first step: the optimizer's state is keyed by these
    tensors, and it is empty until then.
    """
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    parts = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None)
    inner = getattr(zero_optimizer, "optimizer", None)
    if not masters or not parts or len(masters) != len(parts) or getattr(inner, "state", None):
        return 0
    freed = 0
    for i, (master, part) in enumerate(zip(masters, parts)):
        if (part is None or master is part or master.dtype != part.dtype or master.device != part.device
                or master.shape != part.shape or master.numel() == 0):
            continue
        with torch.no_grad():
            part.copy_(master)  # equal already; copied so that sharing can never change a value
        part.ds_id = master.ds_id
        part.requires_grad = True
        part.grad = master.grad  # the offload path keeps a gradient buffer attached
        masters[i] = part
        freed += master.numel() * master.element_size()
    return freed


def _step_on_gradients_in_place(zero_optimizer) -> None:
    """Let ZeRO-3's optimizer step read each sub-group's gradients where they are instead of from a fresh copy.

    Before each sub-group's step DeepSpeed concatenates its gradient partitions into a new tensor. They already lie
    side by side in one flat buffer, so that copy (a whole partition of gradients, the step's peak) is replaced by a
    view of the buffer. Anything else (a layout where they are not adjacent, another dtype) takes DeepSpeed's path.
    """
    original = getattr(zero_optimizer, "_prepare_fp32_grad_for_sub_group", None)
    if original is None or zero_optimizer.offload_optimizer:
        return

    def prepare(sub_group_id: int) -> None:
        grads = zero_optimizer.averaged_gradients[sub_group_id]
        master = zero_optimizer.fp32_partitioned_groups_flat[sub_group_id]
        flat = _adjacent(grads)
        if flat is None or flat.dtype != master.dtype or flat.device != master.device or flat.numel() != master.numel():
            return original(sub_group_id)
        master.grad = flat
        zero_optimizer.averaged_gradients[sub_group_id] = None

    zero_optimizer._prepare_fp32_grad_for_sub_group = prepare


def _adjacent(tensors) -> torch.Tensor | None:
    """One 1-D view over tensors that follow each other in the same storage, else None."""
    if not tensors:
        return None
    first = tensors[0]
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.dtype != first.dtype or t.untyped_storage().data_ptr() != ptr
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,), first.storage_offset())


class _GradientRelease:
    """Free ZeRO-3's gradient partitions between optimizer steps, as FSDP2 does with its sharded gradients.

    DeepSpeed keeps one flat buffer of this rank's gradient partitions for the whole run, though it only holds
    values from the first backward of a step to the optimizer step. Its storage is released after each step and
    re-allocated by the next backward; the forward and the start of the backward, where activations peak, then run
    without it (a partition's worth of memory: 256 MB per rank for a 130M model on 2 ranks, 2.2 GB at 1.1B).

    DeepSpeed overwrites a parameter's slice on the first micro-step and adds to it on later ones, and never writes
    the slice of a parameter that got no gradient or whose partition on this rank is padding only. Those slices are
    zeroed after the first backward of each step, so no value from the re-allocated (uninitialised) memory can reach
    the optimizer. DIST_FT_POISON_RELEASED_GRADS=1 fills the re-allocated memory with NaN first (tests use it to
    prove that).
    """

    def __init__(self, zero_optimizer, rank_in_group: int):
        self.buffer = getattr(zero_optimizer, "grad_partitions_flat_buffer", None)
        views = getattr(zero_optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
        groups = getattr(zero_optimizer, "fp16_groups", None)
        # Pinned host memory (offload on GPUs) comes from another allocator: kept, like another DeepSpeed layout.
        self.enabled = (isinstance(self.buffer, torch.Tensor) and isinstance(views, dict) and bool(groups)
                        and not self.buffer.is_pinned() and self.buffer.untyped_storage().resizable())
        if not self.enabled:  # the buffer is kept: nothing is lost but the saving
            return
        self.nbytes = self.buffer.untyped_storage().nbytes()
        self.slices = []  # (param, its slice of the buffer, whether DeepSpeed ever writes it on this rank)
        for p in (p for group in groups for p in group):
            written = p.partition_numel() * rank_in_group < p.ds_numel
            self.slices.append((p, views[p.ds_id], written))
            p.register_post_accumulate_grad_hook(self._mark)
        self.got_grad: set[int] = set()
        self.fresh = False
        self.poison = os.environ.get("DIST_FT_POISON_RELEASED_GRADS") == "1"

    def _mark(self, param) -> None:
        self.got_grad.add(id(param))

    def before_backward(self) -> None:
        if self.enabled and self.buffer.untyped_storage().nbytes() == 0:
            self.buffer.untyped_storage().resize_(self.nbytes)  # every slice is a view of this storage
            if self.poison:
                self.buffer.fill_(float("nan"))
            self.fresh = True

    def after_backward(self) -> None:
        if not (self.enabled and self.fresh):
            return
        with torch.no_grad():
            for p, view, written in self.slices:
                if not written or id(p) not in self.got_grad:
                    view.zero_()
        self.fresh = False

    def after_step(self) -> None:
        if self.enabled:
            self.got_grad.clear()
            self.buffer.untyped_storage().resize_(0)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


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
        if not problems:  # as `dist-ft check` does, so DeepSpeed never says it as a traceback on every rank
            problems = deepspeed_problems(cfg, source=source)
        if problems:
            from ...config import RecipeError
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
            weights = builder.weights(model)
            self._load_partitioned(model, weights, deepspeed)
        else:
            model = builder.build()
        if self.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.topo.is_main:
            out = Path(self.recipe.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "deepspeed_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        self._resolved = cfg  # for config_record
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
        self._grads = None
        if self.stage == 3:
            _share_fp32_master(self.engine.optimizer)
            _step_on_gradients_in_place(self.engine.optimizer)
            import torch.distributed as dist
            self._grads = _GradientRelease(self.engine.optimizer, dist.get_rank())
        # The scheduler drives the torch optimizer inside DeepSpeed's ZeRO wrapper (same param_group dicts).
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self._check_engine()

    def frozen_copy(self, builder) -> torch.nn.Module:
        """An engine without an optimizer, as TRL builds its reference: ZeRO-3 partitions the copy like the policy
        (gathered block by block for its forward); under ZeRO-1/2, whose weights are whole on every rank, stage 0.
        The engine casts the copy to the policy's precision (bf16, fp16) as it casts the policy."""
        deepspeed = _import_deepspeed()
        cfg = {k: v for k, v in self._resolved.items() if k not in ("optimizer", "scheduler")}
        zero = cfg.get("zero_optimization", {})
        cfg["zero_optimization"] = ({k: v for k, v in zero.items() if k != "offload_optimizer"}
                                    if self.stage == 3 else {"stage": 0})
        if self.stage == 3:  # built under zero.Init (the HfDeepSpeedConfig of setup is alive), filled partition-wise
            model = builder.build_meta(context=contextlib.nullcontext())
            self._load_partitioned(model, builder.weights(model), deepspeed)
        else:
            model = builder.build()
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
        engine.eval()  # (the engine's eval() returns None, not the module)
        return engine

    def _check_engine(self) -> None:
        """Read back from the engine what it will do and compare with the recipe: a JSON that resolved right but
        was read otherwise by DeepSpeed must not train silently in another precision or with other clipping."""
        e, t, precision = self.engine, self.recipe.training, self.recipe.distributed.precision
        _, accum = e.get_data_types()
        self._actual = {"bf16": bool(e.bfloat16_enabled()), "fp16": bool(e.fp16_enabled()),
                        "gradient_clipping": float(e.gradient_clipping() or 0.0),
                        "communication": _dtype_name(e.communication_data_type), "grad_accum": _dtype_name(accum),
                        "optimizer": type(self.optimizer).__name__,
                        "bf16_master": bool(e.bf16_master_weights_and_gradients()),
                        "bf16_moments": bool(e.bf16_optimizer_states())}
        want = {"bf16": precision in ("bf16-mixed", "bf16-true"), "fp16": precision == "fp16-mixed",
                "gradient_clipping": float(t.max_grad_norm or 0.0)}
        if precision == "bf16-true":  # no fp32 anywhere, as DDP and FSDP2 reduce a bf16 model's gradients
            want |= {"bf16_master": True, "bf16_moments": True, "grad_accum": "bf16"}
        elif precision != "fp16-mixed":  # fp16 reduces in fp16 under its loss scale, as DeepSpeed means it to
            # Gradients are reduced and accumulated in fp32, as under DDP and FSDP2 (precision.py).
            want |= {"communication": "fp32", "grad_accum": "fp32"}
        wrong = {k: (self._actual[k], v) for k, v in want.items() if self._actual[k] != v}
        if wrong:
            raise RuntimeError(f"DeepSpeed engine disagrees with the recipe (engine, recipe): {wrong}")

    def config_record(self) -> dict:
        return {"deepspeed": self._resolved}

    def describe(self) -> str:
        a = self._actual
        return (f"DeepSpeed ZeRO-{self.stage}: bf16 {'on' if a['bf16'] else 'off'}, fp16 {'on' if a['fp16'] else 'off'}"
                f", gradient clipping {a['gradient_clipping'] or 'off'}, optimizer {a['optimizer']}, gradients reduced "
                f"in {a['communication']} and accumulated in {a['grad_accum']}, master weights "
                f"{'bf16' if a['bf16_master'] else 'fp32'}")

    def _load_partitioned(self, model: torch.nn.Module, weights, deepspeed) -> None:
        made = self._materialise(model, weights, deepspeed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if id(p) in made:
                    continue
                shape = getattr(p, "ds_shape", p.shape)
                # Gathered whole on every rank for the moment of the copy; rank 0's values are broadcast back
                # into the partitions when the context closes.
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.topo.is_main:
                        p.data.copy_(weights.rows(name, shape, 0, shape[0] if len(shape) else 0, p.dtype))

    @staticmethod
    def _materialise(model: torch.nn.Module, weights, deepspeed) -> set[int]:
        """Parameters left on the meta device (a qlora base is built outside zero.Init: quantized.py), made from
        the checkpoint one module at a time, children first, each module's partitioned by zero.Init(module=) before
        the next is read. Every rank reads (and quantises) the tensor: the 4-bit constants stay whole on every rank,
        on the parameter itself, which ZeRO-3 keeps. Returns the ids of the parameters made."""
        packed = getattr(weights, "layers", {})  # QLoRA's 4-bit layers (quantized.QuantizingWeights)
        names = {id(p): n for n, p in model.named_parameters()}
        made: dict[int, torch.nn.Parameter] = {}
        with torch.no_grad():
            for module in reversed(list(model.modules())):
                todo = [(k, p) for k, p in module._parameters.items() if p is not None and p.device.type == "meta"]
                for key, p in todo:
                    if id(p) not in made:
                        name = names[id(p)]
                        value = weights.rows(name, p.shape, 0, p.shape[0] if p.dim() else 0, p.dtype)
                        if name in packed:
                            made[id(p)] = type(p)(value, requires_grad=False, quant_state=module.quant_state,
                                                  blocksize=p.blocksize, compress_statistics=p.compress_statistics,
                                                  quant_type=p.quant_type, quant_storage=p.quant_storage,
                                                  module=module, bnb_quantized=True)
                        else:
                            made[id(p)] = torch.nn.Parameter(value, requires_grad=p.requires_grad)
                    module._parameters[key] = made[id(p)]
                if todo:
                    deepspeed.zero.Init(module=module, dtype=torch.float32)  # (dtype: for modules made inside)
        return {id(p) for p in made.values()}

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
        if self._grads:
            self._grads.before_backward()
        self.engine.backward(loss, scale_wrt_gas=False)
        if self._grads:
            self._grads.after_backward()

    def step(self, max_grad_norm: float | None) -> StepResult:
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()  # clips (gradient_clipping from the recipe), steps, zeroes gradients
        norm = self.engine.get_global_grad_norm()
        norm = _to_float(norm) if norm is not None else float("nan")
        applied = getattr(self.engine, "was_step_applied", lambda: True)()
        if self._grads:
            self._grads.after_step()
        return StepResult(norm, not applied, self.loss_scale())

    def loss_scale(self) -> float | None:
        # DeepSpeed's own dynamic scaler (the JSON's fp16 block); saved and restored with its optimizer state.
        return float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else None

    def extra_state(self) -> dict:
        """The fp16 loss scaler as DeepSpeed holds it (it saves and restores it itself; recorded here to be read)."""
        scaler = getattr(self.engine.optimizer, "loss_scaler", None) if self.engine.fp16_enabled() else None
        if scaler is None:
            return {}
        keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
        return {"deepspeed_loss_scaler": {k: float(getattr(scaler, k)) for k in keys if hasattr(scaler, k)}}

    def load_extra_state(self, state: dict) -> None:
        pass  # DeepSpeed's load_checkpoint restored the scaler with the optimizer state

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

    def gathered_units(self, units):
        """ZeRO-3: the partitions of one unit gathered on every rank (GatheredParameters), copied to the CPU on rank 0
        and released before the next unit. ZeRO-1/2 hold the whole model on every rank: the base class's copy."""
        if self.stage != 3:
            yield from super().gathered_units(units)
            return
        state = self.engine.module.state_dict(keep_vars=True)  # the partitioned parameters themselves
        # As DeepSpeed's own consolidation does: every parameter partitioned first (the evaluation's prefetches may
        # still be in flight), the persistent ones gathered back after.
        zero = self.engine.optimizer
        zero.checkpoint_event_prologue()
        for unit in units:
            yield self._gather_to_main({n: state[n] for n in unit.tensors})
        zero.checkpoint_event_epilogue()

    def _gather_to_main(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        import deepspeed
        params = list({id(t): t for t in tensors.values() if hasattr(t, "ds_id")}.values())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if not self.topo.is_main:
                return None
            # A copy: the gathered storage is released when the context closes.
            return {n: t.detach().to("cpu", copy=True) for n, t in tensors.items()}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_state(self, folder: Path) -> None:
        # DeepSpeed's own layout: every rank writes its optimizer partition, the model states once.
        self.engine.save_checkpoint(str(folder), tag=self.TAG, client_state={}, save_latest=False,
                                    exclude_frozen_parameters=self.trainable_only)

    def trainable_state(self):
        params = [(n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad]
        if self.stage == 3:
            import deepspeed
            # Only the trainable partitions are gathered (the frozen base stays sharded). Every parameter is
            # partitioned first, as for gathered_units: an evaluation's prefetches may still be in flight.
            self.engine.optimizer.checkpoint_event_prologue()
            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                state = {n: p.detach().cpu().clone() for n, p in params} if self.topo.is_main else None
            self.engine.optimizer.checkpoint_event_epilogue()
            return state
        return {n: p.detach().cpu().clone() for n, p in params} if self.topo.is_main else None

    def read_trainable(self, folder: Path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from ...safe_load import deepspeed_loads_weights_only
        with deepspeed_loads_weights_only():
            return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=self.TAG,
                                                            exclude_frozen_parameters=True)

    def prepare_resume(self, folder: Path, manifest: dict, *, allow_pickle=()) -> None:
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
            allow = [a for path in allow_pickle for a in ("--allow", str(path))]
            cmd = [sys.executable, "-m", "dist_ft.safe_load", *allow, "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(folder / self.TAG), "--output_folder", str(tmp / self.TAG),
                   "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                from ...checkpoint.store import CheckpointError
                raise CheckpointError(f"{folder}: converting the ZeRO checkpoint (world size "
                                      f"{manifest.get('world_size')}, {manifest.get('strategy')}) for world size "
                                      f"{self.topo.world_size} ({self.name}) failed:\n{res.stderr[-2000:]}")
            os.replace(tmp, universal)
        dist.barrier()
        self._universal_dir = universal
        self._load_universal = True

    def load_state(self, folder: Path, manifest: dict) -> None:
        source = getattr(self, "_universal_dir", None) if self._load_universal else folder
        from ...safe_load import deepspeed_loads_weights_only
        with deepspeed_loads_weights_only():  # DeepSpeed itself would unpickle with weights_only=False
            path, _ = self.engine.load_checkpoint(str(source), tag=self.TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False,
                                                  load_module_strict=not self.trainable_only)
        if path is None:
            from ...checkpoint.store import CheckpointError
            raise CheckpointError(f"{source / self.TAG}: DeepSpeed found no checkpoint to load")

    def close(self) -> None:
        self.engine = None
