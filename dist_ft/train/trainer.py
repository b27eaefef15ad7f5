"""The Trainer: one run's model, data, checkpoints and telemetry, and the loop over its steps.

It names no backend: the strategy (distributed/spec.py picks it) builds, shards, steps and gathers; the
CheckpointManager chooses, loads and writes checkpoints; the hooks (hooks.py) evaluate, keep the best, stop early,
unfreeze and answer stop signals. `run.py` does what comes before: the recipe checked, the data tokenized, the
process group started.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import faults
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.store import TrainerState
from ..config import Recipe, dump_recipe, recipe_to_dict
from ..data.batching import BatchLayout, collate, count_inputs, useful_size
from ..data.feed import TrainFeed, memory_table
from ..distributed import watchdog
from ..distributed.compile import compile_seconds
from ..distributed.precision import precision_plan
from ..distributed.rendezvous import PatientWait
from ..distributed.spec import make_strategy
from ..distributed.topology import Topology
from ..host_memory import release_freed, trim_before_blocks
from ..model import ModelBuilder, choose_cpu_sdpa_kernel, count_parameters, resolve_attention
from ..preflight import LAUNCHER_FILES
from ..telemetry.flops import device_peak, method_flops, mfu, step_flops_per_token
from ..telemetry.progress import MemoryMeter, Progress
from ..telemetry.tracker import Tracker
from .evaluation import RunEvaluator
from .hooks import (EarlyStop, Evaluation, KeepBest, NonFiniteGuard, StopSignals, Unfreezing, fmt_metrics,
                    inject_step_faults)
from .optim import make_optimizer
from .reference import PrecomputedReference
from .schedule import make_scheduler
from .objective import make_objective
from .step import all_reduce_sum, step_record


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    eval_before: dict
    eval_after: dict
    final_dir: Path | None
    stopped_early: bool
    seconds: float
    resumed_from: Path | None = None
    stopped_at: int | None = None  # this invocation stopped here, with a checkpoint, to be resumed
    stop_reason: str | None = None  # "training.stop_after_steps", or the signal's name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Built on every rank once the process group exists; `train()` runs the loop and saves `final/`."""

    def __init__(self, recipe: Recipe, topo: Topology, tok, data, model_path: Path, forgetting: list,
                 t_start: float, waits: PatientWait | None = None):
        self.recipe, self.topo, self.tok, self.data, self.t_start = recipe, topo, tok, data, t_start
        self.waits, self._streamed = waits, False
        self.t = recipe.training
        self.log(f"[dist_ft] {topo.describe()}; world size {topo.world_size}")
        if topo.world_size > 1 and not topo.is_main:
            print(f"[dist_ft] {topo.describe()}", flush=True)
        self.out = self._prepare_output()
        dist.barrier()
        seed_everything(recipe.seed)
        self._build_model(model_path)
        self.objective = make_objective(recipe)
        reference = getattr(self.objective, "reference", None)
        if reference is not None and reference.mode == "precomputed":  # before a checkpoint replaces the weights
            reference.precomputed = self._reference(model_path)
        elif reference is not None and reference.mode == "copy":
            reference.copy = self.strategy.frozen_copy(self.builder)
            self.log("[objective] the reference policy is a frozen copy of the starting weights, held as the "
                     f"{recipe.distributed.strategy} strategy holds the policy's")
        fresh = TrainerState(model_build={"num_labels": data.num_labels, "label_names": data.label_names})
        self.state = self.checkpoints.load(fresh, self.scheduler)
        self._build_data()
        self._build_telemetry()
        evaluator = RunEvaluator(recipe, self.strategy, data, tok, forgetting, objective=self.objective)
        self.evaluate = Evaluation(evaluator, self.tracker,
                                   out=self.out, topo=topo, state=self.state, log=self.log)
        self.keep_best = KeepBest(recipe.checkpoint, self.checkpoints, self.state)
        self.early_stop = EarlyStop(self.t.early_stopping_patience, self.state)
        self.skip_guard = NonFiniteGuard(self.state, self.log)

    def log(self, msg: str) -> None:
        if self.topo.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------------------------ setup
    def _prepare_output(self) -> Path:
        out = Path(self.recipe.output_dir)
        if self.topo.is_main:
            # (preflight refuses overwrite_output_dir together with checkpoint.resume: checkpoints are never wiped)
            if self.recipe.overwrite_output_dir and out.is_dir():
                for child in out.iterdir():
                    if child.name in LAUNCHER_FILES:  # the running batch script and its log
                        continue
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(dump_recipe(self.recipe), encoding="utf-8")
        return out

    def _build_model(self, model_path: Path) -> None:
        """The strategy builds the model; a checkpoint to resume from is chosen first and loaded after."""
        r, data = self.recipe, self.data
        self.precision = precision_plan(r.distributed.precision)
        self.attn, why = resolve_attention(r.model.attn_implementation, precision=r.distributed.precision)
        self.log(f"[dist_ft] attention: {self.attn} ({why}); precision {self.precision.name}; strategy "
                 f"{r.distributed.strategy}; method {r.method.kind}")
        kernel = choose_cpu_sdpa_kernel(self.attn, device=self.topo.device, compute_dtype=self.precision.compute_dtype,
                                        max_length=r.data.max_length)
        if kernel:
            self.log(f"[dist_ft] {kernel}")
        self.builder = ModelBuilder(r, model_path, num_labels=data.num_labels, label_names=data.label_names,
                                    pad_token_id=data.pad_token_id, dtype=self.precision.param_dtype,
                                    attn_implementation=self.attn)
        self.strategy = make_strategy(r.distributed.strategy, topo=self.topo, precision=self.precision,
                                      activation_checkpointing=r.distributed.activation_checkpointing, recipe=r)
        self.checkpoints = CheckpointManager(r, topo=self.topo, strategy=self.strategy, tokenizer=self.tok,
                                             model_path=model_path, log=self.log)
        self.checkpoints.choose()
        self.strategy.setup(self.builder, make_optimizer(r))
        release_freed()  # what loading freed between the kept shards (host_memory.py)
        if r.distributed.host_memory_trim == "blocks":
            skipped = trim_before_blocks(self.strategy.unwrap(), self.topo.device)
            if skipped:
                self.log(f"[dist_ft] {skipped}")
        self.counts = count_parameters(self.strategy.unwrap())
        self.log(f"[weights] {self.builder.load_report.describe()}")
        self.log(f"[dist_ft] {self.counts.describe()}")
        if r.training.fused_loss:
            from .fused_loss import why_not_fusable
            why = why_not_fusable(self.strategy.unwrap())
            if why:
                from ..config import RecipeError
                raise RecipeError([f"training.fused_loss: this model's head cannot be fused: {why}; set "
                                   "training.fused_loss: false"])
            self.log("[method] fused loss: the output head and the cross-entropy run together over chunks of "
                     "target rows (no [targets x vocab] logits)")
        if r.training.neftune_alpha is not None:  # (the hook itself is added as the model is built: model.py)
            self.log(f"[method] NEFTune: noise alpha {r.training.neftune_alpha:g} on the input embeddings, training "
                     "forwards only")
        if self.strategy.describe():
            self.log(f"[strategy] {self.strategy.describe()}")
        t = self.t
        self.scheduler = make_scheduler(self.strategy.optimizer, peak_lr=t.learning_rate, warmup=t.warmup_steps,
                                        total=t.max_steps, kind=t.lr_scheduler, min_ratio=t.min_lr_ratio)

    def _reference(self, model_path: Path) -> PrecomputedReference:
        """A full fine-tune's reference policy: the starting weights' log-probs of every pair (reference.py)."""
        r = self.recipe
        key = {"model": str(model_path), "config": self.checkpoints.meta["model_config_sha"], "method": r.method.kind,
               "precision": r.distributed.precision, "attention": self.attn, "data": str(self.data.cache_dir),
               **({"fused_loss": True} if r.training.fused_loss else {})}  # (the unfused key as before: caches stay)
        return PrecomputedReference.load_or_compute(
            self.strategy, train=memory_table(self.data), eval_=self.data.eval, cache_dir=self.data.cache_dir,
            key=key, micro_batch=self.t.micro_batch_size, pad_id=self.data.pad_token_id, log=self.log,
            fused=r.training.fused_loss)

    def _build_data(self) -> None:
        r, topo, s = self.recipe, self.topo, self.state
        self.feed = TrainFeed(r, self.data, self.tok, rank=topo.rank, world_size=topo.world_size,
                              stream_position=s.stream_positions[topo.rank] if s.stream_positions else None,
                              log=self.log)
        cw = self.data.class_weights
        self.class_weights = torch.tensor(cw, device=topo.device) if cw else None
        self.layout = BatchLayout(self.t.micro_batch_size, topo.world_size, self.t.gradient_accumulation_steps)

    def _build_telemetry(self) -> None:
        r, topo, s = self.recipe, self.topo, self.state
        config_text, backend = dump_recipe(r), self.strategy.config_record() if topo.is_main else {}
        for name, cfg in backend.items():  # the backend's own resolved configuration, as it ran
            config_text += f"\n# {name} configuration (resolved)\n" + json.dumps(cfg, indent=2)
        resumed = self.checkpoints.resumed
        self.tracker = Tracker(enabled=topo.is_main, out=self.out, logging_cfg=r.logging, run_id=s.run_id,
                               config={**recipe_to_dict(r), **backend}, config_text=config_text,
                               resumed_at=s.step if resumed else None)
        self.unfreezing = Unfreezing.from_recipe(r, self.strategy, self.tracker, rows=self.feed.num_rows,
                                                 global_batch=self.layout.global_batch, first_step=s.step + 1,
                                                 log=self.log)
        self.model_cfg, self.peak = self.builder.config(), None
        if r.logging.mfu and r.model.task == "causal_lm":
            dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.precision.compute_dtype, "fp32")
            self.peak, source = device_peak(topo.device, dtype) if topo.is_main else (None, "")
            if self.peak:
                self.log(f"[telemetry] MFU against {self.peak / 1e12:.2f} TFLOP/s per device ({source})")
                # What the method computes, read once: gradual unfreezing masks gradients, not requires_grad.
                self.method_flops = method_flops(self.strategy.unwrap(), self.model_cfg,
                                                 recompute=r.distributed.activation_checkpointing)
        hosts = [socket.gethostname()] * topo.world_size  # which machines ran this (a Slurm log rarely says)
        if topo.world_size > 1:
            dist.all_gather_object(hosts, socket.gethostname())
        self.tracker.write({"event": "start", "world_size": topo.world_size, "hosts": hosts,
                            "trainable_params": self.counts.trainable, "total_params": self.counts.total,
                            "global_batch": self.layout.global_batch, "attention": self.attn, "run_id": s.run_id,
                            "step": s.step, **({"resumed_from": str(resumed.path),
                                                "load_seconds": self.checkpoints.load_seconds} if resumed else {})})

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        t, s, rank = self.t, self.state, self.topo.rank
        # From here to the process's exit, a rank without progress for timeout_seconds ends the job (watchdog.py).
        watchdog.watch(self.recipe.distributed.timeout_seconds, rank=rank, model=self.strategy.unwrap())
        if self.checkpoints.resumed is None:
            self._evaluate_before()
        self.progress = Progress(total=t.max_steps, start=s.step, enabled=self.topo.is_main)
        self.losses, first_step, step = [], s.step + 1, s.step
        stopped_early, stop_reason = False, None
        self.strategy.train(True)
        self.checkpoints.restore_rng()
        self.memory = MemoryMeter(self.topo.device)
        with StopSignals(self.recipe.distributed.timeout_seconds, self.topo) as signals:
            for step in range(first_step, t.max_steps + 1):
                watchdog.phase(f"step {step}")
                inject_step_faults(step, rank)
                if self.unfreezing is not None:
                    self.unfreezing.before_step(step, self.progress.write)
                stops = self._step(step, signals)
                saved = False
                if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                    s.last_eval = self.evaluate(step)
                    self.progress.write(f"[eval] step {step}: " + fmt_metrics(s.last_eval))
                    saved = self.keep_best(step, s.last_eval, self.save, self.progress.write)
                    if self.early_stop(step, s.last_eval, self.progress.write):
                        stopped_early = True
                        break
                stop_here = t.stop_after_steps is not None and step - first_step + 1 >= t.stop_after_steps \
                    and step < t.max_steps
                every = self.recipe.checkpoint.every_steps
                if not saved and every and (step % every == 0 or stop_here):
                    self.save(step)
                    saved = True
                if stops:
                    stop_reason = signals.reason()
                    if not saved:
                        self.save(step)
                    self.progress.write(f"[train] stopping after step {step}: {stop_reason} received; checkpoint "
                                        "written. Run the same command with checkpoint.resume: auto to continue")
                    break
                if stop_here:
                    stop_reason = "training.stop_after_steps"
                    self.progress.write(f"[train] stopping after step {step} (training.stop_after_steps "
                                        f"{t.stop_after_steps}); run the same command with checkpoint.resume: auto "
                                        "to continue")
                    break
        self.progress.close()
        if stop_reason is not None:
            return self._stopped(step, stop_reason)
        return self._finish(step, stopped_early)

    def _step(self, step: int, signals: StopSignals) -> float:
        """One optimizer step, logged; whether any rank was asked to stop."""
        t, s, topo = self.t, self.state, self.topo
        self.memory.start_step()  # GPU peaks per step, not since the model was loaded
        compiled_before = compile_seconds() if t.compile else 0.0
        t0 = time.perf_counter()
        micro, useful, indices = self._micro_batches(step)
        loss, n_targets, result, extra = self.objective.step(self.strategy, micro, t.max_grad_norm,
                                                             self.class_weights, indices=indices,
                                                             overflow=faults.active("overflow", step, topo.rank))
        s.samples_seen += self.layout.global_batch
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        dt = time.perf_counter() - t0
        signals.step_took(dt)
        tokens = sum(count_inputs(mb) for mb in micro)  # (images, for an image classifier)
        global_tokens, global_useful, stops = all_reduce_sum([tokens, useful, signals.flag()], topo.device)
        self.losses.append(loss)
        self.skip_guard(step, result)
        if step % t.log_every == 0 or step == t.max_steps:
            record = step_record(step=step, loss=loss, lr=lr, result=result, n_targets=n_targets,
                                 tokens=global_tokens, useful=global_useful, dt=dt, world_size=topo.world_size,
                                 global_batch=self.layout.global_batch, skipped_steps=s.skipped_steps,
                                 memory=self.memory.step())
            record.update(extra)  # a preference objective's rewards, margin and reward accuracy
            if t.compile:  # compile time apart from step time (the first steps compile; later ones should not)
                compiling = compile_seconds() - compiled_before
                record.update(compile_s=compiling, step_time_without_compile=dt - compiling)
                if compiling > 0.5:
                    self.log(f"[compile] step {step}: {compiling:.1f} s of its {dt:.1f} s compiling")
            if self.peak:  # what this method computes (frozen weights get no weight gradients); HFU adds recompute
                seq = tokens / max(1, sum(int(mb["input_ids"].shape[0]) for mb in micro))
                model_flops, hardware_flops = step_flops_per_token(self.model_cfg, seq, self.method_flops)
                record["mfu"] = mfu(model_flops, global_tokens / dt, self.peak, topo.world_size)
                if hardware_flops != model_flops:
                    record["hfu"] = mfu(hardware_flops, global_tokens / dt, self.peak, topo.world_size)
            self.tracker.write(record)
        self.progress.update(step=step, loss=loss, tokens_per_s=global_tokens / dt)
        return stops

    def _micro_batches(self, step: int) -> tuple[list, int, list | None]:
        """This rank's micro-batches of `step`, how many real tokens they hold, and (for a precomputed reference)
        which training pairs each holds."""
        def fetch():
            if self.feed.stream is not None and not self._streamed:
                self._streamed = True
                faults.inject("slow-data", 0, self.topo.rank)
            micro, useful, indices = [], 0, []
            for m in range(self.t.gradient_accumulation_steps):
                # Positions count from the samples consumed so far, so a resume on another number of ranks reads
                # on exactly where the run stopped.
                start, count = self.layout.micro_positions(0, m, self.topo.rank)
                rows, which = self.feed.take(self.state.samples_seen + start, count)
                useful += sum(map(useful_size, rows))  # real tokens: padded or packed, never the padding
                micro.append(collate(rows, self.data.pad_token_id))
                indices.append(which)
            return micro, useful, indices if self.feed.stream is None else None

        if self.feed.stream is None or self.waits is None:
            return fetch()
        # A stream tokenizes as it reads: a slow shard on one rank is waited for on the store as long as the rank
        # is alive, not in the step's first collective, which would time out.
        return self.waits.patient(f"the rows of step {step}", fetch)

    # ------------------------------------------------------------------------------------------------ around it
    def _evaluate_before(self) -> None:
        s = self.state
        s.eval_before = self.evaluate(0)
        if s.eval_before:
            self.log("[eval] before training: " + fmt_metrics(s.eval_before))
        # The evaluation before training is the first "best": a run that only gets worse stops early too.
        s.best_eval_loss = s.eval_before.get("eval_loss", math.inf)
        s.last_eval = s.eval_before

    def save(self, step: int) -> None:
        watchdog.phase(f"the checkpoint of step {step}")
        self.state.step, self.state.scheduler = step, self.scheduler.state_dict()
        info = self.checkpoints.save(self.state, stream_position=self.feed.position,
                                     global_batch=self.layout.global_batch, log=self.progress.write)
        self.tracker.write({"event": "checkpoint", "step": step, **info})

    def _result(self, step: int, eval_after: dict, final: Path | None, stopped_early: bool, **stop) -> TrainResult:
        resumed = self.checkpoints.resumed
        return TrainResult(step, self.losses, self.state.eval_before, eval_after, final, stopped_early,
                           time.perf_counter() - self.t_start, resumed.path if resumed else None, **stop)

    def _stopped(self, step: int, reason: str) -> TrainResult:
        """Stopped with a checkpoint, to be resumed (a signal, or training.stop_after_steps)."""
        mix = {"data_mix_seen": self.feed.seen(self.state.samples_seen)} if self.feed.mixture else {}
        self.tracker.write({"event": "stopped", "step": step, "reason": reason, **mix})
        self.tracker.close()
        self.strategy.close()
        return self._result(step, {}, None, False, stopped_at=step, stop_reason=reason)

    def _finish(self, step: int, stopped_early: bool) -> TrainResult:
        """The evaluation after training, final/ (the best checkpoint's weights where asked), the end record."""
        s, c = self.state, self.recipe.checkpoint
        eval_after = self.evaluate(step) if not (stopped_early and s.last_eval) else s.last_eval
        if eval_after:
            self.log(f"[eval] after {step} steps: " + fmt_metrics(eval_after))
            if not self.keep_best(step, eval_after, self.save, self.progress.write) and c.final == "best" \
                    and s.best_step is not None:
                best = self.checkpoints.load_best()
                eval_after = self.evaluate(best["step"])
                self.log(f"[checkpoint] final/ holds the best checkpoint, step {best['step']} ({best['metric']} "
                         f"{best['value']:.4f}), not the last step: " + fmt_metrics(eval_after))
        watchdog.phase("the final save")
        faults.inject("hang-final-save", step, self.topo.rank)
        peak_before = self.memory.run_peak()
        final = self.checkpoints.save_final()
        if self.checkpoints.final_save is not None:  # rank 0, which gathers: its peak before and after the save
            self.tracker.write({"event": "final_save", "step": step, **self.checkpoints.final_save,
                                "peak_memory_mb_before": round(peak_before, 1),
                                "peak_memory_mb_after": round(self.memory.run_peak(), 1)})
        seconds = time.perf_counter() - self.t_start
        peaks = [None] * self.topo.world_size
        dist.all_gather_object(peaks, round(self.memory.run_peak(), 1))
        self.log(f"[dist_ft] peak memory per rank (MiB): {peaks}")
        mix = self.feed.seen(s.samples_seen)
        if mix:
            self.log("[data] mixture seen: " + ", ".join(f"{n} {v:.1%}" for n, v in mix.items()))
        self.tracker.write({"event": "end", "step": step, "seconds": seconds, "peak_memory_mb": peaks,
                            "skipped_steps": s.skipped_steps, **({"data_mix_seen": mix} if mix else {})})
        self.tracker.close()
        self.strategy.close()
        return self._result(step, eval_after, final, stopped_early)
