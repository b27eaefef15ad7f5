"""`dist-ft train`: everything before the Trainer, cheap and checkable first. The recipe and everything it points at
are validated; the tokenizer is loaded; the data tokenized (cached) before any process group exists; the process
group started; then the Trainer builds the model through the strategy, evaluates, trains, evaluates and saves
`final/`.

    python -m dist_ft train configs/demo.yaml training.max_steps=10
"""

from __future__ import annotations

import gc
import os
import sys
import time

from .. import faults
from ..assets import resolve_model_path
from ..config import Recipe, RecipeError
from ..data.dataset import forgetting_examples, prepare_data
from ..data.images import channels_of, prepare_images
from ..distributed import watchdog
from ..distributed.launchers import launcher_problems
from ..distributed.rendezvous import PatientWait, open_store
from ..distributed.topology import init_distributed, read_ranks, shutdown
from ..model import LazyTokenizer, load_image_processor
from ..preflight import preflight
from .trainer import Trainer, TrainResult


def run_training(recipe: Recipe, *, source: str = "recipe") -> TrainResult:
    t_start = time.perf_counter()
    quiet = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0
    # 1. Everything that can be wrong with the recipe, its files and this machine, before any real work.
    preflight(recipe, source=source)
    conflicts = launcher_problems(recipe)
    if conflicts:
        raise RecipeError(conflicts, source)
    model_path = resolve_model_path(recipe.model.path)
    # Loaded when first used: a run whose tokens come from the cache never needs it in memory. An image classifier's
    # counterpart is the folder's image processor (saved with checkpoints where a tokenizer would be).
    tok = load_image_processor(model_path) if recipe.model.task == "image_classification" else \
        LazyTokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
    # 2. Tokenize before the process group exists, each rank as long as it takes: peers wait for each other on the
    # launcher's store, as long as each is alive (rendezvous.py), never in a collective that would time out.
    rank, world = read_ranks()[:2]
    timeout = recipe.distributed.timeout_seconds
    store = open_store(rank, world, timeout)
    waits = PatientWait(store, rank, world, stall_seconds=timeout, log=(lambda m: None) if quiet else print)

    def prepare():
        faults.inject("slow-data", 0, rank)
        faults.inject("hang-data", 0, rank)
        log = (lambda m: None) if quiet else print
        if recipe.model.task == "image_classification":  # images, processed in memory on each rank (images.py)
            return prepare_images(recipe, tok, channels=channels_of(model_path), log=log), []
        data = prepare_data(recipe, tok, log=log)
        return data, forgetting_examples(recipe, tok) if recipe.eval.forgetting else []

    data, forgetting = waits.patient("data preparation", prepare)
    # 3. Processes and devices.
    topo = init_distributed(timeout_seconds=timeout, threads_per_process=recipe.distributed.threads_per_process,
                            store=store)
    trainer = None
    try:
        trainer = Trainer(recipe, topo, tok, data, model_path, forgetting, t_start, waits=waits)
        return trainer.train()
    finally:
        # The run is over (a peer may be gone already): tearing down takes seconds, so a stuck teardown ends sooner.
        watchdog.phase("the process group's shutdown", limit=watchdog.TEARDOWN_S, note=sys.exc_info()[1])
        # Model, optimizer and wrappers go first, while the group still runs: the Trainer's parts refer to each other,
        # so only the collector frees them, and a wrapper collected after the group was destroyed can take its last
        # reference with it, whose destructor then joins gloo threads waiting for the GIL this thread holds.
        trainer = None
        gc.collect()
        shutdown()
        watchdog.phase("the exit", limit=watchdog.TEARDOWN_S, note=sys.exc_info()[1])
        faults.inject("hang-exit", 0, topo.rank)
