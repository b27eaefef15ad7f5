"""Waiting for slow peers without a collective: the rendezvous store, a heartbeat, and a wait that lasts as long as
the peer is alive.

A collective waits `distributed.timeout_seconds` and then fails the whole job, which is right for a stuck peer but
wrong for a busy one: one rank tokenizing a large data set (or a node whose cache is cold, or a stream whose first
shard is slow to read) takes as long as it takes. So work whose length no one can bound runs inside `patient`:
while it runs, a thread bumps this rank's heartbeat counter in the rendezvous store every few seconds, if the rank
made progress since the last one (`watchdog.beat`: each record tokenized or streamed, each poll of a lock another
local rank holds while it tokenizes). When done, the rank marks itself done and waits for the others, polling the
store. A peer is waited for as long as its heartbeat moves, however long its work takes; a peer whose heartbeat has
not moved for `stall_seconds` (dead, stopped, stuck in I/O, or stuck holding the GIL) ends the wait on every rank
with an error naming it. Heartbeats are counters
compared with this process's own clock, so clocks that differ across nodes do not matter.

The store exists before the process group (`open_store`, the same store `init_process_group` would create from
the launcher's environment, then handed to it), so data preparation before the group starts is covered too.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Callable, TypeVar

import torch.distributed as dist

from . import watchdog

T = TypeVar("T")
BEAT_SECONDS = 2.0
POLL_SECONDS = 0.2


class PeerStalled(RuntimeError):
    """A peer stopped sending heartbeats while the others waited for it."""


def open_store(rank: int, world: int, timeout_seconds: float):
    """The launcher's rendezvous store (env://: MASTER_ADDR/MASTER_PORT, torchrun's agent store when it runs one),
    or None for a single process started by hand."""
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return None
    timeout = datetime.timedelta(seconds=timeout_seconds)
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    store.set_timeout(timeout)
    return store


class PatientWait:
    """`patient(name, work)` on every rank: run `work`, then wait for every rank's, as long as each is alive."""

    def __init__(self, store, rank: int, world: int, *, stall_seconds: float, log: Callable[[str], None] = print,
                 beat_seconds: float = BEAT_SECONDS):
        self.store, self.rank, self.world = store, rank, world
        self.stall, self.log, self.beat_seconds = stall_seconds, log, beat_seconds

    def patient(self, name: str, work: Callable[[], T]) -> T:
        if self.store is None or self.world == 1:
            return work()
        key = f"dist_ft/patient/{name}"
        self.store.add(f"{key}/beat/{self.rank}", 1)
        stop = threading.Event()
        beater = threading.Thread(target=self._beat, args=(f"{key}/beat/{self.rank}", stop), daemon=True,
                                  name=f"dist_ft heartbeat ({name})")
        beater.start()
        try:
            result = work()
        finally:
            stop.set()
            beater.join()
        self.store.set(f"{key}/done/{self.rank}", "1")
        self._wait(key, name)
        return result

    def _beat(self, key: str, stop: threading.Event) -> None:
        last = watchdog.progress_count()
        while not stop.wait(self.beat_seconds):
            now = watchdog.progress_count()
            if now == last:
                continue  # alive but not progressing: let the peers' clocks run
            last = now
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: the waiters will name this rank
                return

    def _wait(self, key: str, name: str) -> None:
        seen: dict[int, tuple[int, float]] = {}  # rank -> (last heartbeat count, when it last moved here)
        started, said = time.monotonic(), False
        while True:
            pending = [r for r in range(self.world) if not self.store.check([f"{key}/done/{r}"])]
            if not pending:
                return
            now = time.monotonic()
            for r in pending:
                count = self.store.add(f"{key}/beat/{r}", 0)  # reads the counter (0 if it never started)
                last = seen.get(r)
                if last is None or count != last[0]:
                    seen[r] = (count, now)
                elif now - last[1] > self.stall:
                    raise PeerStalled(f"rank {r} sent no heartbeat for {now - last[1]:.0f} s while the others waited "
                                      f"for its {name} (distributed.timeout_seconds is {self.stall:g}); it is dead or "
                                      "stuck: its own log says where")
            watchdog.beat()  # waiting on live peers is progress; a dead one raises PeerStalled above
            if not said and now - started > self.stall:
                said = True
                self.log(f"[dist_ft] waiting for rank(s) {pending} to finish {name} ({now - started:.0f} s so far; "
                         "they are alive, so the wait goes on)")
            time.sleep(POLL_SECONDS)
