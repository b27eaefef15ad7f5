"""Fault injection for tests: DIST_FT_FAULT=POINT:STEP[:RANK] makes one process fail on purpose.

    checkpoint-write:9     SIGKILL half-way through writing the checkpoint of step 9 (no clean-up at all)
    hang:3:1               rank 1 stops answering before step 3 (the others must time out, not hang)
    crash:3:1              rank 1 raises before step 3
    kill:3:1               rank 1 dies of SIGKILL before step 3 (what the out-of-memory killer does)
    signal:3:1             rank 1 sends itself SIGTERM before step 3 (a preemption that reaches one rank)
    slow:0.3               every rank sleeps 0.3 s before each step (a run long enough to be signalled mid-way)
    slow-data:25:1         rank 1 takes 25 s longer to prepare its data: before tokenizing, and before its first
                           streamed rows (a slow tokenizer, a cold cache, a slow first shard)
    hang-data:0:1          rank 1 stops making progress while it prepares its data (a hung filesystem)
    overflow:3:1           rank 1's gradients of step 3 come out non-finite (an fp16 overflow: skipped, scale lowered)
    hang-checkpoint:6      every rank stalls inside the checkpoint of step 6 (a hung filesystem: nobody waits on a peer)
    hang-final-save:12:0   rank 0 stalls while writing final/ after the last step (12)
    hang-exit:0:1          rank 1 stalls on its way out, after the process group is shut down (STEP is always 0)
    hang-exit-gil:0:1      the same inside C code that holds the GIL (what a destructor joining a thread that waits
                           for the GIL does); any hang point takes the -gil suffix

Unset (always, outside tests), this is one dictionary lookup.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time


def active(point: str, step: int, rank: int = 0) -> bool:
    """Whether a fault the caller carries out itself (overflow) is asked for at this step on this rank."""
    spec = os.environ.get("DIST_FT_FAULT")
    if not spec:
        return False
    parts = spec.split(":")
    return parts[0] == point and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank)


def inject(point: str, step: int, rank: int = 0) -> None:
    spec = os.environ.get("DIST_FT_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == "slow" == point:
        time.sleep(float(parts[1]))
        return
    if parts[0] == "slow-data" == point:
        if len(parts) < 3 or int(parts[2]) == rank:
            from .distributed import watchdog
            end = time.monotonic() + float(parts[1])
            while time.monotonic() < end:  # slow, but making progress (as a slow tokenizer does)
                time.sleep(0.5)
                watchdog.beat()
        return
    holds_gil = parts[0].endswith("-gil")
    if parts[0].removesuffix("-gil") != point or int(parts[1]) != step or (len(parts) > 2 and int(parts[2]) != rank):
        return
    if point in ("checkpoint-write", "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif point.startswith("hang"):
        sys.stderr.flush()
        while True:
            if holds_gil:
                ctypes.PyDLL(None).sleep(3600)  # a PyDLL call keeps the GIL: no Python thread runs again
            else:
                time.sleep(3600)
    elif point == "signal":
        os.kill(os.getpid(), signal.SIGTERM)
    elif point == "crash":
        raise RuntimeError(f"injected fault (DIST_FT_FAULT={spec})")
