"""`dist-ft plan --simulate`: the recipe's real model built on the meta device, sharded by the backend's real code
under a fake process group of N ranks, and rank 0's bytes read off its shards next to the plan's formulas.

    dist-ft plan RECIPE.yaml --simulate --world-size 8,64,1024 [overrides]
    (the worker, `python -m dist_ft.plan.simulate`, is started by `simulate`; it reads its job on stdin)

What runs, per world size N, in a fresh python process (so the fake group never meets a training process group; one
process serves every N of a call: the group is destroyed, re-created and the model rebuilt for each):
  1. ModelBuilder.build_meta, the method applied as training applies it, everything on the meta device (no memory,
     no weights: the config comes from the plan's resolve_config, so builtin:NAME needs no download);
  2. activation checkpointing when the recipe asks (it comes before sharding in the wrap order);
  3. the backend's `meta_shard` (its spec; FSDP2: `shard_model`, the function its setup calls) under
     `dist.init_process_group("fake", world_size=N)` at rank 0: no communication, each shard is cut from shapes;
  4. a zero gradient on every trainable shard (what FSDP2's reduce-scatter leaves: the parameter's placement and
     dtype) and one step of dist_ft's optimizer (train/optim.make_optimizer), which creates its state.
Rank 0's bytes are the local shards of every parameter, of the gradients and of the optimizer's state tensors.
Rank 0 is the most loaded rank: FSDP2 splits dim 0 like torch.chunk and pads every rank's storage to rank 0's chunk.

Speed: FSDP2 cuts every rank's chunk of each parameter, one new empty tensor per rank past the last row: on meta
~10 us x N per parameter, 30 s for Llama-3-70B with LoRA at 1,024 ranks (LoRA's A has r rows). The worker swaps
`_chunk_with_empty` for `LazyChunks`, the same chunks built when read (FSDP2 reads its own rank's and rank 0's;
tests/test_plan_simulate.py checks it against torch's), which leaves ~1-2 s per model and world size.

Not simulated: DeepSpeed's stages (zero1/2/3) partition through their own communication and flat buffers, which
need a real process group and real memory; DDP shards nothing (every rank holds the meta model as built).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .constants import GIB, PlanError

_MARK = "SIMULATED "
QUANTITIES = ("parameters", "gradients", "optimizer")


@dataclass
class SimRow:
    world: int
    quantity: str       # parameters | gradients | optimizer
    simulated: float    # bytes on rank 0, read off its shards
    planned: float      # the plan's state_bytes row (device + CPU)
    even: float = 0.0   # the whole model's bytes / N where the backend shards this quantity (no padding, no rows)

    @property
    def ratio(self) -> float:
        return self.simulated / self.planned if self.planned else (1.0 if not self.simulated else float("inf"))


@dataclass
class Simulation:
    label: str                  # model, method, strategy, precision
    how: str                    # what sharded the model
    rows: list[SimRow]
    seconds: dict[int, float] = field(default_factory=dict)   # world size -> build + shard + step, in the worker

    def row(self, world: int, quantity: str) -> SimRow:
        return next(r for r in self.rows if r.world == world and r.quantity == quantity)


def parse_worlds(text: str) -> list[int]:
    """`8,64,1024` -> [8, 64, 1024]."""
    try:
        worlds = [int(w) for w in str(text).replace(" ", "").split(",") if w]
    except ValueError:
        raise PlanError(f"--world-size: {text!r} is not a comma-separated list of integers") from None
    if not worlds or min(worlds) < 1:
        raise PlanError(f"--world-size: {text!r}: give one or more sizes >= 1, e.g. 8,64,1024")
    return worlds


def how_sharded(recipe) -> str:
    """What shards the recipe's model in the simulation; PlanError when its backend cannot be simulated."""
    from ..distributed.spec import spec_for

    spec = spec_for(recipe.distributed.strategy)
    if spec.meta_shard:
        return f"{spec.meta_shard} under a fake process group, rank 0's shards"
    if not spec.shards:
        return "nothing sharded: every rank holds the whole model"
    raise PlanError(f"--simulate: {spec.name} partitions through DeepSpeed's own communication and flat buffers, "
                    "which need a real process group and real memory; not simulated (use fsdp or ddp to simulate)")


