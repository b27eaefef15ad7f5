"""Where records go: metrics.jsonl always, Weights & Biases and TensorBoard when the recipe asks. Rank 0 only.

A sink that fails (W&B unreachable, a full disk under TensorBoard) is switched off with one warning: telemetry
never stops training. The W&B key is read by wandb from the environment and never passed, logged or written by
dist_ft; the offline files go into the run directory (wandb would otherwise write into the working directory).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .progress import MetricsFile


def _warn(msg: str) -> None:
    print(f"[telemetry] warning: {msg}", file=sys.stderr, flush=True)


def wandb_mode(requested: str) -> tuple[str, str | None]:
    """(mode, note): online without a key (or with WANDB_MODE=offline) becomes offline, and says so."""
    if requested == "disabled":
        return "disabled", None
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return os.environ["WANDB_MODE"], f"WANDB_MODE={os.environ['WANDB_MODE']} in the environment"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path(os.path.expanduser("~/.netrc")).is_file() and \
        "api.wandb.ai" in Path(os.path.expanduser("~/.netrc")).read_text(errors="ignore")
    if requested == "online" and not has_key:
        return "offline", "no W&B key (WANDB_API_KEY) here: logging offline; upload later with `wandb sync`"
    return requested, None


class _Wandb:
    def __init__(self, cfg, *, out: Path, run_id: str, config: dict):
        import wandb

        mode, note = wandb_mode(cfg.mode)
        if note:
            print(f"[telemetry] W&B: {note}", flush=True)
        group = cfg.group or os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
        os.environ.setdefault("WANDB_DIR", str(out))  # accelerate-style launchers ignore dir= otherwise
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or out.name, tags=cfg.tags,
                              group=group, id=run_id, resume="allow", dir=str(out), mode=mode, config=config,
                              settings=wandb.Settings(init_timeout=60, console="off", silent=True))
        self.where = getattr(self.run, "dir", out)

    def log(self, record: dict) -> None:
        step = record.get("step")
        data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class _TensorBoard:
    def __init__(self, out: Path, config_text: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("recipe", "```\n" + config_text + "\n```", 0)

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                self.writer.add_scalar(("eval/" if k.startswith("eval_") else "train/") + k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Tracker:
    """metrics.jsonl plus the optional sinks; a no-op on ranks other than 0.

    `resumed_at`: the step a resumed run continues after. What the interrupted run logged later is dropped from
    metrics.jsonl first: the resumed run logs those steps again."""

    def __init__(self, *, enabled: bool, out: Path, logging_cfg=None, run_id: str = "", config: dict | None = None,
                 config_text: str = "", resumed_at: int | None = None):
        if enabled and resumed_at is not None:
            rewind(out / "metrics.jsonl", resumed_at)
        self.metrics = MetricsFile(out / "metrics.jsonl" if enabled else None)
        self.sinks: dict[str, object] = {}
        if not enabled or logging_cfg is None:
            return
        if logging_cfg.wandb.mode != "disabled":
            self._start("wandb", lambda: _Wandb(logging_cfg.wandb, out=out, run_id=run_id, config=config or {}))
        if logging_cfg.tensorboard:
            self._start("tensorboard", lambda: _TensorBoard(out, config_text))

    def _start(self, name: str, make) -> None:
        try:
            self.sinks[name] = make()
        except Exception as exc:  # noqa: BLE001 - a telemetry backend must never stop training
            _warn(f"{name} could not start ({type(exc).__name__}: {exc}); continuing without it")

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        for name, sink in list(self.sinks.items()):
            try:
                sink.log(record)
            except Exception as exc:  # noqa: BLE001
                _warn(f"{name} failed ({type(exc).__name__}: {exc}); switched off for the rest of the run")
                self.sinks.pop(name)

    def close(self) -> None:
        self.metrics.close()
        for name, sink in self.sinks.items():
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                _warn(f"{name} did not close cleanly ({type(exc).__name__}: {exc})")
        self.sinks = {}


def rewind(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (and no end record): what a run resumed from `step` continues."""
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
