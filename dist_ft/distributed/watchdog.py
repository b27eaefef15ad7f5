"""A watch on torchrun's agent from inside `dist-ft launch`: a failed rank must end its node, even when the agent
cannot.

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
