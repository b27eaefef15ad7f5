"""`dist-ft plan`: memory per rank and speed of a recipe on a given cluster, computed on a laptop before any run.

    dist-ft plan RECIPE.yaml --nodes N --gpus-per-node G [--gpu H100] [--gpu-memory-gib M] [--cpu-memory-gib C]
                 [--all-strategies] [--mfu 0.4] [--intra-gbps 300] [--inter-gbps 25] [--json] [overrides]
    dist-ft plan RECIPE.yaml --simulate [--world-size 8,64,1024] [--json] [overrides]   (simulate.py)
    python -m dist_ft.plan RECIPE.yaml ...               (the same)

The recipe is loaded and checked as `dist-ft train` would (dist_ft.config), so a recipe its backend's spec refuses
is refused here with the spec's reason, before any model is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .cluster import GPU_CHOICES, make_cluster
from .compare import compare, recommend
from .constants import CPU_GLOO_GBPS, DEFAULT_MFU, INTER_NODE_GBPS, INTRA_NODE_GBPS, PlanError
from .model import analyze_model
from .render import plan_to_dict, render, render_comparison
from .verdict import make_plan


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to the YAML recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (ranks) per node; processes with --gpu cpu")
    p.add_argument("--gpu", default=None, type=str, help=f"one of {', '.join(GPU_CHOICES)} (default: this machine's "
                   "GPU, else H100)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="device memory per rank (default: the --gpu's)")
    p.add_argument("--cpu-memory-gib", type=float, default=None, help="host memory per node (checked when given)")
    p.add_argument("--all-strategies", action="store_true", help="compare every strategy x offload x method")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation assumed (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device (default: datasheet)")
    p.add_argument("--intra-gbps", type=float, default=None,
                   help=f"GB/s per rank within a node (default {INTRA_NODE_GBPS:g}; with --gpu cpu {CPU_GLOO_GBPS:g}: gloo)")
    p.add_argument("--inter-gbps", type=float, default=INTER_NODE_GBPS, help="GB/s per rank across nodes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--simulate", action="store_true", help="build the real model on the meta device, shard it with "
                   "the backend's real code under a fake process group of --world-size ranks, and set rank 0's bytes "
                   "beside the plan's (fsdp, ddp; DeepSpeed is not simulated)")
    p.add_argument("--world-size", default="8,64,1024", help="ranks for --simulate, one size or a list: 8,64,1024")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on dist-ft's subcommands (cli.build_parser): `add_parser(sub)`."""
    p = subparsers.add_parser("plan", help="memory per rank and speed of a recipe on a cluster, without running it")
    _add_arguments(p)
    p.set_defaults(fn=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from ..config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, list(args.overrides or []))
        if args.simulate:
            return _cmd_simulate(args, recipe)
        cluster = make_cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
                               gpu_memory_gib=args.gpu_memory_gib, cpu_memory_gib=args.cpu_memory_gib, mfu=args.mfu,
                               intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps, peak_tflops=args.peak_tflops)
        facts = analyze_model(recipe)
        plan = make_plan(recipe, cluster, facts=facts)
        plans = compare(recipe, cluster, facts) if args.all_strategies else []
    except (RecipeError, PlanError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = plan_to_dict(plan)
        if plans:
            best, same = recommend(plans), recommend(plans, recipe.method.kind)
            out["alternatives"] = [plan_to_dict(p) | {"label": p.label} for p in plans]
            out["recommendation"] = best.label if best else None
            out["recommendation_same_method"] = same.label if same else None
        print(json.dumps(out, default=str))
        return 0
    print(f"dist-ft plan: {args.recipe}")
    print(render(plan))
    if plans:
        print()
        print(render_comparison(plans, recipe))
    return 0


def _cmd_simulate(args, recipe) -> int:
    """`--simulate`: the sharded model's bytes per rank beside the plan's formulas (simulate.py)."""
    from .simulate import parse_worlds, render_simulation, simulate, simulation_to_dict

    sim = simulate(recipe, parse_worlds(args.world_size))
    if args.json:
        print(json.dumps(simulation_to_dict(sim)))
    else:
        print(f"dist-ft plan --simulate: {args.recipe}")
        print(render_simulation(sim))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dist-ft plan", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    args, extra = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    return cmd_plan(args)
