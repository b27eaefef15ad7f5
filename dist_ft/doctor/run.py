"""`dist-ft doctor` on each rank: the checks in order, cheapest first, then the verdict on rank 0.

Runs where training would (under dist-ft launch, torchrun, accelerate, srun, the Slurm template), on the same
allocation, through the same start-up as `dist-ft train` (preflight, data prepared before the process group, the
group from the launcher's environment), so that what it finds is what the job would meet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from ..assets import resolve_model_path
from ..config import Recipe, RecipeError
from ..data.dataset import prepare_data
from ..distributed.launchers import launcher_problems
from ..distributed.rendezvous import PatientWait, open_store
from ..distributed.topology import init_distributed, read_ranks, shutdown
from ..model import LazyTokenizer
from ..preflight import preflight
from . import links, memory, parity, signal_path, storage, world
from .report import Check, render, verdict, write_json


def run_doctor(recipe: Recipe, *, source: str = "recipe", expect_world_size: int | None = None) -> int:
    t0 = time.perf_counter()
    preflight(recipe, source=source, check_output=False)  # a doctor may run before a resume, in a used folder
    conflicts = launcher_problems(recipe)
    if conflicts:
        raise RecipeError(conflicts, source)
    rank, world_size = read_ranks()[:2]
    main = rank == 0
    say = print if main else (lambda m: None)
    model_path = resolve_model_path(recipe.model.path)
    tok = LazyTokenizer(model_path, trust_remote_code=recipe.model.trust_remote_code)
    timeout = recipe.distributed.timeout_seconds
    store = open_store(rank, world_size, timeout)
    waits = PatientWait(store, rank, world_size, stall_seconds=timeout, log=say)
    data = waits.patient("data preparation", lambda: prepare_data(recipe, tok, log=lambda m: None))
    topo = init_distributed(timeout_seconds=timeout, threads_per_process=recipe.distributed.threads_per_process,
                            store=store)
    out = Path(recipe.output_dir)
    try:
        nodes = world.gather_nodes(topo.rank, topo.world_size)
        marks = world.WorldMarks(out, topo, nodes)
        if main:
            marks.leave()
        expect = world.expected_world(expect_world_size)
        checks: list[Check] = []

        def add(check: Check) -> Check:
            checks.append(check)
            say(f"[doctor] {check.name}: {check.status.upper()} {check.summary}")
            return check

        add(world.check_world(topo, nodes, expect))
        mem = add(memory.check_memory(topo, recipe, nodes))
        add(links.check_links(topo, nodes))
        from ..plan import PlanError, analyze_model
        try:
            facts = analyze_model(recipe)
        except PlanError as exc:  # a model the planner does not read (an image classifier): say so, do not block
            facts = None
            add(Check("collectives", "skip", f"not timed: {exc}"))
        if facts is not None:
            add(links.check_collectives(topo, recipe, facts))
        world_id = [marks.me]
        dist.broadcast_object_list(world_id, src=0)
        store_check, io = storage.check_storage(topo, recipe, nodes, out, world_id[0])
        add(store_check)
        add(signal_path.check_signal(topo, nodes, io))
        if mem.failed:  # every rank read the same gathered figures, so all skip together
            add(Check("loss parity", "skip", "not run: a rank lacks the memory to build the model"))
        else:
            add(parity.check_parity(topo, recipe, nodes, data, tok, model_path, expect[0]))
        seen = [marks.check() if main else None]
        dist.broadcast_object_list(seen, src=0)
        add(seen[0])
        code, line = verdict(checks)
        if main:
            marks.finish()
            meta = {"seconds": time.perf_counter() - t0, "world_size": topo.world_size, "launcher": topo.launcher,
                    "ranks": [str(n) for n in nodes], "recipe": source}
            path = write_json(out / "doctor" / "doctor.json", checks, meta)
            print("\n" + render(checks), flush=True)
            print(line, flush=True)
            print(f"[doctor] {'wrote ' + str(path) if path else 'could not write doctor.json under ' + str(out)}"
                  f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            if not path:
                print(json.dumps({"verdict": "fail" if code else "pass", "line": line}), flush=True)
        return code
    finally:
        shutdown()
