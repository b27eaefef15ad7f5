"""Watchdogs that end a job nobody else would end: `AgentWatchdog` watches torchrun's agent from inside `dist-ft
launch`, `ProgressWatchdog` (below) watches each rank's own progress.

A failed rank must end its node, even when the agent cannot.

The agent notices a dead worker between calls to its rendezvous store. When the network to the store's host is
gone (a partition, a dead switch port), one such call waits for TCP to give up, which takes many minutes, long
after the ranks themselves ended at `distributed.timeout_seconds`. The job then looks alive to Slurm while doing
nothing. So a thread here watches this process's children: once one of them has exited with a failure and the
agent has not reacted within `grace` seconds, it ends the other children and this process, naming the rank.

A worker that exited 0 is left alone: the agent may legitimately wait for slower nodes at its exit barrier.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, from /proc (field 4 of stat is the parent)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _exit_status(pid: int) -> int | None:
    """The wait status of a child that has exited but is not yet reaped (a zombie), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")" closing the command name: field 3 (state) is first, field 52 (exit_code) last.
    return int(fields[-1]) if fields[0] == "Z" else None


def _rank_of(pid: int) -> str:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for item in env:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return "?"


class AgentWatchdog:
    def __init__(self, grace: float = 30.0, interval: float = 1.0):
        self.grace, self.interval = grace, interval
        self._stop = threading.Event()
        self._ranks: dict[int, str] = {}

    def start(self) -> "AgentWatchdog":
        if sys.platform.startswith("linux"):
            threading.Thread(target=self._run, name="dist-ft-agent-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failed_since: float | None = None
        while not self._stop.wait(self.interval):
            children = _children(os.getpid())
            for pid in children:
                if pid not in self._ranks:
                    self._ranks[pid] = _rank_of(pid)
            failed = [(pid, status) for pid in children if (status := _exit_status(pid))]
            if not failed:
                failed_since = None
                continue
            failed_since = failed_since or time.monotonic()
            if time.monotonic() - failed_since < self.grace or self._stop.is_set():
                continue
            pid, status = failed[0]
            how = f"signal {status & 0x7F}" if status & 0x7F else f"exit status {status >> 8}"
            os.write(2, (f"[dist_ft] rank {self._ranks.get(pid, '?')} failed ({how}) and torchrun's agent has not "
                         f"reacted in {self.grace:.0f} s (its rendezvous store is probably unreachable): ending this "
                         "node\n").encode())
            for child in children:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os._exit(1)


# ------------------------------------------------------------------------------------------------ one rank's progress

# The exit status of a rank the watchdog below ended (what coreutils' `timeout` returns).
EXIT_STUCK = 124
# Tearing a finished (or failed) run down takes seconds: the shutdown and exit phases get this long at most.
TEARDOWN_S = 60.0


class ProgressWatchdog:
    """Ends this rank when it makes no progress for `limit` seconds (`distributed.timeout_seconds`).

    A rank stuck alone inside a step is found by its peers: they wait for it in the step's next collective and time
    out. Nobody waits for a rank stuck where no peer does: in checkpoint I/O that every rank does at once (a hung
    network filesystem), in the tail of the run after its peers finished and exited 0 (the process group's shutdown,
    the interpreter's exit), or in any phase all ranks are stuck in together. torchrun's agent then waits for it
    forever, and so does the job. So from its first step to its exit each rank reports progress: `phase` at the
    start of every step, evaluation, checkpoint, the final save, the shutdown and the exit, and `beat` within a
    phase (every forward pass of the model, through a hook on its input embeddings). A thread checks once a second;
    a phase without progress for `limit` s prints what the rank was doing and every thread's stack, and ends the
    process with status 124. Phases are bounded like collectives: raise `distributed.timeout_seconds` above the
    longest micro-batch, evaluation batch or checkpoint write. The teardown phases get `TEARDOWN_S` at most, so that
    a rank whose collective timed out cannot take a second timeout to leave.

    That thread needs the GIL. A rank stuck in C code that holds it (a destructor joining a thread that waits for
    the GIL: pytorch#56297) is ended `backstop` s later (30, or `limit` if less) by faulthandler's thread, which
    needs no GIL (status 1, with the stacks). Before the first evaluation or step (building the model, loading a
    checkpoint) nothing is watched: all ranks may legitimately load for longer than the timeout, and one rank stuck
    there alone is found by its peers' collective timeout.
    """

    def __init__(self, limit: float, *, rank: int, backstop: float | None = None, interval: float = 1.0):
        self.limit, self.rank, self.interval = float(limit), rank, interval
        self.backstop = min(30.0, self.limit) if backstop is None else backstop
        self.phase_name, self.phase_limit, self.note = "start", self.limit, None
        self._last = self._armed = time.monotonic()
        self._stop = threading.Event()
        self._hook = None

    def start(self, model=None) -> "ProgressWatchdog":
        if model is not None:  # every forward pass is progress: training micro-batches, evaluation, generation
            # On the input embeddings: generation through a PEFT model calls the inner model, not the wrapper.
            try:
                model = model.get_input_embeddings() or model
            except (AttributeError, NotImplementedError):
                pass
            self._hook = model.register_forward_pre_hook(lambda *_: self.beat())
        self._arm()
        threading.Thread(target=self._run, name="dist-ft-progress-watchdog", daemon=True).start()
        return self

    def phase(self, name: str, *, limit: float | None = None, note: BaseException | None = None) -> None:
        """A new phase (progress), given at most `limit` s without progress (default: the watchdog's)."""
        phase_limit = min(self.limit, limit) if limit is not None else self.limit
        rearm = phase_limit != self.phase_limit
        self.beat()  # first: the checking thread must never see the new limit against the old phase's last beat
        self.phase_name, self.phase_limit, self.note = name, phase_limit, note
        if rearm:
            self._arm()

    def beat(self) -> None:
        now = time.monotonic()
        self._last = now
        if now - self._armed >= 1.0:  # re-arming starts a thread: at most once a second
            self._arm()

    def _arm(self) -> None:
        import faulthandler

        self._armed = time.monotonic()
        faulthandler.dump_traceback_later(self.phase_limit + self.backstop, exit=True, file=sys.__stderr__)

    def stop(self) -> None:
        import faulthandler

        self._stop.set()
        faulthandler.cancel_dump_traceback_later()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if time.monotonic() - self._last >= self.phase_limit and not self._stop.is_set():
                self._fire()

    def _fire(self) -> None:
        import faulthandler

        after = ""
        if self.note is not None:  # the error the run ended with, in case the teardown's stacks are all we get
            after = f" after {type(self.note).__name__}: {(str(self.note).splitlines() or [''])[0][:300]}"
        bound = "distributed.timeout_seconds" if self.phase_limit == self.limit else "the teardown's limit"
        os.write(2, (f"[dist_ft] rank {self.rank}: no progress in {self.phase_name}{after} for "
                     f"{self.phase_limit:.0f} s ({bound}): ending this rank, and so the job (exit status "
                     f"{EXIT_STUCK}). Where each thread was:\n").encode())
        try:
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        except Exception:  # noqa: BLE001 - the exit matters more than the stacks
            pass
        os._exit(EXIT_STUCK)


_ACTIVE: ProgressWatchdog | None = None
# Every beat and phase this process reported, watched or not: what its heartbeat to waiting peers publishes
# (rendezvous.py), so a rank that is alive but stuck stops looking alive.
_PROGRESS = 0


def progress_count() -> int:
    return _PROGRESS


def watch(limit: float, *, rank: int, model=None) -> ProgressWatchdog:
    """Start this process's progress watchdog (one per process; a second call replaces the first)."""
    global _ACTIVE
    unwatch()
    _ACTIVE = ProgressWatchdog(limit, rank=rank).start(model)
    return _ACTIVE


def phase(name: str, *, limit: float | None = None, note: BaseException | None = None) -> None:
    """This rank starts `name` (progress); `note`: the error the run ended with. Nothing when no watchdog runs."""
    global _PROGRESS
    _PROGRESS += 1
    if _ACTIVE is not None:
        _ACTIVE.phase(name, limit=limit, note=note)


def beat() -> None:
    global _PROGRESS
    _PROGRESS += 1
    if _ACTIVE is not None:
        _ACTIVE.beat()


def unwatch() -> None:
    """Stop watching (a caller that goes on in this process after training, e.g. a test calling the CLI)."""
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None
