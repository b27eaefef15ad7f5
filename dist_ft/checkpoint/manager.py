"""A run's checkpoints in one place: what to resume from (chosen, verified, loaded), saving (keep-last, keep-best),
and the final model.

The trainer calls `choose()` before the model is built (a backend may need to prepare its loading), `load()` once
after, `save()` per checkpoint and `save_final()` at the end. Options come in as arguments from the recipe; nothing
travels through environment variables. The backend's state format is the strategy's business (`save_state` /
`load_state`); the files around it (manifest, trainer state, RNG, recipe, tokenizer) are store.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from .. import safe_load
from ..config import Recipe, dump_recipe
from . import hf_folder, store
from .rng import restore_rng
from .store import Candidate, CheckpointError, TrainerState


class CheckpointManager:
    """One per run, on every rank; every method is a collective unless it says otherwise."""

    def __init__(self, recipe: Recipe, *, topo, strategy, tokenizer, model_path: Path, log):
        self.cfg = recipe.checkpoint
        self.recipe_yaml = dump_recipe(recipe)
        self.output_dir = Path(recipe.output_dir)
        self.root = store.checkpoints_root(recipe.output_dir)
        self.topo, self.strategy, self.tokenizer, self.log = topo, strategy, tokenizer, log
        self.streaming = recipe.data.streaming
        # What a checkpoint records about the run, and what a resume must agree with.
        self.meta = {"strategy": strategy.name, "state_format": strategy.state_format, "method": recipe.method.kind,
                     "model_path": str(model_path), "model_config_sha": store.config_sha(model_path),
                     "precision": recipe.distributed.precision}
        self.resumed: Candidate | None = None
        self.load_seconds: float | None = None
        self.final_save: dict | None = None  # rank 0: what save_final wrote and gathered at most at once

    # ------------------------------------------------------------------------------------------------ resume
    def choose(self) -> Candidate | None:
        """The verified checkpoint to continue from, chosen before the model is built. An explicit path fails
        loudly; `auto` skips damaged checkpoints with a warning naming the file, and starts fresh (saying so) only
        when there is no complete one at all."""
        if self.cfg.resume is None:
            return None
        cand = self._first_verified(self._candidates())
        if cand is not None:
            safe_load.allow(self.cfg.allow_pickle)
            self.strategy.prepare_resume(cand.path / "state", cand.manifest, allow_pickle=self.cfg.allow_pickle)
        self.resumed = cand
        return cand

    def _candidates(self) -> list[Candidate]:
        box: list = [None]
        if self.topo.is_main:
            try:
                box[0] = store.candidates(self.cfg.resume, self.output_dir, self.log)
            except CheckpointError as exc:
                box[0] = str(exc)
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise CheckpointError(box[0])
        return box[0]

    def _first_verified(self, found: list[Candidate]) -> Candidate | None:
        explicit = self.cfg.resume != "auto"
        for cand in found:
            problems = store.compatibility_problems(cand.manifest, self.meta)
            if problems:
                raise CheckpointError(f"{cand.path} cannot continue under this recipe:\n  - " + "\n  - ".join(problems))
            if self.cfg.verify == "sha256":
                problems = store.checksum_problems(cand.path, cand.manifest, self.topo.rank, self.topo.world_size)
            if not problems:
                self._main_log(f"[checkpoint] resuming from {cand.path} (step {cand.step}, written by "
                               f"{cand.manifest['world_size']} x {cand.manifest['strategy']})")
                return cand
            if explicit:
                raise CheckpointError("; ".join(problems))
            self.log(f"[checkpoint] warning: skipping {cand.path}: " + "; ".join(problems))
        self._main_log(f"[checkpoint] no complete checkpoint in {self.root}: starting from the base model "
                       f"{self.meta['model_path']}")
        return None

    def load(self, state: TrainerState, scheduler) -> TrainerState:
        """Model, optimizer, scheduler and the backend's extras from the chosen checkpoint (after setup); `state`
        unchanged when there is none."""
        if self.resumed is None:
            return state
        t0, folder = time.perf_counter(), self.resumed.path
        self._load_state(folder, self.resumed.manifest)
        state = TrainerState.from_dict(json.loads((folder / "trainer_state.json").read_text()))
        scheduler.load_state_dict(state.scheduler)
        self.strategy.load_extra_state(state.strategy_extra)
        if self.streaming and len(state.stream_positions) != self.topo.world_size:
            raise CheckpointError(f"{folder}: a streamed run resumes on the number of ranks that wrote it "
                                  f"({len(state.stream_positions)}), each reading its own shards; this run has "
                                  f"{self.topo.world_size}")
        self.load_seconds = round(time.perf_counter() - t0, 3)
        self._main_log(f"[checkpoint] loaded step {state.step} in {self.load_seconds:.1f} s; continuing at sample "
                       f"{state.samples_seen:,}")
        return state

    def _load_state(self, folder: Path, manifest: dict) -> None:
        try:
            self.strategy.load_state(folder / "state", manifest)
        except CheckpointError:
            raise
        except Exception as exc:  # the backend's own error, with the folder that caused it
            raise CheckpointError(f"{folder / 'state'}: could not be loaded: {type(exc).__name__}: {exc}") from exc

    def restore_rng(self) -> None:
        """Each rank continues its own random streams (this process only). Called right before the first step:
        anything between the load and the loop that draws random numbers (a measured matmul, a library's init)
        would otherwise shift every dropout mask after a resume."""
        if self.resumed is not None:
            restore_rng(self.resumed.path, self.topo.rank)

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, state: TrainerState, *, stream_position=None, global_batch: int, log=None) -> dict:
        """Checkpoint `state.step`: the backend's state, every rank's RNG, the trainer state; keep_last applied."""
        if stream_position is not None:  # a stream's place on every rank (each reads its own shards)
            positions = [stream_position] * self.topo.world_size
            if self.topo.world_size > 1:
                dist.all_gather_object(positions, stream_position)
            state.stream_positions = positions
        state.strategy_extra = self.strategy.extra_state()
        return store.save_checkpoint(root=self.root, strategy=self.strategy, trainer_state=state,
                                     recipe_yaml=self.recipe_yaml, tokenizer=self.tokenizer, topo=self.topo,
                                     meta={**self.meta, "global_batch": global_batch}, keep_last=self.cfg.keep_last,
                                     log=log or self.log)

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """Record the (already written) checkpoint of `step` as the best; keep_last never removes it."""
        if self.topo.is_main:
            store.mark_best(self.root, step, metric, value)
        dist.barrier()

    def load_best(self) -> dict:
        """checkpoint.final: best: load the keep_best checkpoint's weights into the model; its best.json record."""
        best = store.best_checkpoint(self.root)
        folder = store.step_dir(self.root, best["step"])
        self._load_state(folder, store.read_manifest(folder))
        return best

    def save_final(self) -> Path:
        """output_dir/final: a folder `from_pretrained` loads (or a PEFT adapter folder), written atomically by
        rank 0. No rank ever holds more than one gathered unit (a block, the embeddings) of the model: an adapter's
        folder holds only the trainable tensors, and a full model is written one unit at a time (hf_folder.py).
        What it cost is left in `final_save`."""
        final = self.output_dir / "final"
        tmp = final.with_name(final.name + ".tmp")
        model = self.strategy.unwrap()
        is_adapter = hasattr(model, "peft_config")
        t0 = time.perf_counter()
        if self.topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_adapter:
            # A collective: only the trainable tensors are gathered; the frozen base stays sharded.
            state = self.strategy.trainable_state()
            if self.topo.is_main:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                size = sum(t.numel() * t.element_size() for t in state.values())
                written = hf_folder.UnitsWritten(files=1, tensors=len(state), total_bytes=size,
                                                 largest_unit_bytes=size, largest_unit="adapter")
            del state
        else:
            units = hf_folder.save_units(model)
            if self.topo.is_main:
                tmp.mkdir(parents=True)
                hf_folder.write_config(tmp, model)
            written = hf_folder.write_units(tmp if self.topo.is_main else None, model, units,
                                            self.strategy.gathered_units(units))
        if self.topo.is_main:
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.final_save = {"seconds": round(time.perf_counter() - t0, 3), "files": written.files,
                               "tensors": written.tensors, "mb": round(written.total_bytes / 2**20, 1),
                               "largest_unit": written.largest_unit,
                               "largest_unit_mb": round(written.largest_unit_bytes / 2**20, 1)}
            self.log(f"[dist_ft] saved {'adapter' if is_adapter else 'model'} to {final} "
                     f"({self.final_save['mb']:,.1f} MiB in {written.files} file(s); at most "
                     f"{self.final_save['largest_unit_mb']:,.1f} MiB gathered at once: {written.largest_unit})")
        dist.barrier()
        return final

    def _main_log(self, msg: str) -> None:
        if self.topo.is_main:
            self.log(msg)
