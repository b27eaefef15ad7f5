"""The network: latency and bandwidth of every link between nodes (and one inside each node), then the collectives
the recipe's backend will run, at the message sizes it will use.

A link is measured by ping-pong between two ranks while the others wait, so a slow one is named, not averaged
away as it is inside a ring collective (where one slow link sets the pace of all). The message grows 4x at a
time until the target size or a time budget, so a slow link costs seconds, not minutes. Bus bandwidth follows
nccl-tests' convention: all-reduce moves 2(n-1)/n of the payload per rank, all-gather and reduce-scatter (n-1)/n.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..distributed.spec import spec_for
from .report import Check, Node

MiB = 1024 ** 2
# All pairs of nodes up to this many nodes; beyond, each node with its ring neighbour.
ALL_PAIRS_NODES = 16
# A link this many times slower than the fastest of its kind is named.
SLOW_FACTOR = 4.0
LATENCY_FACTOR = 10.0
LINK_BUDGET_S = 1.5       # per link, for the largest message
LINK_TARGET_MIB = {"cpu": 16, "cuda": 256}
COLLECTIVE_CAP_MIB = {"cpu": 32, "cuda": 1024}
COLLECTIVE_BUDGET_S = 1.0  # a collective slower than this is timed once


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def link_pairs(nodes: list[Node]) -> list[tuple[int, int, str]]:
    """(rank a, rank b, "inter-node" | "intra-node") for every link worth measuring."""
    leaders, members = {}, {}
    for n in nodes:
        leaders.setdefault(n.key, n.rank)
        members.setdefault(n.key, []).append(n.rank)
    heads = list(leaders.values())
    if len(heads) <= ALL_PAIRS_NODES:
        inter = [(a, b) for i, a in enumerate(heads) for b in heads[i + 1:]]
    else:
        inter = [(heads[i], heads[(i + 1) % len(heads)]) for i in range(len(heads))]
    intra = [(ranks[0], ranks[1]) for ranks in members.values() if len(ranks) > 1]
    return [(a, b, "inter-node") for a, b in inter] + [(a, b, "intra-node") for a, b in intra]


def _pingpong(a: int, b: int, rank: int, buf: torch.Tensor, iters: int) -> float:
    """Median round trip a -> b -> a, in seconds (0 on ranks other than a)."""
    times = []
    for _ in range(iters):
        if rank == a:
            t0 = time.perf_counter()
            dist.send(buf, b)
            dist.recv(buf, b)
            _sync(buf.device)
            times.append(time.perf_counter() - t0)
        else:
            dist.recv(buf, a)
            dist.send(buf, a)
            _sync(buf.device)
    return statistics.median(times) if times else 0.0


def measure_link(a: int, b: int, rank: int, device: torch.device, target_bytes: int) -> dict | None:
    """Latency and bandwidth of the link a <-> b, measured on ranks a and b (None elsewhere)."""
    if rank not in (a, b):
        return None
    small = torch.zeros(1, device=device)
    _pingpong(a, b, rank, small, 3)  # connection set-up
    latency = _pingpong(a, b, rank, small, 20) / 2
    ctrl = torch.zeros(1, dtype=torch.int64, device=device)
    size, best = min(64 * 1024, target_bytes), (0, 0.0)
    while True:  # a chooses each size and tells b; 0 ends
        if rank == a:
            ctrl[0] = size
            dist.send(ctrl, b)
        else:
            dist.recv(ctrl, a)
            size = int(ctrl.item())
        if size == 0:
            break
        buf = torch.empty(size // 4, dtype=torch.float32, device=device)
        rt = _pingpong(a, b, rank, buf, 3)
        if rank == a:
            best = (size, 2 * size / rt)
            size = min(size * 4, target_bytes) if size < target_bytes and rt * 4 * 3 < LINK_BUDGET_S else 0
    if rank != a:
        return None
    return {"a": a, "b": b, "latency_us": latency * 1e6, "bytes": best[0], "gb_per_s": best[1] / 1e9}


def check_links(topo, nodes: list[Node]) -> Check:
    pairs = link_pairs(nodes)
    if not pairs:
        return Check("links", "skip", "one rank: no links")
    target = LINK_TARGET_MIB.get(topo.device.type, 16) * MiB
    mine = []
    for a, b, kind in pairs:
        res = measure_link(a, b, topo.rank, topo.device, target)
        if res is not None:
            mine.append({**res, "kind": kind})
        dist.barrier()
    gathered = [None] * topo.world_size
    dist.all_gather_object(gathered, mine)
    links = [r for part in gathered for r in part]
    for r in links:
        r["between"] = f"{nodes[r['a']]} <-> {nodes[r['b']]}"
    details = {"links": links}
    lines, culprits, status = [], [], "pass"
    for kind in ("inter-node", "intra-node"):
        group = [r for r in links if r["kind"] == kind]
        if not group:
            continue
        fastest = max(group, key=lambda r: r["gb_per_s"])
        slowest = min(group, key=lambda r: r["gb_per_s"])
        lines.append(f"{len(group)} {kind} link(s): slowest {slowest['gb_per_s']:.3g} GB/s ({slowest['between']}), "
                     f"fastest {fastest['gb_per_s']:.3g} GB/s, latency up to "
                     f"{max(r['latency_us'] for r in group):.0f} us")
        slow = [r for r in group if r["gb_per_s"] * SLOW_FACTOR < fastest["gb_per_s"]]
        if slow:
            status = "fail"
            culprits.append(_blame(slow, nodes, fastest))
        lat_med = statistics.median(r["latency_us"] for r in group)
        laggy = [r for r in group if r["latency_us"] > max(LATENCY_FACTOR * lat_med, 1000)]
        if laggy and status == "pass":
            status = "warn"
            lines.append(f"latency {laggy[0]['latency_us']:.0f} us on {laggy[0]['between']}, "
                         f"{laggy[0]['latency_us'] / lat_med:.0f}x the median")
    summary = "; ".join([why for _, why in culprits] + lines)
    return Check("links", status, summary, culprit="; ".join(who for who, _ in culprits) or None, details=details)


def _blame(slow: list[dict], nodes: list[Node], fastest: dict) -> tuple[str, str]:
    """Name the node every slow link touches (its own link is slow), else the slowest link."""
    worst = min(slow, key=lambda r: r["gb_per_s"])
    ratio = fastest["gb_per_s"] / max(worst["gb_per_s"], 1e-12)
    common = set.intersection(*({nodes[r["a"]].key, nodes[r["b"]].key} for r in slow))
    if len(slow) > 1 and len(common) == 1:
        node = next(n for n in nodes if n.key == next(iter(common)))
        return f"node {node.node_name()}", (f"slow link: all {len(slow)} of its links run at "
                f"{worst['gb_per_s']:.3g}-{max(r['gb_per_s'] for r in slow):.3g} GB/s, {ratio:.0f}x below the "
                f"fastest ({fastest['between']}, {fastest['gb_per_s']:.3g} GB/s)")
    return f"link {worst['between']}", (f"slow link at {worst['gb_per_s']:.3g} GB/s, {ratio:.0f}x below the fastest "
            f"({fastest['between']})")


def collective_sizes(recipe, facts, world: int, device_type: str) -> list[tuple[str, int, str]]:
    """(collective, bytes per call, why) the recipe's backend runs, capped so that the doctor takes a minute."""
    from ..plan.constants import DDP_BUCKET_MIB
    from ..plan.memory import byte_rules, deepspeed_buckets

    d = recipe.distributed
    rules = byte_rules(d.strategy, d.precision, recipe.training.optimizer)
    buffers = spec_for(d.strategy).memory.buffers
    if buffers == "ddp_buckets":
        sizes = [("all_reduce", int(DDP_BUCKET_MIB * MiB), f"a {DDP_BUCKET_MIB} MiB gradient bucket")]
    elif buffers == "fsdp_units":
        blocks: dict = {}
        for p in facts.params:
            blocks[p.unit] = blocks.get(p.unit, 0) + p.numel
        unit = max(blocks, key=blocks.get)
        sizes = [("all_gather", int(blocks[unit] * rules.compute), f"the largest unit's parameters ({unit})"),
                 ("reduce_scatter", int(blocks[unit] * rules.reduce), f"its gradients ({unit})")]
    else:
        b = deepspeed_buckets(recipe, world, facts.hidden, device_type == "cuda")
        sizes = [("reduce_scatter", int(b["reduce_bucket_size"] * rules.reduce), "ZeRO's reduce bucket"),
                 ("all_gather", int(b["allgather_bucket_size"] * rules.compute), "ZeRO's all-gather bucket")]
    cap = COLLECTIVE_CAP_MIB.get(device_type, 32) * MiB
    return [(op, max(4096, min(n, cap)), why + (f" (capped at {cap // MiB} MiB)" if n > cap else ""))
            for op, n, why in sizes]


