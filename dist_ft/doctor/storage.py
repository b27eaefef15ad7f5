"""The checkpoint filesystem: room for the run's checkpoints, write / read / verify throughput with every rank
writing at once (as a checkpoint does), and whether every node sees the others' files (a sharded checkpoint is
one folder that all ranks write into and any rank may read on resume: node-local disks break that silently).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from .report import Check, Node

MiB = 1024 ** 2
CHUNK = 8 * MiB
PROBE_MIB = {"cpu": (4, 64), "cuda": (16, 512)}  # (smallest, largest) file each rank writes


def checkpoint_bytes(recipe) -> tuple[float, float]:
    """(one checkpoint, the final model) in bytes, all ranks together: trainable weights with their optimizer
    state and master copy; final/ holds the weights a method trains (the adapter) or the whole model."""
    from ..plan import analyze_model, byte_rules, method_counts

    facts = analyze_model(recipe)
    mc = method_counts(facts, recipe)
    d = recipe.distributed
    rules = byte_rules(d.strategy, d.precision, recipe.training.optimizer)
    ckpt = mc.n_trainable * (rules.weights + rules.master + rules.optimizer)
    adapter_only = recipe.method.kind not in ("full", "partial")
    final = mc.n_trainable * rules.weights if adapter_only else facts.total * rules.weights
    return ckpt, final


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write(path: Path, nbytes: int, seed: int) -> tuple[float, str]:
    """Write nbytes of pseudo-random data and fsync; (seconds, sha256)."""
    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left:
            block = rng.integers(0, 256, size=min(CHUNK, left), dtype=np.uint8).tobytes()
            f.write(block)
            h.update(block)
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0, h.hexdigest()


def _read(path: Path) -> tuple[float, str]:
    fd = os.open(path, os.O_RDONLY)
    try:  # read from the filesystem, not from the page cache the write just filled
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    h = hashlib.sha256()
    t0 = time.perf_counter()
    with os.fdopen(fd, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return time.perf_counter() - t0, h.hexdigest()


def probe_rank(folder: Path, rank: int, nbytes: int) -> dict:
    path = folder / f"rank-{rank:05d}.bin"
    out = {"rank": rank, "bytes": nbytes, "path": str(path)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        w, digest = _write(path, nbytes, seed=rank)
        r, again = _read(path)
        out.update(write_mb_s=nbytes / w / 1e6, read_mb_s=nbytes / r / 1e6, verified=digest == again)
    except OSError as exc:
        written = path.stat().st_size if path.exists() else 0
        out["error"] = ("no space left" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)) + \
            f" after {written / MiB:.1f} MiB"
    return out


def check_storage(topo, recipe, nodes: list[Node], out: Path, world_id: str) -> tuple[Check, dict]:
    """The check, and what the signal check needs from it (bytes per rank, the slowest write rate). `world_id`
    keeps two worlds started on one folder (the misconfiguration world.py finds) out of each other's files."""
    folder = out / "doctor" / "fs" / world_id
    try:
        ckpt, final = checkpoint_bytes(recipe)
    except Exception:  # a model the planner cannot read: probe at the smallest size
        ckpt, final = 0.0, 0.0
    per_rank = ckpt / topo.world_size
    lo, hi = PROBE_MIB.get(topo.device.type, PROBE_MIB["cpu"])
    nbytes = int(min(max(per_rank, lo * MiB), hi * MiB))
    base = _existing(out)
    free = shutil.disk_usage(base).free
    mine = probe_rank(folder, topo.rank, nbytes)
    mine["free_bytes"] = free
    dist.barrier()
    mine["sees"] = sum((folder / f"rank-{r:05d}.bin").exists() for r in range(topo.world_size))
    everyone = [None] * topo.world_size
    dist.all_gather_object(everyone, mine)
    dist.barrier()
    (folder / f"rank-{topo.rank:05d}.bin").unlink(missing_ok=True)
    if topo.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    keep = recipe.checkpoint.keep_last or 1
    need_one, need_all = ckpt + final, ckpt * (keep + 1) + final  # a new checkpoint is written before the oldest goes
    details = {"ranks": everyone, "checkpoint_bytes": ckpt, "final_bytes": final, "probe_bytes_per_rank": nbytes,
               "folder": str(out)}
    io = {"per_rank_bytes": per_rank, "write_mb_s": None}
    broken = [e for e in everyone if "error" in e or not e.get("verified", False)]
    if broken:
        e = broken[0]
        what = e.get("error") or "the bytes read back differ from those written"
        return Check("checkpoint storage", "fail", f"writing {e['path']} failed: {what}",
                     culprit=str(nodes[e["rank"]]), details=details), io
    blind = [e for e in everyone if e["sees"] < topo.world_size]
    if blind:
        e = blind[0]
        return Check("checkpoint storage", "fail", f"{out} is not shared: {nodes[e['rank']]} sees {e['sees']} of "
                     f"{topo.world_size} ranks' files; a sharded checkpoint must be one folder every node reads "
                     "(put output_dir on a shared filesystem)", culprit=str(nodes[e["rank"]]), details=details), io
    tight = min(everyone, key=lambda e: e["free_bytes"])
    slow_w = min(everyone, key=lambda e: e["write_mb_s"])
    slow_r = min(everyone, key=lambda e: e["read_mb_s"])
    io["write_mb_s"] = slow_w["write_mb_s"]
    rates = (f"write {slow_w['write_mb_s']:.0f} MB/s per rank with {topo.world_size} writing (slowest: "
             f"{nodes[slow_w['rank']]}), read {slow_r['read_mb_s']:.0f} MB/s, verified")
    room = f"{tight['free_bytes'] / 1e9:.3g} GB free"
    if tight["free_bytes"] < need_one:
        return Check("checkpoint storage", "fail", f"{room} under {base} on {nodes[tight['rank']]}, but one checkpoint "
                     f"and the final model need {need_one / 1e9:.3g} GB", culprit=str(nodes[tight["rank"]]),
                     details=details), io
    if tight["free_bytes"] < need_all:
        return Check("checkpoint storage", "warn", f"{room}: room for the final model but not for keep_last + 1 = "
                     f"{keep + 1} checkpoints ({need_all / 1e9:.3g} GB); {rates}", details=details), io
    return Check("checkpoint storage", "pass", f"{room} (a checkpoint is {ckpt / 1e9:.3g} GB); {rates}",
                 details=details), io
