"""What a run tells people while it runs: metrics.jsonl (always), a rank-0 progress bar with loss, tokens/s and
ETA that degrades to plain periodic lines when the output is not a terminal (Slurm logs)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def peak_memory_mb(device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, peak resident set size on CPU."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def stopped_since(run_dir: Path, since: float) -> dict | None:
    """The run's `stopped` event (a checkpoint written on a signal) if one was logged at or after `since`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("time", 0) < since:
            return None
        if record.get("event") == "stopped" and record.get("reason") != "training.stop_after_steps":
            return record
    return None


class MetricsFile:
    """One JSON object a line; written by rank 0 only, flushed every record so a crash loses nothing."""

    def __init__(self, path: Path | None):
        self._fh = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            # Wall-clock time on every record: how long a stop, a save or a requeue took is read from here.
            self._fh.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, *, total: int, start: int = 0, enabled: bool, stream=None):
        self.total, self.done, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.start = start
        self.bar = None
        self._last_line = 0.0
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=self.stream)

    def update(self, *, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        self.done = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            return
        now = time.perf_counter()
        every = max(1, self.total // 20)
        if step == self.total or step % every == 0 or now - self._last_line > 30:
            self._last_line = now
            rate = (now - self.t0) / max(1, step - self.start)
            eta = rate * (self.total - step)
            print(f"[train] step {step}/{self.total} loss {loss:.4f} tokens/s {tokens_per_s:,.0f} "
                  f"elapsed {_fmt_time(now - self.t0)} eta {_fmt_time(eta)}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
