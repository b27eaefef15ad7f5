"""Run dist_ft's training with each rank's resident memory sampled, for test_final_save.py to compare the final
save's peak with the training peak.

    torchrun --nproc-per-node 2 tests/final_save_probe.py RECIPE.yaml OUT_DIR

A thread reads the resident set (/proc/self/statm) every millisecond. Phases: "train" from just before the first
step (CheckpointManager.restore_rng, which the trainer calls there) to the start of the final save, "save" for
CheckpointManager.save_final. The process's lifetime peak would not do: loading the weights (a memory-mapped
safetensors file) can top both. The heap is trimmed (malloc_trim) when the save starts, so that what the save
allocates shows in the resident set. OUT_DIR/rank-R.json: {"train_peak_mb", "save_start_mb", "save_peak_mb"}.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.phase: str | None = None
        self.peaks: dict[str, int] = {}
        self.stop = False

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def run(self) -> None:
        while not self.stop:
            phase = self.phase
            if phase is not None:
                self.peaks[phase] = max(self.peaks.get(phase, 0), self.rss())
            time.sleep(0.001)


def main() -> int:
    recipe_path, out = sys.argv[1], Path(sys.argv[2])
    from dist_ft.checkpoint.manager import CheckpointManager
    from dist_ft.config import load_recipe
    from dist_ft.train.run import run_training

    sampler = Sampler()
    sampler.start()
    figures: dict[str, float] = {}
    restore, save = CheckpointManager.restore_rng, CheckpointManager.save_final

    def restore_rng(self):
        sampler.phase = "train"
        return restore(self)

    def save_final(self):
        # Heap memory that training freed but glibc kept would otherwise absorb what the save allocates, unseen.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        figures["save_start_mb"] = sampler.rss() / 2**20
        sampler.phase = "save"
        try:
            return save(self)
        finally:
            time.sleep(0.01)  # one more sample
            sampler.phase = None

    CheckpointManager.restore_rng, CheckpointManager.save_final = restore_rng, save_final
    run_training(load_recipe(recipe_path))
    sampler.stop = True
    out.mkdir(parents=True, exist_ok=True)
    figures |= {f"{k}_peak_mb": v / 2**20 for k, v in sampler.peaks.items()}
    (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
