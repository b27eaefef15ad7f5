"""Checkpoints that are either complete or invisible, and resumption that is exact or loud.

Layout of a run directory:

    output_dir/checkpoints/step-00000600/
        manifest.json       written last: step, data position, world size, strategy, model, files with sizes and
                            sha256. A folder without it is incomplete and is never resumed from.
        trainer_state.json  step, samples seen, scheduler, early-stopping state, telemetry run id (rank 0)
        rng/rank-N.json     every rank's Python, NumPy and torch RNG states (JSON: nothing is unpickled)
        recipe.yaml         the recipe that wrote it (export rebuilds the model from it)
        tokenizer/          the run's tokenizer
        state/              the strategy's sharded model + optimizer state: DCP (DDP, FSDP2) or DeepSpeed's own

A checkpoint is written under `.tmp-step-N` by all ranks, its files hashed (the work split over ranks), the
manifest written and fsynced, and only then renamed into place. The backend format is the strategy's business
(distributed/*.py: `save_state` / `load_state`); everything else is here, and knows nothing about backends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as DcpCheckpointException

from .. import faults
from ..distributed import watchdog
from .rng import rng_state

FORMAT = "dist_ft-checkpoint/1"
MANIFEST = "manifest.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-step-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: names the file and the reason."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


# --------------------------------------------------------------------------------------------------- manifest

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_files(folder: Path, names: list[str], rank: int, world: int) -> dict[str, dict]:
    """Sizes and sha256 of `names`, every rank hashing its share; the full table on every rank."""
    mine = {n: {"bytes": (folder / n).stat().st_size, "sha256": _sha256(folder / n)}
            for i, n in enumerate(names) if i % world == rank}
    if world == 1:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing: the checkpoint was not completed (the run stopped while writing "
                              "it); resume from an earlier one")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); resume from an earlier checkpoint") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def size_problems(folder: Path, manifest: dict) -> list[str]:
    """Files missing or of the wrong size: cheap, so checked before anything else."""
    problems = []
    for name, meta in manifest["files"].items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{p}: missing (listed in {folder / MANIFEST})")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated or "
                            "overwritten)")
    return problems


def checksum_problems(folder: Path, manifest: dict, rank: int = 0, world: int = 1) -> list[str]:
    names = sorted(manifest["files"])
    got = _hash_files(folder, names, rank, world)
    return [f"{folder / n}: sha256 {got[n]['sha256'][:12]}... does not match the manifest's "
            f"{manifest['files'][n]['sha256'][:12]}... (corrupted)" for n in names
            if got[n]["sha256"] != manifest["files"][n]["sha256"]]


# --------------------------------------------------------------------------------------------------- listing

@dataclass
class Candidate:
    path: Path
    step: int
    manifest: dict | None = None
    problem: str | None = None


def list_checkpoints(root: Path) -> tuple[list[Candidate], list[Candidate]]:
    """(complete ones newest first, incomplete ones), judged by manifest and file sizes (no hashing)."""
    complete, incomplete = [], []
    if not root.is_dir():
        return complete, incomplete
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith(TMP_PREFIX):
            incomplete.append(Candidate(p, _step_of(p.name[len(TMP_PREFIX):]),
                                        problem=f"{p}: incomplete (still named {p.name}: the run stopped while "
                                                "writing it)"))
            continue
        if not p.name.startswith(PREFIX):
            continue
        c = Candidate(p, _step_of(p.name[len(PREFIX):]))
        try:
            c.manifest = read_manifest(p)
            bad = size_problems(p, c.manifest)
            if bad:
                c.problem = "; ".join(bad)
        except CheckpointError as exc:
            c.problem = str(exc)
        (incomplete if c.problem else complete).append(c)
    complete.sort(key=lambda c: c.step, reverse=True)
    return complete, incomplete


def _step_of(suffix: str) -> int:
    try:
        return int(suffix)
    except ValueError:
        return -1


BEST_FILE = "best.json"


def best_checkpoint(root: Path) -> dict | None:
    """What checkpoint.keep_best kept: {"step", "metric", "value"}, or None."""
    try:
        return json.loads((root / BEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def mark_best(root: Path, step: int, metric: str, value: float) -> None:
    """Record step's checkpoint as the best (rank 0, after the checkpoint is complete); prune keeps it."""
    tmp = root / (BEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "metric": metric, "value": value}))
    os.replace(tmp, root / BEST_FILE)


