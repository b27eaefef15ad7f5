"""`dist-ft plan --simulate` (issue 24): the real model built on meta and sharded by FSDP2's real code under a fake
process group at 8, 64 and 1,024 ranks; rank 0's bytes agree with the plan's formulas, and every sharded quantity
shrinks as the world grows while DDP's replicated ones stay constant.

Tolerance: the plan counts FSDP2's split exactly (memory.per_rank: ceil(rows / N) rows of every tensor, rank 0's
chunk, padding included), so the simulated and planned bytes are the same integers; 1e-9 relative allows only for
float division. The even split (whole / N), which the plan used before, is kept beside them to show what it missed.

    pytest tests/test_plan_simulate.py          (~1 minute on 2 cores: one worker process for all recipes)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_ft.config import load_recipe
from dist_ft.plan import simulate as S
from dist_ft.plan.constants import PlanError

WORLDS = [8, 64, 1024]
FSDP = ["distributed.strategy=fsdp", "distributed.precision=bf16-mixed"]
RECIPES = {
    "8b-full": ["model.path=builtin:llama-3-8b", "method.kind=full", *FSDP],
    "8b-lora": ["model.path=builtin:llama-3-8b", "method.kind=lora", "method.lora.r=16", *FSDP],
    "70b-lora": ["model.path=builtin:llama-3-70b", "method.kind=lora", "method.lora.r=16", *FSDP],
    "8b-lora-ddp": ["model.path=builtin:llama-3-8b", "method.kind=lora", "method.lora.r=16",
                    "distributed.strategy=ddp", "distributed.precision=bf16-mixed"],
}


@pytest.fixture(scope="module")
def sims() -> dict[str, S.Simulation]:
    recipes = [load_recipe(None, o) for o in RECIPES.values()]
    return dict(zip(RECIPES, S.simulate_all(recipes, WORLDS, timeout=600)))


@pytest.mark.parametrize("rows", [0, 1, 3, 16, 17, 1000, 1024, 4096, 14336, 128256])
def test_lazy_chunks_are_torchs_chunks(rows):
    from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

    t = torch.empty(rows, 3, device="meta")
    for n in (1, 2, 3, 8, 64, 1024):
        want, got = _chunk_with_empty(t, n, dim=0), S.LazyChunks(t, n, 0)
        assert len(got) == len(want) == n
        for i in {0, 1 % n, n // 2, n - 1, -1}:
            assert (got[i].shape, got[i].stride(), got[i].storage_offset(), got[i].dtype) == \
                   (want[i].shape, want[i].stride(), want[i].storage_offset(), want[i].dtype), (rows, n, i)


@pytest.mark.parametrize("name", ["8b-full", "8b-lora", "70b-lora", "8b-lora-ddp"])
def test_simulated_bytes_equal_the_plan(sims, name):
    sim = sims[name]
    assert sorted(sim.seconds) == WORLDS
    for r in sim.rows:
        assert r.simulated > 0
        assert r.simulated == pytest.approx(r.planned, rel=1e-9), (name, r)


def test_sharded_quantities_shrink_roughly_as_one_over_n(sims):
    for name in ("8b-full", "8b-lora", "70b-lora"):
        for q in S.QUANTITIES:
            got = [sims[name].row(w, q).simulated for w in WORLDS]
            assert got[0] > got[1] > got[2], (name, q, got)
    # Full fine-tuning and the frozen base: within 1% of whole / N even at 1,024 ranks (the only padding is the
    # 128,256-row embeddings: 126 rows per rank where 125.25 would be even).
    for q in S.QUANTITIES:
        r = sims["8b-full"].row(1024, q)
        assert r.even <= r.simulated < 1.01 * r.even


def test_lora_a_rows_do_not_split_past_r(sims):
    """FSDP2 splits dim 0: a LoRA A (r x in) has r = 16 rows, so from 16 ranks on rank 0 holds one whole row of
    each. Its state then stops shrinking as 1/N: whole / N undercounts rank 0 by ~40x at 1,024 ranks, and the
    plan (which counts rows) does not."""
    r = sims["8b-lora"].row(1024, "optimizer")
    assert r.simulated > 20 * r.even
    assert r.simulated == pytest.approx(r.planned, rel=1e-9)
    # and the weights: Llama-3-70B's 560 A matrices, one whole row each, are 9% of rank 0's parameters at 1,024
    p = sims["70b-lora"].row(1024, "parameters")
    assert 1.05 * p.even < p.simulated == pytest.approx(p.planned, rel=1e-9)


def test_replicated_quantities_stay_constant_under_ddp(sims):
    for q in S.QUANTITIES:
        got = {sims["8b-lora-ddp"].row(w, q).simulated for w in WORLDS}
        assert len(got) == 1, (q, got)
    # LoRA's state is tiny beside the base: the whole 8B model on every rank, its frozen Linear weights in bf16
    # (autocast's copy, stored: distributed/precision.frozen_linears_in_compute_dtype), embeddings and norms in fp32
    assert 16e9 < sims["8b-lora-ddp"].row(1024, "parameters").simulated < 18e9


def test_render_and_json(sims):
    text = S.render_simulation(sims["70b-lora"])
    assert "1,024" in text and "sim/plan" in text and "not simulated" in text
    out = S.simulation_to_dict(sims["70b-lora"])
    assert len(json.loads(json.dumps(out))["rows"]) == 3 * len(WORLDS)


def test_deepspeed_is_refused_with_the_reason():
    with pytest.raises(PlanError, match="real process group"):
        S.simulate(load_recipe(None, ["model.path=builtin:llama-3-8b", "method.kind=full",
                                      "distributed.strategy=zero3"]), [8])


def test_world_sizes_parse():
    assert S.parse_worlds("8,64,1024") == [8, 64, 1024]
    for bad in ("", "0", "8,x"):
        with pytest.raises(PlanError):
            S.parse_worlds(bad)


def test_the_command_line(capsys):
    """`dist-ft plan --simulate --json` end to end, on a model with tied embeddings (one unit for both ends) and
    activation checkpointing (applied before sharding, as in training)."""
    from dist_ft.plan import main

    recipe = Path(__file__).resolve().parents[1] / "configs" / "smollm2-lora-fsdp-bf16.yaml"
    assert main([str(recipe), "--simulate", "--world-size", "4,32", "--json", "model.path=builtin:smollm2-135m",
                 "distributed.activation_checkpointing=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(int(w) for w in out["seconds"]) == [4, 32]
    for r in out["rows"]:
        assert r["simulated_bytes"] == pytest.approx(r["plan_bytes"], rel=1e-9), r
