"""Agreement between the launcher and the recipe.

Launchers only start processes; the recipe alone configures the run. But a user who starts a zero3 accelerate
config with a ddp recipe (or the other way round) should hear about it instead of getting a run that is not the
one they meant. The launcher's own variables are read here only to check that agreement, never as settings
(accelerate_config.py compares an accelerate launch's config, field by field). Where the launcher's config names
a backend (accelerate_backend: an FSDP config, a DeepSpeed one with its ZeRO stage, a multi-GPU one for a recipe
whose backend starts that way), what that backend's spec refuses is refused here too, as the recipe check refuses
it for the recipe's own backend.
"""

from __future__ import annotations

import os
import sys

from ..config import Recipe
from .accelerate_config import accelerate_backend, accelerate_problems
from .spec import spec_problems


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N to the script's arguments; the rank is read from the
    environment instead (LOCAL_RANK), so drop it."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        out.append(a)
    return out


def launcher_problems(recipe: Recipe, env: dict[str, str] | None = None) -> list[str]:
    """Every way the launcher that started this process disagrees with the recipe (empty when none). Run on every
    rank before the model loads; the trainer refuses to start on any."""
    env = dict(os.environ if env is None else env)
    problems = accelerate_problems(recipe, env)
    backend = accelerate_backend(recipe, env)
    if backend is not None:
        problems += [f"accelerate config asks for {backend.name}, which refuses: {p}"
                     for p in spec_problems(recipe, backend)]
    nodes, world = env.get("SLURM_STEP_NUM_NODES", ""), env.get("WORLD_SIZE", "")
    if nodes.isdigit() and world.isdigit() and int(world) < int(nodes):
        # Every node would train alone, each its own "rank 0" writing the same files: a silent waste of the job.
        problems.append(f"this Slurm job step spans {nodes} nodes but the launcher started a world of {world} "
                        "rank(s): each node is training alone. Give the launcher the node count and the first "
                        "node's address (slurm/dist-ft.sbatch does); with accelerate and DeepSpeed also "
                        "--deepspeed_multinode_launcher standard")
    return problems


def warn(msg: str) -> None:
    print(f"[dist_ft] warning: {msg}", file=sys.stderr, flush=True)
