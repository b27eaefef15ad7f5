"""Rendezvous: did the world that formed match what the launcher was asked for?

The classic silent failure is a launcher that gives each process (or each node) its own world: every process is
rank 0 of 1, trains alone on the whole data and overwrites the others' checkpoints, and the job exits 0. The world
size a process sees cannot reveal that by itself, so it is compared with what the job asked for, from the command
line (`--expect-world-size`, which `dist-ft doctor --nproc-per-node` sets) or the Slurm allocation; and each
world leaves a mark in the shared output folder, so that two worlds started on one run directory see each other.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from .report import Check, Node

EXPECT_ENV = "DIST_FT_EXPECT_WORLD_SIZE"
# Two worlds whose doctors start this close together on one output folder belong to one misconfigured job.
OVERLAP_S = 600.0


def expected_world(flag: int | None) -> tuple[int | None, str]:
    """The world size the job asked for, and who said so (None: nobody did; the world is taken as it formed)."""
    if flag:
        return flag, "--expect-world-size"
    if os.environ.get(EXPECT_ENV):
        return int(os.environ[EXPECT_ENV]), "the launch command (--nproc-per-node x --nnodes)"
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    per_node = os.environ.get("DIST_FT_PROCS_PER_NODE")  # the batch script dist-ft slurm writes sets it
    if nodes and per_node:
        return int(nodes) * int(per_node), f"the Slurm allocation ({nodes} nodes x {per_node} processes)"
    return None, "nobody (pass --expect-world-size N to check it)"


def route_address() -> str:
    """This process's address on the route to the rendezvous host (what its peers connect to)."""
    host = os.environ.get("MASTER_ADDR")
    if not host:
        return ""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, int(os.environ.get("MASTER_PORT", "29500"))))
            return s.getsockname()[0]
    except OSError:
        return ""


def gather_nodes(rank: int, world: int) -> list[Node]:
    me = Node(rank, socket.gethostname(), route_address())
    nodes = [None] * world
    dist.all_gather_object(nodes, me)
    return nodes


def check_world(topo, nodes: list[Node], expect: tuple[int | None, str]) -> Check:
    expected, who = expect
    per_host = Counter(n.key for n in nodes)
    hosts = len(per_host)
    details = {"world_size": topo.world_size, "expected": expected, "expected_from": who, "launcher": topo.launcher,
               "nodes": hosts, "ranks_per_node": {f"{h} {a}".strip(): c for (h, a), c in per_host.items()}}
    where = f"{topo.world_size} rank(s) on {hosts} node(s), launcher {topo.launcher}"
    if expected is not None and expected != topo.world_size:
        me = nodes[0]
        return Check("rendezvous", "fail", f"{where}, but {who} asked for {expected}: the launcher gave processes "
                     "separate worlds (or some never joined); each would train alone on all the data",
                     culprit=f"the world of {me}", details=details)
    if len(set(per_host.values())) > 1:
        counts = ", ".join(f"{h}: {c}" for (h, _), c in per_host.items())
        return Check("rendezvous", "warn", f"{where}; the nodes run different numbers of ranks ({counts})",
                     details=details)
    return Check("rendezvous", "pass", f"{where}" + (f", as {who} asked" if expected else
                                                     f" (expected by {who})"), details=details)


class WorldMarks:
    """Each world's rank 0 leaves a mark in output_dir/doctor/worlds/; at the end it looks for marks of others."""

    def __init__(self, out: Path, topo, nodes: list[Node]):
        self.folder = out / "doctor" / "worlds"
        self.me = f"{socket.gethostname()}-{os.getpid()}"
        self.topo, self.nodes, self.started = topo, nodes, time.time()

    def leave(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"{self.me}.json").write_text(json.dumps(
                {"started": self.started, "world_size": self.topo.world_size,
                 "ranks": [str(n) for n in self.nodes]}), encoding="utf-8")
        except OSError:  # a full or read-only filesystem: the storage check says so
            pass

    def others(self) -> list[dict]:
        """Marks of other worlds whose doctor ran while this one did (a mark without an end: for OVERLAP_S)."""
        found, now = [], time.time()
        for f in self.folder.glob("*.json") if self.folder.is_dir() else []:
            if f.stem == self.me:
                continue
            try:
                mark = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            start = mark.get("started", 0.0)
            end = mark.get("finished") or start + OVERLAP_S
            if start <= now and end >= self.started:
                found.append({"mark": f.name, **mark})
        return found

    def check(self) -> Check:
        others = self.others()
        if not others:
            return Check("separate worlds", "pass", "no other world ran the doctor on this output folder meanwhile")
        desc = "; ".join(f"a world of {o['world_size']} ({', '.join(o['ranks'][:4])})" for o in others[:3])
        return Check("separate worlds", "fail", f"{len(others)} other world(s) ran the doctor on this output folder "
                     f"at the same time: {desc}. The launcher started processes that did not join one world",
                     culprit=f"the world of {self.nodes[0]}", details={"others": others})

    def finish(self) -> None:
        """Mark this world's doctor as over, so that a later run on the folder is not taken for a second world."""
        try:
            (self.folder / f"{self.me}.json").write_text(json.dumps(
                {"started": self.started, "finished": time.time(), "world_size": self.topo.world_size,
                 "ranks": [str(n) for n in self.nodes]}), encoding="utf-8")
        except OSError:
            pass