def prune(root: Path, keep_last: int | None, log) -> None:
    """Delete the oldest complete checkpoints beyond keep_last (and the leftovers of interrupted writes). The
    newest complete checkpoint is never deleted: keep_last is at least 1; nor is the keep_best one."""
    complete, incomplete = list_checkpoints(root)
    best = (best_checkpoint(root) or {}).get("step")
    if keep_last is not None:
        for c in [c for c in complete[max(1, keep_last):] if c.step != best]:
            shutil.rmtree(c.path, ignore_errors=True)
            log(f"[checkpoint] removed {c.path.name} (keep_last {keep_last})")
    newest = complete[0].step if complete else -1
    for c in incomplete:
        if c.path.name.startswith(TMP_PREFIX) and c.step < newest:
            shutil.rmtree(c.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- writing

@dataclass
class TrainerState:
    """Everything besides model and optimizer that makes a resumed run continue exactly."""
    step: int = 0
    samples_seen: int = 0  # global sample positions consumed: independent of the number of ranks
    scheduler: dict = field(default_factory=dict)
    best_eval_loss: float | None = None
    best_value: float | None = None  # checkpoint.keep_best's metric at the best checkpoint so far
    best_step: int | None = None
    stream_positions: list = field(default_factory=list)  # data.streaming: records consumed, per rank
    bad_evals: int = 0
    last_eval: dict = field(default_factory=dict)
    eval_before: dict = field(default_factory=dict)
    strategy_extra: dict = field(default_factory=dict)  # e.g. the fp16 loss scale
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient (fp16 overflow), whole run
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    model_build: dict = field(default_factory=dict)  # num_labels, label names: what export needs to rebuild

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerState":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(*, root: Path, strategy, trainer_state: TrainerState, recipe_yaml: str, tokenizer,
                    topo, meta: dict, keep_last: int | None, log) -> dict:
    """Write, hash, manifest, rename; then read the manifest back and prune. A collective: every rank calls it."""
    t0 = time.perf_counter()
    step = trainer_state.step
    tmp, final = root / f"{TMP_PREFIX}{step:08d}", step_dir(root, step)
    if topo.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of an earlier, interrupted attempt
    _agree(topo, _space_problem(root, step) if topo.is_main else None, tmp)
    error = None
    try:
        if topo.is_main:
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        strategy.save_state(tmp / "state")
        watchdog.beat()  # each part of a checkpoint may take up to timeout_seconds (see ProgressWatchdog)
        faults.inject("hang-checkpoint", step, topo.rank)
        (tmp / "rng" / f"rank-{topo.rank}.json").write_text(json.dumps(rng_state()))
        if topo.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state.__dict__, indent=1))
            (tmp / "recipe.yaml").write_text(recipe_yaml)
            tokenizer.save_pretrained(tmp / "tokenizer")
        faults.inject("checkpoint-write", step, topo.rank)
    except (Exception, DcpCheckpointException) as exc:  # disk full, quota, permissions: every rank must hear of
        error = f"rank {topo.rank}: {_root_cause(exc)}"  # it now, not wait for a collective timeout
    _agree(topo, error, tmp, f"writing the checkpoint of step {step} failed")
    if strategy.trainable_only:
        _verify_adapter(tmp / "state", strategy, topo)
    names = _files(tmp) if topo.is_main else None
    box = [names]
    dist.broadcast_object_list(box, src=0)
    watchdog.beat()
    files = _hash_files(tmp, box[0], topo.rank, topo.world_size)
    watchdog.beat()
    if topo.is_main:
        manifest = {"format": FORMAT, "step": step, "samples_seen": trainer_state.samples_seen,
                    "world_size": topo.world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta,
                    "files": files}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier attempt: replaced by this complete one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        # Verify what a resume will read: the manifest, and every file at its recorded size.
        bad = size_problems(final, read_manifest(final))
        if bad:
            raise CheckpointError("checkpoint verification failed: " + "; ".join(bad))
        prune(root, keep_last, log)
    dist.barrier()
    total = sum(f["bytes"] for f in files.values())
    seconds = time.perf_counter() - t0
    log(f"[checkpoint] saved step {step} to {final} ({total / 2**20:.1f} MiB, {len(files)} files, {seconds:.1f} s)")
    return {"path": str(final), "bytes": total, "files": len(files), "seconds": round(seconds, 3)}


def _root_cause(exc: BaseException) -> str:
    """The OSError under a library's wrapping (DCP gathers every rank's failure into one exception)."""
    seen = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, OSError):
            return f"{type(e).__name__}: {e}"
        for failure in getattr(e, "failures", {}).values():  # DCP: {rank: (exception, traceback)}
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
        todo += [e.__cause__, e.__context__]
    inner = seen[-1] if len(seen) > 1 else exc
    return f"{type(inner).__name__}: {(str(inner).splitlines() or [''])[0]}"


def _space_problem(root: Path, step: int) -> str | None:
    """Refuse to start a checkpoint that cannot fit: the newest complete one is the size estimate."""
    complete, _ = list_checkpoints(root)
    if not complete:
        return None
    need = sum(f["bytes"] for f in complete[0].manifest["files"].values())
    free = shutil.disk_usage(root).free
    if free >= need * 1.05:
        return None
    return (f"{root}: {free / 2**20:.1f} MiB free, but the last checkpoint took {need / 2**20:.1f} MiB, so the "
            f"checkpoint of step {step} would not fit")


