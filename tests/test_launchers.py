"""Each launcher starts a 2-process run of a shipped recipe: the run reports world size 2 with both ranks, and its
losses equal a 1-process run of the same global batch (which fails if two ranks saw the same data). Every shipped
recipe, accelerate config and DeepSpeed JSON is checked."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_ft.distributed.topology import free_port
from conftest import FAKE_SECRETS, REPO, read_metrics, run_cli, secret_leaks

RECIPE = REPO / "configs" / "smollm2-text-pydoc-ddp.yaml"


def _overrides(model, out, strategy):
    return [f"output_dir={out}", f"model.path={model}", "data.train=builtin:fortunes", "data.max_length=48",
            "data.packing=false", "data.max_train_samples=128", "data.max_eval_samples=8", "training.max_steps=3",
            "training.micro_batch_size=2", "training.eval_every=0", "training.warmup_steps=0",
            f"distributed.strategy={strategy}", "distributed.threads_per_process=1", "method.kind=full"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli("train", str(RECIPE), *_overrides(tiny_llama, out, "ddp"), "training.micro_batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out)[0]]


def _run(cmd, env=None, *, work: Path | None = None):
    """Run a launcher as a user would, from a working directory of its own and with secrets in the environment;
    then no file it wrote (there, in the run directory under it, in $HOME) and none of its output holds them."""
    if work is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(home), **FAKE_SECRETS, **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full, cwd=work)
    leaks = secret_leaks(work, outputs=(res.stdout, res.stderr))
    assert not leaks, f"secrets from the environment written to {leaks}"
    return res


def _bin(name):
    return str(Path(sys.executable).parent / name)


LAUNCHERS = {
    "dist-ft": lambda o: [sys.executable, "-m", "dist_ft", "launch", str(RECIPE), "--nproc-per-node", "2", *o],
    "torchrun": lambda o: [_bin("torchrun"), "--nproc-per-node=2", f"--master-port={free_port()}", "-m", "dist_ft",
                           "train", str(RECIPE), *o],
    "deepspeed": lambda o: [_bin("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                            "dist_ft", "train", str(RECIPE), *o],
}
ACCELERATE = {"ddp": "ddp", "fsdp": "fsdp", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3"}


def _assert_two_ranks_match(res, out, reference):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "world size 2" in res.stdout and "rank 1/2" in res.stdout, res.stdout[-2000:]
    losses = [r["loss"] for r in read_metrics(out)[0]]
    assert max(abs(a - b) / b for a, b in zip(losses, reference)) < 1e-4, (losses, reference)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher(tmp_path, tiny_llama, reference, launcher):
    out = tmp_path / "run"
    strategy = "zero2" if launcher == "deepspeed" else "ddp"
    res = _run(LAUNCHERS[launcher](_overrides(tiny_llama, out, strategy)), work=tmp_path)
    _assert_two_ranks_match(res, out, reference)


@pytest.mark.parametrize("config", list(ACCELERATE))
def test_accelerate_launch(tmp_path, tiny_llama, reference, config):
    out = tmp_path / "run"
    cmd = [_bin("accelerate"), "launch", "--config_file", str(REPO / "launch" / "accelerate" / f"{config}.yaml"),
           "--main_process_port", str(free_port()), "-m", "dist_ft", "train", str(RECIPE),
           *_overrides(tiny_llama, out, ACCELERATE[config])]
    # accelerate 1.15 starts the ranks without GPUs too; ACCELERATE_USE_CPU only steers its own Accelerator
    # (which dist_ft does not build): set here as a user on a CPU box may have it.
    res = _run(cmd, env={"ACCELERATE_USE_CPU": "1"}, work=tmp_path)
    _assert_two_ranks_match(res, out, reference)
    assert "launcher accelerate" in res.stdout


def test_accelerate_config_that_disagrees_is_refused(tmp_path, tiny_llama):
    out = tmp_path / "run"
    cmd = [_bin("accelerate"), "launch", "--config_file", "launch/accelerate/zero3.yaml", "--main_process_port",
           str(free_port()), "-m", "dist_ft", "train", str(RECIPE), *_overrides(tiny_llama, out, "ddp")]
    res = _run(cmd, env={"ACCELERATE_USE_CPU": "1"})
    assert res.returncode != 0 and "distributed.strategy is ddp" in res.stderr


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_pass_check(recipe):
    res = run_cli("check", str(recipe), "--ignore-output-dir", timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("template", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_shipped_deepspeed_templates_resolve(template):
    from dist_ft.config import recipe_from_dict
    from dist_ft.distributed.deepspeed.config import resolve_deepspeed_config

    cfg = json.loads(template.read_text())
    stage = cfg["zero_optimization"]["stage"]
    offload = "all" if "offload_param" in cfg["zero_optimization"] else (
        "optimizer" if "offload_optimizer" in cfg["zero_optimization"] else "none")
    recipe = recipe_from_dict({"distributed": {"strategy": f"zero{stage}", "offload": offload,
                                               "precision": "bf16-mixed"}})
    resolved, problems = resolve_deepspeed_config(cfg, recipe, world_size=8, hidden_size=576)
    assert not problems
    assert "auto" not in json.dumps(resolved)
    assert resolved["train_batch_size"] == 4 * 8 and resolved["bf16"]["enabled"] is True


def test_deepspeed_mismatches_are_all_reported():
    from dist_ft.config import recipe_from_dict
    from dist_ft.distributed.deepspeed.config import resolve_deepspeed_config

    user = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    recipe = recipe_from_dict({"distributed": {"strategy": "zero3"}, "training": {"micro_batch_size": 4}})
    _, problems = resolve_deepspeed_config(user, recipe, world_size=2, source="my.json")
    text = "\n".join(problems)
    assert len(problems) == 5, problems
    for needle in ["train_micro_batch_size_per_gpu is 8", "gradient_clipping is 0.5", "bf16.enabled is True",
                   "zero_optimization.stage is 2", "offload_optimizer offloads"]:
        assert needle in text, needle


def test_launcher_args_are_stripped():
    from dist_ft.distributed.launchers import strip_launcher_args
    assert strip_launcher_args(["--local_rank=1", "train", "r.yaml", "--local-rank", "0", "a=1"]) == \
        ["train", "r.yaml", "a=1"]


def test_accelerate_configs_parse():
    import yaml
    for path in (REPO / "launch" / "accelerate").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["num_processes"] >= 1 and cfg["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")


def test_a_multi_node_slurm_step_where_each_node_trains_alone_is_refused():
    """accelerate with DeepSpeed and its default (pdsh) multi-node launcher, or without --multi_gpu, starts a world
    of one rank on every node of the step: each would train alone and write the same files."""
    from dist_ft.config import recipe_from_dict
    from dist_ft.distributed.launchers import launcher_problems

    zero2, ddp = (recipe_from_dict({"distributed": {"strategy": s}}) for s in ("zero2", "ddp"))
    (problem,) = launcher_problems(zero2, {"SLURM_STEP_NUM_NODES": "2", "WORLD_SIZE": "1"})
    assert "spans 2 nodes" in problem and "deepspeed_multinode_launcher standard" in problem
    assert launcher_problems(zero2, {"SLURM_STEP_NUM_NODES": "2", "WORLD_SIZE": "2"}) == []
    assert launcher_problems(ddp, {"SLURM_STEP_NUM_NODES": "1", "WORLD_SIZE": "1"}) == []


def test_the_secret_scan_finds_an_environment_dump(tmp_path):
    """The scan the launch tests rely on can fail: a launcher that dumps its environment (as accelerate's
    multi-node DeepSpeed path does into .deepspeed_env) is caught, and so is one that prints it."""
    dump = "import os; open('.deepspeed_env', 'w').write(''.join(f'{k}={v}\\n' for k, v in os.environ.items()))"
    with pytest.raises(AssertionError, match=r"\.deepspeed_env"):
        _run([sys.executable, "-c", dump], work=tmp_path / "a")
    with pytest.raises(AssertionError, match="output"):
        _run([sys.executable, "-c", "import os; print(os.environ['HF_TOKEN'])"], work=tmp_path / "b")
