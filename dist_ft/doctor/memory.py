"""Memory: what each rank has free, against what `dist-ft plan` says the recipe needs per rank.

On a GPU the device's free memory is read directly. On the host, "free" is the smaller of the machine's available
memory and what the process's control group still allows (Slurm's ConstrainRAMSpace, a container's limit): a job
that fits the machine but not its cgroup is killed by the OOM killer hours in, with nothing in the log. Ranks
that share a host and a cgroup share what is free. What a rank already holds (the interpreter, torch) is counted
back in: the plan's runtime row includes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from .report import Check, Node

GIB = 1024 ** 3
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60
WARN_FRACTION = 0.9  # needs above this share of what is free: a warning


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return UNLIMITED if text == "max" else int(text)


def cgroup_room(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> tuple[int | None, str]:
    """(bytes the memory cgroup still allows this process, its path); (None, "") without a limit.

    A limit anywhere up the hierarchy applies, so every ancestor is read and the tightest room is kept.
    """
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    best: tuple[int | None, str] = (None, "")
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):        # cgroup v1
            base, limit_f, usage_f = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        elif controllers == "":                       # cgroup v2
            base, limit_f, usage_f = root, "memory.max", "memory.current"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            folder = base.joinpath(*parts[:depth])
            limit, usage = _read_int(folder / limit_f), _read_int(folder / usage_f)
            if limit is None or usage is None or limit >= UNLIMITED:
                continue
            room = max(0, limit - usage)
            if best[0] is None or room < best[0]:
                best = (room, "/" + "/".join(parts[:depth]))
    return best


def host_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def own_rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def rank_free(device: torch.device) -> dict:
    """What this rank can still use, and where the bound comes from."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"free": free + torch.cuda.memory_reserved(device), "total": total, "bound": f"{device}",
                "scope": f"{device}"}
    avail = host_available()
    room, cg = cgroup_room()
    if room is not None and room < avail:
        return {"free": room, "bound": f"cgroup {cg} limit", "scope": f"cgroup {cg}", "rss": own_rss()}
    return {"free": avail, "bound": "the host's available memory", "scope": "host", "rss": own_rss()}


def plan_need(recipe, nodes: list[Node], device: torch.device) -> tuple[float, str]:
    """Bytes per rank `dist-ft plan` counts for this recipe on this world."""
    from ..plan import make_cluster, make_plan

    hosts = len({n.key for n in nodes})
    per_node = max(1, len(nodes) // hosts)
    if device.type == "cuda":
        total_gib = torch.cuda.mem_get_info(device)[1] / GIB
        cluster = make_cluster(nodes=hosts, gpus_per_node=per_node, gpu="H100", gpu_memory_gib=total_gib)
    else:
        cluster = make_cluster(nodes=hosts, gpus_per_node=per_node, gpu="cpu")
    plan = make_plan(recipe, cluster, find_max=False, timed=False)  # memory only: no block timed on every rank
    return plan.device_total, plan.verdict


def check_memory(topo, recipe, nodes: list[Node]) -> Check:
    mine = rank_free(topo.device)
    try:
        need, plan_verdict = plan_need(recipe, nodes, topo.device)
    except Exception as exc:  # a model the planner cannot read: say so, do not block
        return Check("memory", "warn", f"the plan could not be made ({exc}); free memory not compared")
    everyone = [None] * topo.world_size
    dist.all_gather_object(everyone, mine)
    # Ranks on one host in one scope share it (the GPU is each rank's own).
    sharing: dict = {}
    for n, m in zip(nodes, everyone):
        sharing[(n.key, m["scope"])] = sharing.get((n.key, m["scope"]), 0) + 1
    rows, short, tight = [], [], []
    for n, m in zip(nodes, everyone):
        k = 1 if topo.device.type == "cuda" else sharing[(n.key, m["scope"])]
        usable = m["free"] / k + m.get("rss", 0)
        rows.append({"rank": n.rank, "node": n.node_name(), "usable_bytes": usable, "bound": m["bound"],
                     "shared_by": k})
        if need > usable:
            short.append((n, usable, m))
        elif need > WARN_FRACTION * usable:
            tight.append((n, usable, m))
    details = {"need_bytes_per_rank": need, "plan_verdict": plan_verdict, "ranks": rows}
    least = min(rows, key=lambda r: r["usable_bytes"])
    if short:
        n, usable, m = min(short, key=lambda s: s[1])
        more = f" (and {len(short) - 1} other rank(s))" if len(short) > 1 else ""
        return Check("memory", "fail", f"{n}{more} has {usable / GIB:.2f} GiB for the run ({m['bound']}), the plan "
                     f"needs {need / GIB:.2f} GiB per rank", culprit=str(n), details=details)
    if tight:
        n, usable, m = tight[0]
        return Check("memory", "warn", f"{n} has {usable / GIB:.2f} GiB ({m['bound']}), the plan needs "
                     f"{need / GIB:.2f} GiB per rank: less than {1 - WARN_FRACTION:.0%} to spare", details=details)
    return Check("memory", "pass", f"the plan needs {need / GIB:.2f} GiB per rank; the tightest rank has "
                 f"{least['usable_bytes'] / GIB:.2f} GiB (rank {least['rank']}, {least['bound']})", details=details)