def _agree(topo, problem: str | None, tmp: Path, what: str = "not enough disk space") -> None:
    """Every rank learns whether any rank failed; then all raise the same error and the partial folder goes."""
    problems: list = [None] * topo.world_size
    if topo.world_size > 1:
        dist.all_gather_object(problems, problem)
    else:
        problems = [problem]
    problems = [p for p in problems if p]
    if not problems:
        return
    if topo.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    complete, _ = list_checkpoints(tmp.parent)
    kept = f"the newest complete checkpoint, {complete[0].path.name}, is intact" if complete \
        else "no earlier checkpoint exists"
    # Libraries often lose the OSError on the way (C++ writers, exceptions pickled between ranks): say how much
    # room there is, which is what the user needs to know.
    free = shutil.disk_usage(tmp.parent).free
    raise CheckpointError(f"{what}: {'; '.join(dict.fromkeys(problems))}. {free / 2**20:.1f} MiB free under "
                          f"{tmp.parent}. Nothing was overwritten: {kept}. Free space there (or point output_dir "
                          "elsewhere) and run again with checkpoint.resume: auto")


def _verify_adapter(folder: Path, strategy, topo) -> None:
    """An adapter checkpoint must hold every trainable tensor, non-empty and equal to the live weights (saving
    under ZeRO-3 without gathering writes empty tensors: a failure that otherwise shows only at resume)."""
    live = strategy.trainable_state()  # a collective
    problem = None
    if topo.is_main:
        stored = strategy.read_trainable(folder)
        for name, value in live.items():
            got = stored.get(name)
            if got is None or got.numel() == 0:
                problem = f"{folder}: the adapter tensor {name} is {'missing' if got is None else 'empty'}"
            elif got.shape != value.shape or not torch.equal(got.to(value.dtype), value):
                diff = (got.float() - value.float()).abs().max() if got.shape == value.shape else "shape"
                problem = f"{folder}: the stored {name} differs from the live weights ({diff})"
            if problem:
                break
    box = [problem]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError("checkpoint verification failed: " + box[0])


# --------------------------------------------------------------------------------------------------- choosing

def candidates(resume: str, output_dir: str | Path, log) -> list[Candidate]:
    """What `checkpoint.resume` points at, by manifest and file sizes (no hashing), newest first.

    `auto`: every complete checkpoint under output_dir/checkpoints (incomplete or damaged ones are skipped, each
    with a warning naming the file and the reason); the caller takes the newest that also verifies. A run
    directory: its complete checkpoints likewise. A checkpoint folder: that one, or a CheckpointError.
    """
    path = checkpoints_root(output_dir) if resume == "auto" else Path(resume)
    if resume == "auto" or ((path / "checkpoints").is_dir() and not (path / MANIFEST).exists()):
        complete, incomplete = list_checkpoints(path if resume == "auto" else path / "checkpoints")
        for c in incomplete:
            log(f"[checkpoint] warning: skipping {c.problem}")
        if not complete and resume != "auto":
            raise CheckpointError(f"checkpoint.resume: {path} holds no complete checkpoint")
        return complete
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {path} does not exist; give a checkpoints/step-N folder, "
                              "a run directory, or auto")
    manifest = read_manifest(path)
    bad = size_problems(path, manifest)
    if bad:
        raise CheckpointError("; ".join(bad))
    return [Candidate(path, manifest["step"], manifest)]


def choose_resume(resume: str, output_dir: str | Path, log) -> Candidate | None:
    """The newest of `candidates` (sizes checked), or None for `auto` with no complete checkpoint."""
    found = candidates(resume, output_dir, log)
    return found[0] if found else None


def compatibility_problems(manifest: dict, meta: dict) -> list[str]:
    """Why a checkpoint cannot continue under this recipe (empty when it can)."""
    problems = []
    if manifest.get("model_config_sha") != meta.get("model_config_sha"):
        problems.append(f"the checkpoint was trained from a different model ({manifest.get('model_path')}, config "
                        f"{str(manifest.get('model_config_sha'))[:12]}) than model.path {meta.get('model_path')} "
                        f"(config {str(meta.get('model_config_sha'))[:12]}); set model.path to the checkpoint's model")
    if manifest.get("method") != meta.get("method"):
        problems.append(f"the checkpoint trained method {manifest.get('method')!r}, the recipe asks for "
                        f"{meta.get('method')!r}; set method to match, or export the checkpoint (dist-ft export) and "
                        "start a new run from it")
    if manifest.get("state_format") != meta.get("state_format"):
        problems.append(f"the checkpoint was written by strategy {manifest.get('strategy')} "
                        f"({manifest.get('state_format')} format) and strategy {meta.get('strategy')} reads "
                        f"{meta.get('state_format')}: resume with distributed.strategy: {manifest.get('strategy')}, "
                        "or export it (dist-ft export CHECKPOINT OUT) and start a new run from OUT")
    return problems


def config_sha(model_path: Path) -> str:
    cfg = Path(model_path) / "config.json"
    return hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else "unknown"
