"""What a run tells people while it runs: metrics.jsonl (always), a rank-0 progress bar with loss, tokens/s and
ETA that degrades to plain periodic lines when the output is not a terminal (Slurm logs)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


MIB = 2**20


@dataclass(frozen=True)
class GpuMemoryStats:
    """What CUDA reports for one device, in bytes (the allocator's peaks since the last reset)."""
    allocated_peak: int  # torch.cuda.max_memory_allocated: tensors alive at the worst moment
    reserved_peak: int  # torch.cuda.max_memory_reserved: what the caching allocator held from the device then
    reserved_now: int  # torch.cuda.memory_reserved
    device_free: int  # torch.cuda.mem_get_info()[0]
    device_total: int  # torch.cuda.mem_get_info()[1]


def gpu_memory_figures(stats: GpuMemoryStats) -> dict[str, float]:
    """The memory figures of a step on a GPU, in MiB.

    `peak_memory_mb` is meant to compare with `dist-ft plan` and with a CPU run's peak RSS, which both count
    everything the process holds: the allocator's reserved peak plus the memory outside the allocator (CUDA
    context, NCCL buffers, cuBLAS workspaces), taken as what the device has in use beyond what the allocator holds
    now. That part is device-wide: another process on the same GPU would be counted too. `allocated_peak_mb` is
    the tensors alone (what max_memory_allocated says), `reserved_peak_mb` adds the allocator's cache and
    fragmentation, `device_used_mb` is the device's use at the time of reading.
    """
    used = stats.device_total - stats.device_free
    outside_allocator = max(0, used - stats.reserved_now)
    return {"peak_memory_mb": (stats.reserved_peak + outside_allocator) / MIB,
            "allocated_peak_mb": stats.allocated_peak / MIB,
            "reserved_peak_mb": stats.reserved_peak / MIB,
            "device_used_mb": used / MIB}


def read_gpu_memory(device) -> GpuMemoryStats:
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return GpuMemoryStats(allocated_peak=torch.cuda.max_memory_allocated(device),
                          reserved_peak=torch.cuda.max_memory_reserved(device),
                          reserved_now=torch.cuda.memory_reserved(device), device_free=free, device_total=total)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (a lifetime high: Linux keeps no resettable one in getrusage)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MemoryMeter:
    """Peak memory per step, and over the run.

    CUDA's peaks are lifetime highs unless reset: without a reset every step would report the worst moment of
    loading or of the first evaluation. `start_step` folds what happened since the last reading (evaluation,
    checkpoints) into the run's peak, then resets; `step` reads the step's own figures. On a CPU the figure is the
    peak RSS, which cannot be reset, so it stays a lifetime high there.
    """

    def __init__(self, device, *, read: Callable[[], GpuMemoryStats] | None = None,
                 reset: Callable[[], None] | None = None):
        self._gpu = getattr(device, "type", "cpu") == "cuda" or read is not None
        if self._gpu and read is None:
            import torch
            read, reset = (lambda: read_gpu_memory(device)), (lambda: torch.cuda.reset_peak_memory_stats(device))
        self._read, self._reset = read, reset
        self.run_peak_mb = 0.0

    def step(self) -> dict[str, float]:
        """The figures since the last `start_step` (MiB), folded into the run's peak."""
        figures = gpu_memory_figures(self._read()) if self._gpu else {"peak_memory_mb": peak_rss_mb()}
        self.run_peak_mb = max(self.run_peak_mb, figures["peak_memory_mb"])
        return figures

    def start_step(self) -> None:
        if self._gpu:
            self.step()
            self._reset()

    def run_peak(self) -> float:
        """The highest `peak_memory_mb` of the run so far, up to now."""
        self.step()
        return self.run_peak_mb


def peak_memory_mb(device) -> float:
    """Peak memory of this process over its life so far (MiB): see `MemoryMeter` for the figure per step."""
    return MemoryMeter(device).run_peak()


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