def simulate(recipe, worlds: list[int], *, timeout: float = 1800.0) -> Simulation:
    """Run the worker on `recipe` for every world size and set its bytes beside the plan's state_bytes rows."""
    return simulate_all([recipe], worlds, timeout=timeout)[0]


def simulate_all(recipes: list, worlds: list[int], *, timeout: float = 1800.0) -> list[Simulation]:
    """`simulate` for several recipes in one worker process (python, torch and peft imported once)."""
    from ..config import dump_recipe

    hows = [how_sharded(r) for r in recipes]
    for r in recipes:
        if r.training.optimizer != "adamw":
            raise PlanError(f"--simulate steps torch's AdamW on meta tensors; training.optimizer "
                            f"{r.training.optimizer} is not simulated")
    job = json.dumps({"recipes": [dump_recipe(r) for r in recipes], "worlds": list(worlds)})
    try:
        proc = subprocess.run([sys.executable, "-m", __name__], input=job, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PlanError(f"--simulate: the worker ran past {timeout:.0f} s") from None
    measured = [json.loads(line[len(_MARK):]) for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode or len(measured) != len(worlds) * len(recipes):
        raise PlanError(f"--simulate: the worker failed (exit {proc.returncode}):\n" + proc.stderr[-3000:])
    return [_compare(r, how, [m for m in measured if m["recipe"] == i]) for i, (r, how) in
            enumerate(zip(recipes, hows))]


def _compare(recipe, how: str, measured: list[dict]) -> Simulation:
    """The worker's bytes beside the plan's state_bytes rows (device + CPU) for the same recipe and world size."""
    from .counting import method_counts
    from .memory import byte_rules, state_bytes
    from .model import analyze_model

    d, m, opt = recipe.distributed, recipe.method, recipe.training.optimizer
    mc = method_counts(analyze_model(recipe), recipe)
    rules = byte_rules(d.strategy, d.precision, opt)
    rows, seconds = [], {}
    for got in measured:
        plan = {r.key: r.device + r.cpu for r in state_bytes(mc, rules, d.strategy, d.offload, got["world"], opt)}
        rows += [SimRow(got["world"], q, got[q], plan[q], got["even_" + q]) for q in QUANTITIES]
        seconds[got["world"]] = got["seconds"]
    return Simulation(f"{recipe.model.path}, {m.kind}, {d.strategy}, {d.precision}", how, rows, seconds)


def render_simulation(sim: Simulation) -> str:
    out = [f"simulated: {sim.label}", f"  sharded by {sim.how}",
           f"  {'ranks':>6}  {'quantity':<11} {'simulated':>12} {'plan':>12} {'sim/plan':>9} {'whole/N':>12}"]
    for world in sorted(sim.seconds):
        rows = [sim.row(world, q) for q in QUANTITIES]
        total = SimRow(world, "total", *(sum(getattr(r, k) for r in rows) for k in ("simulated", "planned", "even")))
        for r in [*rows, total]:
            out.append(f"  {world:>6,}  {r.quantity:<11} {_gib(r.simulated):>12} {_gib(r.planned):>12} "
                       f"{r.ratio:>9.4f} {_gib(r.even):>12}"
                       + (f"   ({sim.seconds[world]:.1f} s)" if r is total else ""))
    out.append("  ZeRO-1/2/3 are not simulated (DeepSpeed needs a real process group).")
    return "\n".join(out)


def simulation_to_dict(sim: Simulation) -> dict:
    return {"label": sim.label, "how": sim.how, "seconds": sim.seconds,
            "rows": [{"world": r.world, "quantity": r.quantity, "simulated_bytes": r.simulated,
                      "plan_bytes": r.planned, "ratio": r.ratio, "whole_over_n_bytes": r.even} for r in sim.rows]}


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f} GiB" if nbytes >= GIB / 100 else f"{nbytes / 2 ** 20:.3f} MiB"


# ------------------------------------------------------------------------------------------------ the worker

class LazyChunks(Sequence):
    """torch.chunk(tensor, n, dim) padded with empty tensors to n entries, as FSDP2's `_chunk_with_empty` returns
    it, each entry built when read (FSDP2 reads two of the n)."""

    def __init__(self, tensor, num_chunks: int, dim: int):
        self.tensor, self.n, self.dim = tensor, num_chunks, dim
        self.rows = tensor.size(dim)
        self.size = -(-self.rows // num_chunks)  # torch.chunk's chunk size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        i = i + self.n if i < 0 else i
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i * self.size
        if start < self.rows or i == 0 or not self.rows:  # torch.chunk gives n empty chunks of 0 rows
            return self.tensor.narrow(self.dim, start, min(self.size, self.rows - start))
        return self.tensor.new_empty(0)


def _fast_chunks() -> None:
    """Let FSDP2 cut chunks lazily in this (worker) process; torch versions without the hook run unchanged."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:
        return
    if hasattr(_fsdp_param, "_chunk_with_empty"):
        _fsdp_param._chunk_with_empty = LazyChunks


def _builder(recipe):
    """A ModelBuilder whose config is the plan's (resolve_config): no model folder needed."""
    from ..distributed.precision import precision_plan
    from ..model import ModelBuilder
    from .model import resolve_config

    class ConfigBuilder(ModelBuilder):
        def config(self):
            cfg, _ = resolve_config(self.recipe)
            if self.recipe.model.task == "sequence_classification":
                cfg.num_labels = self.recipe.model.num_labels or 2
            cfg.use_cache = False
            if getattr(cfg, "pad_token_id", None) is None:
                cfg.pad_token_id = self.pad_token_id
            return cfg

    return ConfigBuilder(recipe, recipe.model.path, num_labels=recipe.model.num_labels, label_names=[],
                         pad_token_id=0, dtype=precision_plan(recipe.distributed.precision).param_dtype,
                         attn_implementation="sdpa")


def _measure(recipe, builder, world: int) -> dict:
    """Build, shard at `world` ranks (rank 0), add gradients and optimizer state; rank 0's bytes of each."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..distributed.activation_checkpointing import enable_activation_checkpointing
    from ..distributed.precision import precision_plan
    from ..distributed.spec import spec_for
    from ..train.optim import make_optimizer

    spec, d = spec_for(recipe.distributed.strategy), recipe.distributed
    start = time.perf_counter()
    with torch.device("meta"):
        model = builder.build_meta(context=contextlib.nullcontext())
    if d.activation_checkpointing:
        enable_activation_checkpointing(model)
    if spec.meta_shard:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        if spec.meta_shard:
            module, fn = spec.meta_shard.split(":")
            getattr(importlib.import_module(module), fn)(model, precision=precision_plan(d.precision),
                                                          offload=d.offload, pin_memory=False)
        if spec.memory.frozen_linears_in_compute_dtype:  # as the backend's strategy treats the built model
            from ..distributed.precision import frozen_linears_in_compute_dtype
            frozen_linears_in_compute_dtype(model, precision_plan(d.precision), recipe.method)
        params = list(model.parameters())  # tied weights once
        trainable = [p for p in params if p.requires_grad]
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer = make_optimizer(recipe)(trainable)
        optimizer.step()
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        out = {"world": world, "seconds": time.perf_counter() - start}
        for q, key, tensors in (("parameters", "params", params), ("gradients", "grads", [p.grad for p in trainable]),
                                ("optimizer", "optimizer", state)):
            local, whole = _bytes(tensors)
            out[q], out["even_" + q] = local, whole / world if key in spec.shards else whole
        # QLoRA's quantisation constants: whole on every rank, and only made when the weights load (quantized.py).
        from ..quantized import constant_bytes
        constants = sum(constant_bytes(m) for m in model.modules() if hasattr(m, "packed_4bit"))
        out["parameters"] += constants
        out["even_parameters"] += constants
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def _bytes(tensors) -> tuple[int, int]:
    """(bytes of this rank's local shards, bytes of the whole tensors)."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for t in tensors:
        mine = t.to_local() if isinstance(t, DTensor) else t
        local += mine.numel() * mine.element_size()
        whole += t.numel() * t.element_size()
    return local, whole


def _worker() -> int:
    import torch.distributed as dist
    import yaml

    from ..config import recipe_from_dict

    job = json.loads(sys.stdin.read())
    assert not dist.is_initialized()  # a fresh process: never a training group
    _fast_chunks()
    for i, text in enumerate(job["recipes"]):
        recipe = recipe_from_dict(yaml.safe_load(text))
        builder = _builder(recipe)
        for world in job["worlds"]:
            print(_MARK + json.dumps({"recipe": i, **_measure(recipe, builder, world)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
