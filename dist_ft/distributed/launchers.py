"""Agreement between the launcher and the recipe.

Launchers only start processes; the recipe alone configures the run. But a user who starts a zero3 accelerate
config with a ddp recipe (or the other way round) should hear about it instead of getting a run that is not the
one they meant. The launcher's own variables are read here only to check that agreement, never as settings.
"""

from __future__ import annotations

import json
import os
import sys


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


def launcher_problems(strategy: str, env: dict[str, str] | None = None) -> list[str]:
    env = dict(os.environ if env is None else env)
    problems = []
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if not strategy.startswith("zero"):
            problems.append(f"launched with an accelerate DeepSpeed config, but distributed.strategy is {strategy}; "
                            "use launch/accelerate/{strategy}.yaml or change the recipe")
        else:
            path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
            try:
                stage = json.load(open(path))["zero_optimization"]["stage"] if path else None
            except (OSError, ValueError, KeyError, TypeError):
                stage = None
            if stage not in (None, "auto") and int(stage) != int(strategy[-1]):
                problems.append(f"the accelerate config's DeepSpeed file {path} is ZeRO stage {stage} but "
                                f"distributed.strategy is {strategy}; use launch/accelerate/{strategy}.yaml")
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and strategy != "fsdp":
        problems.append(f"launched with an accelerate FSDP config, but distributed.strategy is {strategy}; use "
                        f"launch/accelerate/{strategy}.yaml or change the recipe")
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
