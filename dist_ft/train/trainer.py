"""The training loop. It names no backend: the strategy builds, shards, steps and gathers.

Order of work (cheap and checkable first): validate the recipe and everything it points at; load the tokenizer;
tokenize (cached) before any process group exists; start the process group; build the model through the
strategy; evaluate, train, evaluate; save `final/`.

    python -m dist_ft train configs/demo.yaml training.max_steps=10
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import store as ckpt
from .. import faults, safe_load
from ..assets import resolve_model_path
from ..config import Recipe, RecipeError, dump_recipe, recipe_to_dict
from ..data.batching import BatchLayout, collate, count_targets
from ..data.feed import TrainFeed
from ..data.dataset import forgetting_examples, prepare_data
from ..distributed.launchers import launcher_problems
from ..distributed.precision import precision_plan
from ..distributed.spec import make_strategy
from ..distributed.strategy import Strategy
from ..distributed import watchdog
from ..distributed.topology import Topology, init_distributed, shutdown
from .evaluation import RunEvaluator
from .scores import better
from .loss import forward_logits, loss_sum
from ..methods import UnfreezeSchedule
from ..model import LazyTokenizer, ModelBuilder, count_parameters, resolve_attention
from ..preflight import preflight
from .schedule import make_scheduler
from ..preflight import LAUNCHER_FILES
from ..signals import StopRequest
from ..telemetry.flops import device_peak, flops_per_token, mfu
from ..telemetry.progress import MemoryMeter, Progress
from ..telemetry.tracker import Telemetry


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


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_step(strategy: Strategy, micro_batches: list[dict[str, torch.Tensor]], max_grad_norm: float | None,
               class_weights: torch.Tensor | None = None, *, overflow: bool = False):
    """One optimizer step over this rank's micro-batches.

    The loss is normalised by the number of target tokens in the whole global batch (all micro-steps, all ranks),
    so every token weighs the same however the batch is split. Backends average gradients over ranks, so each
    rank's sum is scaled by world_size / global_targets. Gradients are synchronised on the last micro-step only.
    `overflow` (fault injection, tests) makes this rank's gradients non-finite, as an fp16 overflow does.
    """
    topo = strategy.topo
    local_targets = sum(count_targets(mb) for mb in micro_batches)
    (global_targets,) = _all_reduce_sum([local_targets], topo.device)
    scale = topo.world_size / max(global_targets, 1.0) * (math.inf if overflow else 1.0)
    local_loss = 0.0
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(topo.device, non_blocking=True) for k, v in mb.items()}
        with strategy.sync_context(sync=i == len(micro_batches) - 1):
            with strategy.forward_context():
                logits, targets = forward_logits(strategy.model, mb)
            # The gradient is written over the logits: they are not read again.
            total = loss_sum(logits, targets, class_weights, reuse_logits=True)
            del logits
            strategy.backward(total * scale)
        local_loss += float(total.detach())
    result = strategy.step(max_grad_norm)
    (loss_total,) = _all_reduce_sum([local_loss], topo.device)
    return loss_total / max(global_targets, 1.0), int(global_targets), result


def _make_optimizer(recipe: Recipe):
    t = recipe.training

    def make(params):
        params = list(params)
        # Decoupled weight decay on matrices only: biases and norm scales are not decayed.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if t.optimizer == "adamw_8bit":
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                       eps=t.adam_eps)
        # Fused: one pass over each tensor, where the default (on CPU) makes a parameter-sized temporary per tensor
        # (sqrt of the second moment) and runs several passes. That temporary is the size of a whole ZeRO-3
        # partition, which DeepSpeed steps as one flat tensor, and fused is faster on CPU and GPU alike.
        fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                 fused=fused or None)

    return make


def _prepare_output(recipe: Recipe, topo: Topology) -> Path:
    out = Path(recipe.output_dir)
    if topo.is_main:
        # (preflight refuses overwrite_output_dir together with checkpoint.resume: checkpoints are never wiped)
        if recipe.overwrite_output_dir and out.is_dir():
            for child in out.iterdir():
                if child.name in LAUNCHER_FILES:  # the running batch script and its log
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    return out


def _log(topo: Topology | None, msg: str) -> None:
    if topo is None or topo.is_main:
        print(msg, flush=True)


def run_training(recipe: Recipe, *, source: str = "recipe") -> TrainResult:
    t_start = time.perf_counter()
    rank_env = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    quiet = rank_env != 0
    # 1. Everything that can be wrong with the recipe, its files and this machine, before any real work.
    preflight(recipe, source=source)
    conflicts = launcher_problems(recipe)
    if conflicts:
        raise RecipeError(conflicts, source)
    model_path = resolve_model_path(recipe.model.path)
    # Loaded when first used: a run whose tokens come from the cache never needs it in memory.
    tok = LazyTokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
    # 2. Tokenize before the process group exists: no collective can time out while one rank tokenizes.
    data = prepare_data(recipe, tok, log=(lambda m: None) if quiet else print)
    forgetting = forgetting_examples(recipe, tok) if recipe.eval.forgetting else []
    # 3. Processes and devices.
    topo = init_distributed(timeout_seconds=recipe.distributed.timeout_seconds,
                            threads_per_process=recipe.distributed.threads_per_process)
    try:
        return _train(recipe, topo, tok, data, model_path, t_start, forgetting)
    finally:
        # The run is over (a peer may be gone already): tearing down takes seconds, so a stuck teardown ends sooner.
        watchdog.phase("the process group's shutdown", limit=watchdog.TEARDOWN_S, note=sys.exc_info()[1])
        shutdown()
        watchdog.phase("the exit", limit=watchdog.TEARDOWN_S, note=sys.exc_info()[1])
        faults.inject("hang-exit", 0, topo.rank)


def _train(recipe: Recipe, topo: Topology, tok, data, model_path: Path, t_start: float,
           forgetting: list) -> TrainResult:
    t = recipe.training
    _log(topo, f"[dist_ft] {topo.describe()}; world size {topo.world_size}")
    if topo.world_size > 1 and not topo.is_main:
        print(f"[dist_ft] {topo.describe()}", flush=True)
    out = _prepare_output(recipe, topo)
    dist.barrier()
    seed_everything(recipe.seed)
    precision = precision_plan(recipe.distributed.precision)
    attn, why = resolve_attention(recipe.model.attn_implementation, precision=recipe.distributed.precision)
    _log(topo, f"[dist_ft] attention: {attn} ({why}); precision {precision.name}; strategy "
               f"{recipe.distributed.strategy}; method {recipe.method.kind}")

    builder = ModelBuilder(recipe, model_path, num_labels=data.num_labels, label_names=data.label_names,
                           pad_token_id=data.pad_token_id, dtype=precision.param_dtype, attn_implementation=attn)

    strategy = make_strategy(recipe.distributed.strategy, topo=topo, precision=precision,
                             activation_checkpointing=recipe.distributed.activation_checkpointing, recipe=recipe)
    meta = {"strategy": strategy.name, "state_format": strategy.state_format, "method": recipe.method.kind,
            "model_path": str(model_path), "model_config_sha": ckpt.config_sha(model_path),
            "precision": recipe.distributed.precision}
    # Which checkpoint (if any) this run continues from: chosen and verified before the model is built.
    resume = _find_resume(recipe, topo, meta) if recipe.checkpoint.resume is not None else None
    if resume is not None:
        safe_load.allow(recipe.checkpoint.allow_pickle)
        os.environ["DIST_FT_ALLOW_PICKLE"] = os.pathsep.join(recipe.checkpoint.allow_pickle)  # for converters
        strategy.prepare_resume(resume.path / "state", resume.manifest)
    strategy.setup(builder, _make_optimizer(recipe))
    counts = count_parameters(strategy.unwrap())
    _log(topo, f"[weights] {builder.load_report.describe()}")
    _log(topo, f"[dist_ft] {counts.describe()}")
    if strategy.describe():
        _log(topo, f"[strategy] {strategy.describe()}")
    scheduler = make_scheduler(strategy.optimizer, peak_lr=t.learning_rate, warmup=t.warmup_steps, total=t.max_steps,
                               kind=t.lr_scheduler, min_ratio=t.min_lr_ratio)
    state = ckpt.TrainerState(model_build={"num_labels": data.num_labels, "label_names": data.label_names})
    load_seconds = None
    if resume is not None:
        t_load = time.perf_counter()
        state = _load_resume(resume, strategy, scheduler, topo)
        load_seconds = round(time.perf_counter() - t_load, 3)
        _log(topo, f"[checkpoint] loaded step {state.step} in {load_seconds:.1f} s; continuing at sample "
                   f"{state.samples_seen:,}")

    if recipe.data.streaming and resume is not None and len(state.stream_positions) != topo.world_size:
        raise ckpt.CheckpointError(f"{resume.path}: a streamed run resumes on the number of ranks that wrote it "
                                   f"({len(state.stream_positions)}), each reading its own shards; this run has "
                                   f"{topo.world_size}")
    feed = TrainFeed(recipe, data, tok, rank=topo.rank, world_size=topo.world_size,
                     stream_position=state.stream_positions[topo.rank] if state.stream_positions else None,
                     log=lambda m: _log(topo, m))
    class_weights = torch.tensor(data.class_weights, device=topo.device) if data.class_weights else None
    layout = BatchLayout(t.micro_batch_size, topo.world_size, t.gradient_accumulation_steps)
    unfreeze = None
    pc = recipe.method.partial
    if recipe.method.kind == "partial" and (pc.unfreeze_every_steps or pc.unfreeze_every_epochs):
        unfreeze = UnfreezeSchedule(strategy.unwrap(), recipe,
                                    steps_per_epoch=math.ceil((feed.num_rows or 1) / layout.global_batch))
        _log(topo, f"[method] gradual unfreezing: {unfreeze.open_blocks(1)} of {unfreeze.n_blocks} blocks open at "
                   f"step 1, one more every {unfreeze.every} steps, down to block {pc.unfreeze_floor}")
    pad_id = data.pad_token_id
    if resume is not None and topo.is_main:
        _truncate_metrics(out / "metrics.jsonl", state.step)
    config_text = dump_recipe(recipe)
    ds_json = out / "deepspeed_config.json"
    wandb_config = {**recipe_to_dict(recipe),
                    **({"deepspeed": json.loads(ds_json.read_text())} if ds_json.is_file() and topo.is_main else {})}
    if "deepspeed" in wandb_config:
        config_text += "\n# deepspeed_config.json (resolved)\n" + json.dumps(wandb_config["deepspeed"], indent=2)
    metrics = Telemetry(enabled=topo.is_main, out=out, logging_cfg=recipe.logging, run_id=state.run_id,
                        config=wandb_config, config_text=config_text)
    model_cfg, peak = builder.config(), None
    if recipe.logging.mfu and recipe.model.task == "causal_lm":
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision.compute_dtype, "fp32")
        peak, peak_source = device_peak(topo.device, dtype) if topo.is_main else (None, "")
        if peak:
            _log(topo, f"[telemetry] MFU against {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
    hosts = [socket.gethostname()] * topo.world_size  # which machines ran this (a Slurm log rarely says)
    if topo.world_size > 1:
        dist.all_gather_object(hosts, socket.gethostname())
    metrics.write({"event": "start", "world_size": topo.world_size, "hosts": hosts, "trainable_params": counts.trainable,
                   "total_params": counts.total, "global_batch": layout.global_batch, "attention": attn,
                   "run_id": state.run_id, "step": state.step,
                   **({"resumed_from": str(resume.path), "load_seconds": load_seconds} if resume else {})})

    evaluator = RunEvaluator(recipe, strategy, data, tok, forgetting)

    def run_eval(step: int) -> dict:
        watchdog.phase(f"the evaluation at step {step}")
        res, answers = evaluator(state.eval_before or None)
        if res:
            metrics.write({"step": step, **res})
        if answers and topo.is_main:
            # Every generated answer next to its reference: what the scores are made of.
            folder = out / "generations"
            folder.mkdir(exist_ok=True)
            (folder / f"step-{step:08d}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
            _log(topo, f"[eval] generated {len(answers)} answers ({folder}), e.g. {answers[0]['answer'][:100]!r} "
                       f"for {answers[0]['reference'][:100]!r}")
        return res

    # From here to the process's exit, a rank without progress for timeout_seconds ends the job (watchdog.py).
    watchdog.watch(recipe.distributed.timeout_seconds, rank=topo.rank, model=strategy.unwrap())
    if resume is None:
        eval_before = run_eval(0)
        if eval_before:
            _log(topo, "[eval] before training: " + _fmt_metrics(eval_before))
        # The evaluation before training is the first "best": a run that only gets worse stops early too.
        state.eval_before = eval_before
        state.best_eval_loss = eval_before.get("eval_loss", math.inf)
        state.last_eval = eval_before
    eval_before = state.eval_before
    progress = Progress(total=t.max_steps, start=state.step, enabled=topo.is_main)
    losses: list[float] = []
    stopped_early, stopped_at, stop_reason = False, None, "training.stop_after_steps"
    skipped_in_a_row = 0
    first_step = state.step + 1
    strategy.train(True)
    step = state.step

    def save(step: int) -> None:
        watchdog.phase(f"the checkpoint of step {step}")
        state.step, state.scheduler = step, scheduler.state_dict()
        if feed.position is not None:  # a stream's place on every rank (each reads its own shards)
            positions = [feed.position] * topo.world_size
            if topo.world_size > 1:
                dist.all_gather_object(positions, feed.position)
            state.stream_positions = positions
        state.strategy_extra = strategy.extra_state()
        info = ckpt.save_checkpoint(root=ckpt.checkpoints_root(out), strategy=strategy, trainer_state=state,
                                    recipe_yaml=dump_recipe(recipe), tokenizer=tok, topo=topo,
                                    meta={**meta, "global_batch": layout.global_batch},
                                    keep_last=recipe.checkpoint.keep_last, log=progress.write)
        metrics.write({"event": "checkpoint", "step": step, **info})

    def keep_if_best(step: int, result: dict) -> bool:
        """checkpoint.keep_best: a checkpoint of this step if `result` is the best so far; whether it wrote one."""
        c = recipe.checkpoint
        if c.keep_best is None or c.keep_best not in result:
            return False
        if not better(c.keep_best, c.best_mode, result[c.keep_best], state.best_value):
            return False
        state.best_value, state.best_step = result[c.keep_best], step
        save(step)
        if topo.is_main:
            ckpt.mark_best(ckpt.checkpoints_root(out), step, c.keep_best, result[c.keep_best])
        dist.barrier()
        progress.write(f"[checkpoint] step {step} is the best so far ({c.keep_best} {result[c.keep_best]:.4f})")
        return True

    if resume is not None:
        _restore_rng(resume, topo)
    memory = MemoryMeter(topo.device)
    with StopRequest(deadline=recipe.distributed.timeout_seconds) as stop_request:
        for step in range(first_step, t.max_steps + 1):
            watchdog.phase(f"step {step}")
            faults.inject("hang", step, topo.rank)
            faults.inject("crash", step, topo.rank)
            faults.inject("kill", step, topo.rank)
            faults.inject("signal", step, topo.rank)
            faults.inject("slow", step, topo.rank)
            memory.start_step()  # GPU peaks per step, not since the model was loaded
            t0 = time.perf_counter()
            if unfreeze is not None:
                strategy.grad_mask = unfreeze.frozen_params(step)
                if step == first_step or unfreeze.open_blocks(step) != unfreeze.open_blocks(step - 1):
                    metrics.write({"event": "unfreeze", "step": step, "open_blocks": unfreeze.open_blocks(step)})
                    if step != first_step:
                        progress.write(f"[method] step {step}: {unfreeze.open_blocks(step)} of {unfreeze.n_blocks} "
                                       "blocks open")
            micro, useful = [], 0
            for m in range(t.gradient_accumulation_steps):
                # Positions count from the samples consumed so far, so a resume on another number of ranks reads on
                # exactly where the run stopped.
                start, count = layout.micro_positions(0, m, topo.rank)
                rows = feed.rows(state.samples_seen + start, count)
                useful += sum(len(r.input_ids) for r in rows)  # real tokens: padded or packed, never the padding
                micro.append(collate(rows, pad_id))
            loss, n_targets, result = train_step(strategy, micro, t.max_grad_norm, class_weights,
                                                 overflow=faults.active("overflow", step, topo.rank))
            state.samples_seen += layout.global_batch
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            dt = time.perf_counter() - t0
            # A rank still short of its step's end this long after a signal is stuck (see signals.py).
            stop_request.deadline = max(recipe.distributed.timeout_seconds, 3 * dt)
            tokens = sum(int(mb["input_ids"].numel()) for mb in micro)
            # The stop request rides on an all-reduce every step runs anyway: all ranks see it at the same step.
            global_tokens, global_useful, stops = _all_reduce_sum([tokens, useful, float(stop_request.requested)],
                                                                  topo.device)
            losses.append(loss)
            if result.skipped:
                skipped_in_a_row += 1
                state.skipped_steps += 1
                scale = "" if result.loss_scale is None else f"; loss scale lowered to {result.loss_scale:g}"
                _log(topo, f"[train] step {step}: non-finite gradient norm, update skipped ({state.skipped_steps} "
                           f"skipped so far{scale})")
                # A loss scaler skips steps while it finds its level: only one already at its floor is stuck.
                if skipped_in_a_row >= 5 and (result.loss_scale is None or result.loss_scale <= 1.0):
                    raise FloatingPointError("5 steps in a row had non-finite gradients; lower training.learning_rate "
                                             "or use distributed.precision: fp32/bf16-mixed")
            else:
                skipped_in_a_row = 0
            if step % t.log_every == 0 or step == t.max_steps:
                record = {"step": step, "loss": loss, "lr": lr, "grad_norm": result.grad_norm, "targets": n_targets,
                          "tokens": int(global_tokens), "useful_tokens": int(global_useful), "step_time": dt,
                          "tokens_per_s": global_tokens / dt, "useful_tokens_per_s": global_useful / dt,
                          "tokens_per_s_per_device": global_tokens / dt / topo.world_size,
                          "samples_per_s": layout.global_batch / dt, "skipped": result.skipped,
                          "skipped_steps": state.skipped_steps, **memory.step()}
                if result.loss_scale is not None:
                    record["loss_scale"] = result.loss_scale
                if peak:
                    seq = tokens / max(1, sum(int(mb["input_ids"].shape[0]) for mb in micro))
                    record["mfu"] = mfu(flops_per_token(model_cfg, seq), global_tokens / dt, peak,
                                        topo.world_size)
                metrics.write(record)
            progress.update(step=step, loss=loss, tokens_per_s=global_tokens / dt)
            saved = False
            if t.eval_every and step % t.eval_every == 0 and step != t.max_steps:
                state.last_eval = run_eval(step)
                progress.write(f"[eval] step {step}: " + _fmt_metrics(state.last_eval))
                saved = keep_if_best(step, state.last_eval)
                best = state.best_eval_loss if state.best_eval_loss is not None else math.inf
                if state.last_eval["eval_loss"] < best - 1e-12:
                    state.best_eval_loss, state.bad_evals = state.last_eval["eval_loss"], 0
                else:
                    state.bad_evals += 1
                    if t.early_stopping_patience and state.bad_evals >= t.early_stopping_patience:
                        progress.write(f"[train] early stop at step {step}: eval_loss did not improve for "
                                       f"{state.bad_evals} evaluations (best {best:.4f})")
                        stopped_early = True
                        break
            stop_here = t.stop_after_steps is not None and step - first_step + 1 >= t.stop_after_steps \
                and step < t.max_steps
            if not saved and recipe.checkpoint.every_steps and (step % recipe.checkpoint.every_steps == 0 or stop_here):
                save(step)
                saved = True
            if stops:
                stop_request.acknowledge()
                # Name the signal even on ranks that did not get it (the highest number, where they differ).
                sig = torch.tensor([stop_request.signum or 0], device=topo.device)
                if topo.world_size > 1:
                    dist.all_reduce(sig, op=dist.ReduceOp.MAX)
                stop_reason = StopRequest.name_of(int(sig.item()))
                if not saved:
                    save(step)
                stopped_at = step
                progress.write(f"[train] stopping after step {step}: {stop_reason} received; checkpoint written. "
                               "Run the same command with checkpoint.resume: auto to continue")
                break
            if stop_here:
                stopped_at = step
                progress.write(f"[train] stopping after step {step} (training.stop_after_steps "
                               f"{t.stop_after_steps}); run the same command with checkpoint.resume: auto to continue")
                break
    progress.close()
    if stopped_at is not None:
        metrics.write({"event": "stopped", "step": step, "reason": stop_reason,
                       **({"data_mix_seen": feed.seen(state.samples_seen)} if feed.mixture else {})})
        metrics.close()
        strategy.close()
        return TrainResult(step, losses, eval_before, {}, None, False, time.perf_counter() - t_start,
                           resume.path if resume else None, stopped_at, stop_reason)
    last_eval = state.last_eval
    eval_after = run_eval(step) if not (stopped_early and last_eval) else last_eval
    if eval_after:
        _log(topo, f"[eval] after {step} steps: " + _fmt_metrics(eval_after))
        if not keep_if_best(step, eval_after) and recipe.checkpoint.final == "best" and state.best_step is not None:
            eval_after = _load_best(strategy, ckpt.checkpoints_root(out), topo, run_eval)
    watchdog.phase("the final save")
    faults.inject("hang-final-save", step, topo.rank)
    final = _save_final(strategy, tok, out / "final", topo)
    seconds = time.perf_counter() - t_start
    peaks = [None] * topo.world_size
    dist.all_gather_object(peaks, round(memory.run_peak(), 1))
    _log(topo, f"[dist_ft] peak memory per rank (MiB): {peaks}")
    mix = feed.seen(state.samples_seen)
    if mix:
        _log(topo, "[data] mixture seen: " + ", ".join(f"{n} {v:.1%}" for n, v in mix.items()))
    metrics.write({"event": "end", "step": step, "seconds": seconds, "peak_memory_mb": peaks,
                   "skipped_steps": state.skipped_steps,
                   **({"data_mix_seen": mix} if mix else {})})
    metrics.close()
    strategy.close()
    return TrainResult(step, losses, eval_before, eval_after, final, stopped_early, seconds,
                       resume.path if resume else None)


def _find_resume(recipe: Recipe, topo: Topology, meta: dict) -> ckpt.Candidate | None:
    """The verified checkpoint to continue from. Explicit paths fail loudly; `auto` skips damaged checkpoints with
    a warning naming the file, and starts fresh (saying so) only when there is no complete one at all."""
    log = (lambda m: _log(topo, m))
    explicit = recipe.checkpoint.resume != "auto"
    box = [None]
    if topo.is_main:
        try:
            if explicit:
                box[0] = [ckpt.choose_resume(recipe.checkpoint.resume, recipe.output_dir, log)]
            else:
                complete, incomplete = ckpt.list_checkpoints(ckpt.checkpoints_root(recipe.output_dir))
                for c in incomplete:
                    log(f"[checkpoint] warning: skipping {c.problem}")
                box[0] = complete
        except ckpt.CheckpointError as exc:
            box[0] = str(exc)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ckpt.CheckpointError(box[0])
    for cand in box[0]:
        problems = ckpt.compatibility_problems(cand.manifest, meta)
        if problems:
            raise ckpt.CheckpointError(f"{cand.path} cannot continue under this recipe:\n  - " + "\n  - ".join(problems))
        if recipe.checkpoint.verify == "sha256":
            problems = ckpt.checksum_problems(cand.path, cand.manifest, topo.rank, topo.world_size)
        if not problems:
            _log(topo, f"[checkpoint] resuming from {cand.path} (step {cand.step}, written by "
                       f"{cand.manifest['world_size']} x {cand.manifest['strategy']})")
            return cand
        if explicit:
            raise ckpt.CheckpointError("; ".join(problems))
        log(f"[checkpoint] warning: skipping {cand.path}: " + "; ".join(problems))
    _log(topo, f"[checkpoint] no complete checkpoint in {ckpt.checkpoints_root(recipe.output_dir)}: starting from "
               f"the base model {meta['model_path']}")
    return None


def _load_resume(cand: ckpt.Candidate, strategy: Strategy, scheduler, topo: Topology) -> ckpt.TrainerState:
    folder = cand.path
    try:
        strategy.load_state(folder / "state", cand.manifest)
    except ckpt.CheckpointError:
        raise
    except Exception as exc:  # the backend's own error, with the folder that caused it
        raise ckpt.CheckpointError(f"{folder / 'state'}: could not be loaded: {type(exc).__name__}: {exc}") from exc
    state = ckpt.TrainerState.from_dict(json.loads((folder / "trainer_state.json").read_text()))
    scheduler.load_state_dict(state.scheduler)
    strategy.load_extra_state(state.strategy_extra)
    return state


def _restore_rng(cand: ckpt.Candidate, topo: Topology) -> None:
    """Each rank continues its own random streams; on a different number of ranks, new ranks take rank 0's.

    Called right before the first step: anything between the load and the loop that draws random numbers (a
    measured matmul, a library's init) would otherwise shift every dropout mask after a resume.
    """
    rng = cand.path / "rng" / f"rank-{topo.rank}.json"
    ckpt.set_rng_state(json.loads((rng if rng.is_file() else cand.path / "rng" / "rank-0.json").read_text()))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop what the interrupted run logged after its checkpoint: the resumed run logs those steps again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut off by the crash
        if rec.get("step", 0) <= step and rec.get("event") != "end":
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def _load_best(strategy: Strategy, root: Path, topo: Topology, run_eval) -> dict:
    """checkpoint.final: best: the weights of the keep_best checkpoint, evaluated again (what final/ will hold)."""
    best = ckpt.best_checkpoint(root)
    folder = ckpt.step_dir(root, best["step"])
    strategy.load_state(folder / "state", ckpt.read_manifest(folder))
    result = run_eval(best["step"])
    _log(topo, f"[checkpoint] final/ holds the best checkpoint, step {best['step']} ({best['metric']} "
               f"{best['value']:.4f}), not the last step: " + _fmt_metrics(result))
    return result


def _fmt_metrics(m: dict) -> str:
    """The scalar metrics on one line (per-class F1 and the confusion matrix go to metrics.jsonl only)."""
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in m.items() if isinstance(v, (int, float)))


def _save_final(strategy: Strategy, tok, final: Path, topo: Topology) -> Path | None:
    """A folder `from_pretrained` loads (or a PEFT adapter folder), written atomically by rank 0."""
    model = strategy.unwrap()
    is_peft = hasattr(model, "peft_config")
    state = strategy.full_state_dict()  # a collective: every rank calls it
    if topo.is_main:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _log(topo, f"[dist_ft] saved {'adapter' if is_peft else 'model'} to {final}")
    dist.barrier()
    return final
