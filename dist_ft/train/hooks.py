"""What happens around a training step, one small named piece each: evaluation, keep-best, early stopping, gradual
unfreezing, the guard against non-finite steps, stop signals and fault injection (tests). The Trainer's loop calls
them by name; each holds only the state it needs."""

from __future__ import annotations

import json
import math
import time

import torch
import torch.distributed as dist

from .. import faults
from ..checkpoint.store import TrainerState
from ..distributed import watchdog
from ..methods import UnfreezeSchedule
from ..signals import StopRequest
from .scores import better

STEP_FAULTS = ("hang", "crash", "kill", "signal", "slow")


def inject_step_faults(step: int, rank: int) -> None:
    """Fault injection before a step (faults.py; tests only): one environment lookup when unset."""
    for point in STEP_FAULTS:
        faults.inject(point, step, rank)


def fmt_metrics(m: dict) -> str:
    """The scalar metrics on one line (per-class F1 and the confusion matrix go to metrics.jsonl only)."""
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in m.items() if isinstance(v, (int, float)))


class Evaluation:
    """An evaluation at a step: scores to the tracker; generated answers, each next to its reference, beside them
    (what the scores are made of)."""

    def __init__(self, evaluator, tracker, *, out, topo, state: TrainerState, log):
        self.evaluator, self.tracker, self.out, self.topo, self.state, self.log = \
            evaluator, tracker, out, topo, state, log

    def __call__(self, step: int) -> dict:
        watchdog.phase(f"the evaluation at step {step}")
        res, answers = self.evaluator(self.state.eval_before or None)
        if res:
            self.tracker.write({"step": step, **res})
        if answers and self.topo.is_main:
            folder = self.out / "generations"
            folder.mkdir(exist_ok=True)
            (folder / f"step-{step:08d}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
            self.log(f"[eval] generated {len(answers)} answers ({folder}), e.g. {answers[0]['answer'][:100]!r} "
                     f"for {answers[0]['reference'][:100]!r}")
        return res


class KeepBest:
    """checkpoint.keep_best: a checkpoint of any step whose evaluation is the best so far."""

    def __init__(self, cfg, checkpoints, state: TrainerState):
        self.metric, self.mode, self.checkpoints, self.state = cfg.keep_best, cfg.best_mode, checkpoints, state

    def __call__(self, step: int, result: dict, save, write) -> bool:
        """Whether it wrote a checkpoint of `step` (through `save(step)`)."""
        if self.metric is None or self.metric not in result:
            return False
        if not better(self.metric, self.mode, result[self.metric], self.state.best_value):
            return False
        self.state.best_value, self.state.best_step = result[self.metric], step
        save(step)
        self.checkpoints.mark_best(step, self.metric, result[self.metric])
        write(f"[checkpoint] step {step} is the best so far ({self.metric} {result[self.metric]:.4f})")
        return True


class EarlyStop:
    """training.early_stopping_patience: stop after that many evaluations without a lower eval_loss. The evaluation
    before training is the first "best": a run that only gets worse stops early too."""

    def __init__(self, patience: int | None, state: TrainerState):
        self.patience, self.state = patience, state

    def __call__(self, step: int, result: dict, write) -> bool:
        s = self.state
        best = s.best_eval_loss if s.best_eval_loss is not None else math.inf
        if result["eval_loss"] < best - 1e-12:
            s.best_eval_loss, s.bad_evals = result["eval_loss"], 0
            return False
        s.bad_evals += 1
        if self.patience and s.bad_evals >= self.patience:
            write(f"[train] early stop at step {step}: eval_loss did not improve for {s.bad_evals} evaluations "
                  f"(best {best:.4f})")
            return True
        return False


class Unfreezing:
    """method.partial.unfreeze_every_*: blocks open from the top down as training goes on; the strategy drops the
    gradients of those still closed."""

    def __init__(self, schedule: UnfreezeSchedule, strategy, tracker, first_step: int):
        self.schedule, self.strategy, self.tracker, self.first_step = schedule, strategy, tracker, first_step

    @classmethod
    def from_recipe(cls, recipe, strategy, tracker, *, rows: int, global_batch: int, first_step: int, log):
        pc = recipe.method.partial
        if recipe.method.kind != "partial" or not (pc.unfreeze_every_steps or pc.unfreeze_every_epochs):
            return None
        schedule = UnfreezeSchedule(strategy.unwrap(), recipe, steps_per_epoch=math.ceil((rows or 1) / global_batch))
        log(f"[method] gradual unfreezing: {schedule.open_blocks(1)} of {schedule.n_blocks} blocks open at step 1, "
            f"one more every {schedule.every} steps, down to block {pc.unfreeze_floor}")
        return cls(schedule, strategy, tracker, first_step)

    def before_step(self, step: int, write) -> None:
        u = self.schedule
        self.strategy.grad_mask = u.frozen_params(step)
        if step == self.first_step or u.open_blocks(step) != u.open_blocks(step - 1):
            self.tracker.write({"event": "unfreeze", "step": step, "open_blocks": u.open_blocks(step)})
            if step != self.first_step:
                write(f"[method] step {step}: {u.open_blocks(step)} of {u.n_blocks} blocks open")


class NonFiniteGuard:
    """A step with a non-finite gradient norm made no update: count it, say so, and stop a run that is stuck."""

    def __init__(self, state: TrainerState, log):
        self.state, self.log, self.in_a_row = state, log, 0

    def __call__(self, step: int, result) -> None:
        if not result.skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.state.skipped_steps += 1
        scale = "" if result.loss_scale is None else f"; loss scale lowered to {result.loss_scale:g}"
        self.log(f"[train] step {step}: non-finite gradient norm, update skipped ({self.state.skipped_steps} "
                 f"skipped so far{scale})")
        # A loss scaler skips steps while it finds its level: only one already at its floor is stuck.
        if self.in_a_row >= 5 and (result.loss_scale is None or result.loss_scale <= 1.0):
            raise FloatingPointError("5 steps in a row had non-finite gradients; lower training.learning_rate or "
                                     "use distributed.precision: fp32/bf16-mixed")


class StopSignals:
    """SIGTERM/SIGINT/SIGUSR1 (a pre-emption, a Slurm time limit) end the run at a step boundary with a
    checkpoint. The request rides on an all-reduce every step runs anyway, so all ranks stop at the same step."""

    def __init__(self, timeout_seconds: float, topo):
        self.timeout, self.topo = timeout_seconds, topo
        self.request = StopRequest(deadline=timeout_seconds)

    def __enter__(self) -> "StopSignals":
        self.request.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.request.__exit__(*exc)

    def flag(self) -> float:
        return float(self.request.requested)

    def step_took(self, seconds: float) -> None:
        # A rank still short of its step's end this long after a signal is stuck (see signals.py).
        self.request.deadline = max(self.timeout, 3 * seconds)

    def reason(self) -> str:
        """Acknowledge the request; the signal's name, the same on every rank (the highest number where they
        differ, so ranks that got none name it too)."""
        self.request.acknowledge()
        sig = torch.tensor([self.request.signum or 0], device=self.topo.device)
        if self.topo.world_size > 1:
            dist.all_reduce(sig, op=dist.ReduceOp.MAX)
        return StopRequest.name_of(int(sig.item()))


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
