"""What a backend accepts is read from its spec (distributed/<backend>/__init__.py), not from comparisons of
strategy names: a spec changed here changes what the recipe check, the launcher check and `dist-ft plan` say.
Fast: no process is started."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import REPO
from dist_ft.config import RecipeError, recipe_from_dict
from dist_ft.distributed import spec as S
from dist_ft.distributed.accelerate_config import accelerate_backend, accelerate_launch_env
from dist_ft.distributed.launchers import launcher_problems

SHIPPED = ("ddp", "fsdp", "zero1", "zero2", "zero3")
LAUNCH = REPO / "launch" / "accelerate"


def _install(monkeypatch, spec: S.BackendSpec) -> None:
    """Put `spec` into the registry for this test only (restored afterwards)."""
    monkeypatch.setitem(S.all_specs(), spec.name, spec)


def _recipe(strategy: str = "ddp", kind: str = "lora"):
    return recipe_from_dict({"method": {"kind": kind}, "distributed": {"strategy": strategy}})


# ---------------------------------------------------------------------------------------------- the registry

def test_the_registry_lists_every_backend_and_each_strategy_has_its_specs_name():
    from dist_ft.distributed.precision import precision_plan
    from dist_ft.distributed.topology import Topology

    assert tuple(S.all_specs()) == SHIPPED
    assert S.names() == SHIPPED
    topo = Topology(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                    backend="gloo", launcher="none")
    for name, spec in S.all_specs().items():
        assert spec.name == name and spec is S.spec_for(name)
        assert spec.shards <= frozenset(S.SHARDABLE) and spec.accelerate_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")
        assert (LAUNCH / spec.launch_config).is_file(), spec.launch_config
        strategy = S.make_strategy(name, topo=topo, precision=precision_plan("fp32"), activation_checkpointing=False)
        assert strategy.name == name and strategy.state_format == spec.state_format
    with pytest.raises(ValueError, match="unknown strategy 'zero4'"):
        S.spec_for("zero4")


def test_the_backend_an_accelerate_config_asks_for_is_read_from_the_specs():
    ddp = _recipe("ddp")
    for name in ("fsdp", "zero1", "zero2", "zero3"):  # each shipped config names its own backend, whatever the recipe
        env = accelerate_launch_env(LAUNCH / S.spec_for(name).launch_config)
        assert accelerate_backend(ddp, env) is S.spec_for(name)
    multi_gpu = accelerate_launch_env(LAUNCH / "ddp.yaml")
    assert accelerate_backend(ddp, multi_gpu) is S.spec_for("ddp")
    assert accelerate_backend(_recipe("zero3"), multi_gpu) is None  # a plain multi-GPU launch starts any backend
    assert accelerate_backend(ddp, {"WORLD_SIZE": "2"}) is None  # not started by accelerate


# ---------------------------------------------------------------------------------------------- refusals

def test_a_refusal_added_to_a_spec_is_refused_by_the_recipe_and_the_launcher_checks(monkeypatch):
    recipe = _recipe("ddp", "lora")  # accepted by the shipped ddp spec
    env = accelerate_launch_env(LAUNCH / "ddp.yaml")  # an accelerate multi-GPU launch: ddp's distributed_type
    assert launcher_problems(recipe, env) == []
    old = S.spec_for("ddp")
    reason = "lora is refused by this test spec"
    _install(monkeypatch, dataclasses.replace(old, refuses={**old.refuses, "method:lora": reason}))
    with pytest.raises(RecipeError, match=reason) as err:
        _recipe("ddp", "lora")
    assert f"method.kind: {reason}" in str(err.value)
    assert launcher_problems(recipe, env) == [f"accelerate config asks for ddp, which refuses: method.kind: {reason}"]
    _recipe("fsdp", "lora")  # the other backends' specs are untouched


def test_the_launcher_refuses_what_its_configs_backend_refuses():
    """A ddp recipe with prompt tuning, started with the zero3 accelerate config: the config asks for zero3, which
    cannot save peft's virtual-token embeddings. Said as coming from the launcher's config, besides the strategy
    mismatch."""
    recipe = _recipe("ddp", "prompt_tuning")
    problems = launcher_problems(recipe, accelerate_launch_env(LAUNCH / "zero3.yaml"))
    assert len(problems) == 2, problems
    assert "distributed.strategy is ddp; use launch/accelerate/ddp.yaml" in problems[0]
    assert problems[1] == ("accelerate config asks for zero3, which refuses: method.kind: "
                           + S.spec_for("zero3").refuses["method:prompt_tuning"])


def test_a_refusal_dropped_from_a_spec_is_accepted(monkeypatch):
    """The rule is read from the spec and nowhere else: without it, the same recipe passes."""
    with pytest.raises(RecipeError, match="method.kind: prompt_tuning is not supported with zero3"):
        _recipe("zero3", "prompt_tuning")
    old = S.spec_for("zero3")
    _install(monkeypatch, dataclasses.replace(old, refuses={k: v for k, v in old.refuses.items()
                                                            if k != "method:prompt_tuning"}))
    assert _recipe("zero3", "prompt_tuning").distributed.strategy == "zero3"


def test_preflight_and_the_fp16_check_read_the_spec(monkeypatch):
    from dist_ft.distributed.precision import hardware_problem
    from dist_ft.preflight import strategy_problems

    assert hardware_problem("fp16-mixed", strategy="ddp", cuda_available=False, cpu_fp16=False) is None
    assert strategy_problems(_recipe("ddp")) == []
    old = S.spec_for("ddp")
    _install(monkeypatch, dataclasses.replace(old, own_loss_scaler=True, requires=("no_such_package_xyz", "xyz")))
    problem = hardware_problem("fp16-mixed", strategy="ddp", cuda_available=False, cpu_fp16=False)
    assert problem and "fp16-mixed with ddp on CPU" in problem and "use strategy fsdp for fp16-mixed" in problem
    assert strategy_problems(_recipe("ddp")) == [
        "distributed.strategy: ddp needs the no_such_package_xyz package: pip install 'dist-ft[xyz]'"]


# ---------------------------------------------------------------------------------------------- dist-ft plan
# `dist_ft.plan` is being rewritten (issue 20) to read its memory rules from the specs; this test is written against
# its public API (make_plan, make_cluster, as tests/test_plan.py uses them).

def test_plan_reads_the_spec(monkeypatch):
    from dist_ft import plan as P

    def optimizer_bytes() -> float:
        recipe = recipe_from_dict({"model": {"path": "builtin:llama-3-8b"}, "method": {"kind": "full"},
                                   "distributed": {"strategy": "ddp", "precision": "bf16-mixed"}})
        plan = P.make_plan(recipe, P.make_cluster(nodes=1, gpus_per_node=8, gpu="H100"), find_max=False)
        return {r.key: r for r in plan.rows}["optimizer"].device

    n = 8_030_261_248
    assert optimizer_bytes() == pytest.approx(8 * n)  # the shipped ddp spec shards nothing
    _install(monkeypatch, dataclasses.replace(S.spec_for("ddp"), shards=frozenset({"optimizer"})))
    assert optimizer_bytes() == pytest.approx(8 * n / 8)  # a ddp that shards its optimizer state: 1/8 per rank


def test_one_spec_change_makes_the_check_the_launcher_check_and_plan_refuse(monkeypatch, tmp_path):
    """The rule lives in one place: a ddp spec that refuses LoRA is refused by `dist-ft check`'s recipe check, by
    the launcher check of an accelerate multi-GPU launch, by `dist-ft plan` of the recipe, and is never offered by
    `dist-ft plan --all-strategies`."""
    from dist_ft import plan as P
    from dist_ft.cli import main

    recipe = recipe_from_dict({"model": {"path": "builtin:smollm2-135m"}, "method": {"kind": "lora"},
                               "distributed": {"strategy": "ddp"}})
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: 'builtin:smollm2-135m'}\nmethod: {kind: lora}\ndistributed: {strategy: ddp}\n")
    cluster = P.make_cluster(nodes=1, gpus_per_node=8, gpu="H100")
    offered = {p.recipe.distributed.strategy for p in P.compare(recipe, cluster) if p.counts.kind == "lora"}
    assert "ddp" in offered
    assert main(["plan", str(path), "--nodes", "1", "--gpus-per-node", "8", "--gpu", "H100"]) == 0

    old = S.spec_for("ddp")
    reason = "lora is refused by this test spec"
    _install(monkeypatch, dataclasses.replace(old, refuses={**old.refuses, "method:lora": reason}))
    with pytest.raises(RecipeError, match=reason):  # the recipe check (dist-ft check, train, plan all run it)
        recipe_from_dict({"method": {"kind": "lora"}, "distributed": {"strategy": "ddp"}})
    env = accelerate_launch_env(LAUNCH / "ddp.yaml")
    assert any(reason in p for p in launcher_problems(recipe, env))  # the launcher check
    assert main(["plan", str(path), "--nodes", "1", "--gpus-per-node", "8", "--gpu", "H100"]) == 2  # plan
    offered = {p.recipe.distributed.strategy for p in P.compare(recipe, cluster) if p.counts.kind == "lora"}
    assert "ddp" not in offered and "fsdp" in offered  # --all-strategies never offers what a spec refuses
