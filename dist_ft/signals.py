"""Stop requests: SIGTERM, SIGINT or SIGUSR1 ask the run to checkpoint and stop at the end of the current step.

Slurm sends SIGTERM (or the `--signal` of the job) before a preemption or time limit, torchrun forwards its own
SIGTERM/SIGINT/SIGUSR1 to every rank, and a user presses Ctrl-C. Each of these reaches some ranks, not
necessarily all, at any moment: inside a collective, a checkpoint write or an evaluation. So nothing is done in
the handler; the trainer folds the request into the all-reduce it already runs after every step, every rank learns
of it at the same step, and they write one checkpoint together before leaving.

A second signal means "now" -- unless it arrives within a second of the first: a signal sent to a whole process
group or Slurm job step (Ctrl-C in a terminal, srun forwarding the batch script's warning) reaches each rank
directly *and* through the launcher, which forwards it again. Python runs signal handlers only between bytecodes of the main thread, which may be
blocked in C++ for minutes (a collective waiting on a dead peer, a large file write). So signals are also read
from a wakeup pipe by a small thread, which ends the process at once on the second one. Nothing is lost by that:
a checkpoint becomes visible only by its final rename (see checkpoint.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# The exit status of a run that stopped on a signal after writing its checkpoint (sysexits' EX_TEMPFAIL: "try
# again later"). Batch scripts requeue on it; 128+N would read as "killed by signal N, nothing saved".
EXIT_STOPPED = 75
# A repeat of a stop signal within this many seconds is the same request delivered twice (see the docstring).
REPEAT_WINDOW_S = 1.0


class StopRequest:
    """`with StopRequest() as stop:` ... `stop.signum` is the first stop signal received, else None."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, *, deadline: float | None = None):
        self.signals = tuple(int(s) for s in signals)
        self.signum: int | None = None
        # A rank that cannot reach the end of its step within `deadline` seconds of the signal (stuck: a peer
        # died, or it hangs itself) leaves then: torchrun sends SIGTERM to the survivors when one rank fails,
        # and would otherwise wait its whole shutdown timeout before SIGKILL.
        self.deadline = deadline
        self.acknowledged = False
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._pipe: tuple[int, int] | None = None
        self._first_at = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @staticmethod
    def name_of(signum: int) -> str:
        return signal.Signals(signum).name

    def acknowledge(self) -> None:
        """The ranks have agreed to stop: the checkpoint is being written, the deadline no longer applies."""
        self.acknowledged = True

    def _expire(self, signum: int) -> None:
        if not self.acknowledged and self._pipe is not None:
            os.write(2, f"[dist_ft] {self.name_of(signum)}: the step did not end within {self.deadline:.0f} s; "
                        "exiting without a checkpoint\n".encode())
            os._exit(128 + signum)

    def _record(self, signum: int) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if self.deadline:
                timer = threading.Timer(self.deadline, self._expire, args=(signum,))
                timer.daemon = True
                timer.start()
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return
        os.write(2, f"[dist_ft] second {self.name_of(signum)}: exiting now, without a checkpoint\n".encode())
        os._exit(128 + signum)

    def _watch(self, fd: int) -> None:
        try:
            while data := os.read(fd, 64):
                for signum in data:
                    if signum in self.signals:
                        self._record(signum)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "StopRequest":
        # Handlers and the wakeup fd can only be set from the main thread (an in-process test may train elsewhere).
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        for s in self.signals:
            # The Python handler only keeps the default action (death) away; the watcher thread does the work.
            self._previous[s] = signal.signal(s, lambda *_: None)
        self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(r,), name="dist-ft-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        os.close(self._pipe[1])  # the watcher reads EOF and ends
        self._pipe = None
        sys.stderr.flush()
