"""The stop path, as a dry run: a signal reaching one rank must become a stop that every rank agrees on at the next
step (signals.py, hooks.StopSignals), and the checkpoint it triggers must fit in the warning the scheduler gives
(`--signal=B:USR1@N` in the Slurm template) at the write speed the storage check measured.
"""

from __future__ import annotations

import os
import signal
import time

from ..signals import STOP_SIGNALS, StopRequest
from ..train.step import all_reduce_sum
from .report import Check, Node

GRACE_ENV = "DIST_FT_SIGNAL_GRACE_SECONDS"


def _launcher_forwards_usr1(launcher: str) -> bool | None:
    if launcher not in ("torchrun", "accelerate"):
        return None
    try:
        from torch.distributed.run import get_args_parser
    except ImportError:
        return None
    return any("--signals-to-handle" in a.option_strings for a in get_args_parser()._actions)


def check_signal(topo, nodes: list[Node], io: dict) -> Check:
    blocked = sorted(signal.Signals(s).name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                     if s in STOP_SIGNALS)
    target = topo.world_size - 1  # a signal often reaches only some ranks: the last one gets it
    t0 = time.perf_counter()
    with StopRequest() as stop:
        if topo.rank == target and not blocked:
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.perf_counter() + 2
            while not stop.requested and time.perf_counter() < deadline:
                time.sleep(0.001)  # Python runs the handler between bytecodes of the main thread
        # The trainer folds the request into the all-reduce every step runs: the same here.
        total, n_blocked = all_reduce_sum([float(stop.requested), float(bool(blocked))], topo.device)
        stop.acknowledge()
    agreed_ms = (time.perf_counter() - t0) * 1e3
    details = {"signal_to_agreement_ms": agreed_ms, "blocked_here": blocked}
    if n_blocked:
        everyone = [None] * topo.world_size
        import torch.distributed as dist
        dist.all_gather_object(everyone, blocked)
        bad = next(r for r, b in enumerate(everyone) if b)
        return Check("stop signal", "fail", f"{nodes[bad]} blocks {', '.join(everyone[bad])}: a pre-emption warning "
                     "would never reach it (whatever starts the ranks masks the signal)", culprit=str(nodes[bad]),
                     details=details)
    if total < 1:
        return Check("stop signal", "fail", f"SIGUSR1 sent to {nodes[target]} was not seen by the ranks",
                     culprit=str(nodes[target]), details=details)
    ckpt_s = io["per_rank_bytes"] / (io["write_mb_s"] * 1e6) if io.get("write_mb_s") else None
    details["checkpoint_seconds"] = ckpt_s
    grace = float(os.environ[GRACE_ENV]) if os.environ.get(GRACE_ENV) else None
    details["grace_seconds"] = grace
    said = f"SIGUSR1 on {nodes[target]} reached every rank's stop vote in {agreed_ms:.0f} ms"
    if ckpt_s is not None:
        said += f"; a checkpoint takes ~{ckpt_s:.3g} s at the measured write speed"
    if grace is not None and ckpt_s is not None and ckpt_s > grace:
        return Check("stop signal", "fail", f"{said}, longer than the {grace:.0f} s warning before the kill: raise "
                     "--signal-grace-seconds", culprit="the checkpoint filesystem", details=details)
    forwards = _launcher_forwards_usr1(topo.launcher)
    if forwards is False:
        return Check("stop signal", "warn", f"{said}; but this torchrun does not forward SIGUSR1 to the ranks "
                     "(torch < 2.9): send SIGTERM, or use dist-ft launch", details=details)
    if grace is not None:
        said += f", inside the {grace:.0f} s warning"
    return Check("stop signal", "pass", said, details=details)