def _time_collective(op: str, nbytes: int, world: int, device: torch.device) -> float:
    n = max(world, nbytes // 4 // world * world)  # divisible by the world for the sharded collectives
    full = torch.ones(n, dtype=torch.float32, device=device)
    part = torch.empty(n // world, dtype=torch.float32, device=device)
    call = {"all_reduce": lambda: dist.all_reduce(full),
            "all_gather": lambda: dist.all_gather_into_tensor(full, part),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full)}[op]
    def timed() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        call()
        _sync(device)
        return time.perf_counter() - t0

    first = torch.tensor([timed()], dtype=torch.float64, device=device)  # a warm-up (connections are made)...
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    # ...and the measurement when it took long already: a slow network is not timed three more times.
    times = [float(first.item())] if first.item() > COLLECTIVE_BUDGET_S else [timed() for _ in range(3)]
    # The slowest rank finishes the collective: every rank takes the maximum of the medians.
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def check_collectives(topo, recipe, facts) -> Check:
    if topo.world_size < 2:
        return Check("collectives", "skip", "one rank: no collectives")
    rows, notes = [], []
    for op, nbytes, why in collective_sizes(recipe, facts, topo.world_size, topo.device.type):
        try:
            seconds = _time_collective(op, nbytes, topo.world_size, topo.device)
        except (RuntimeError, ValueError) as exc:  # a backend without the collective
            notes.append(f"{op}: not run ({str(exc).splitlines()[0][:120]})")
            continue
        n = topo.world_size
        algbw = nbytes / seconds
        busbw = algbw * (2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n)
        rows.append({"op": op, "bytes": nbytes, "why": why, "seconds": seconds, "algbw_gb_per_s": algbw / 1e9,
                     "busbw_gb_per_s": busbw / 1e9})
    summary = "; ".join(f"{r['op']} {r['bytes'] / MiB:.3g} MiB ({r['why']}) {r['seconds'] * 1e3:.3g} ms, bus "
                        f"{r['busbw_gb_per_s']:.3g} GB/s" for r in rows)
    return Check("collectives", "pass" if rows else "warn", "; ".join([summary] + notes) if notes else summary,
                 details={"collectives": rows, "notes": notes})
