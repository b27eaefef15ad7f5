"""An accelerate config that asks for something the recipe does not do is refused before training, naming the
accelerate field and the recipe key to set instead, all problems at once; settings that agree pass, and so does
every shipped launch/accelerate/*.yaml with its strategy. The environment a config gives the ranks is computed with
accelerate's own launch functions (accelerate_launch_env), so the variable names are accelerate's, not guessed."""

import json

import pytest
import yaml

from conftest import REPO, run_cli, tiny_recipe
from dist_ft.config import RecipeError, recipe_from_dict
from dist_ft.distributed.accelerate_config import accelerate_launch_env
from dist_ft.distributed.launchers import launcher_problems

SHIPPED = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped configs name configs/deepspeed/*.json relative to the repository


def _env(tmp_path, config: dict) -> dict[str, str]:
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "num_machines": 1, "num_processes": 2,
                                    "machine_rank": 0, **config}))
    return accelerate_launch_env(path)


def _problems(env: dict, **sections) -> list[str]:
    return launcher_problems(recipe_from_dict(sections), env)


def _assert_all(problems: list[str], *needles: tuple[str, ...]) -> None:
    """One problem per needle group, each problem holding every string of its group."""
    assert len(problems) == len(needles), "\n".join(problems)
    for group in needles:
        assert any(all(n in p for n in group) for p in problems), (group, problems)


# ---------------------------------------------------------------------------------------------- shipped configs

OFFLOAD = {"ddp": "none", "zero1": "none", "zero2": "optimizer", "zero3": "all", "fsdp": "all"}


@pytest.mark.parametrize("distributed", [{}, {"precision": "bf16-mixed", "activation_checkpointing": True},
                                         {"offload": True}], ids=["plain", "bf16-ac", "offload"])
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_pass_with_their_strategy(config, distributed):
    env = accelerate_launch_env(config)
    flag = {"zero": "ACCELERATE_USE_DEEPSPEED", "fsdp": "ACCELERATE_USE_FSDP"}.get(config.stem[:4])
    assert flag is None or env[flag] == "true"  # accelerate really said DeepSpeed / FSDP
    if distributed.get("offload"):
        distributed = {"offload": OFFLOAD[config.stem]}  # what each strategy offloads
    assert _problems(env, distributed={"strategy": config.stem, **distributed}) == []


@pytest.mark.parametrize("config,strategy", [("zero3", "ddp"), ("fsdp", "zero2"), ("zero1", "fsdp")])
def test_a_shipped_config_with_another_strategy_names_the_right_file(config, strategy):
    env = accelerate_launch_env(REPO / "launch" / "accelerate" / f"{config}.yaml")
    (problem,) = _problems(env, distributed={"strategy": strategy})
    assert f"distributed.strategy is {strategy}" in problem
    assert f"use launch/accelerate/{strategy}.yaml" in problem and "{strategy}" not in problem


def test_a_plain_torchrun_launch_is_not_checked():
    assert _problems({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}) == []


# ---------------------------------------------------------------------------------------------- every launch type

@pytest.mark.parametrize("distributed_type", ["MULTI_GPU", "DEEPSPEED", "FSDP"])
def test_mixed_precision_must_match_the_recipe(tmp_path, distributed_type):
    strategy = {"MULTI_GPU": "ddp", "DEEPSPEED": "zero2", "FSDP": "fsdp"}[distributed_type]
    extra = {"DEEPSPEED": {"deepspeed_config": {"zero_stage": 2}}, "FSDP": {"fsdp_config": {"fsdp_version": 2}}}
    env = _env(tmp_path, {"distributed_type": distributed_type, "mixed_precision": "bf16",
                          **extra.get(distributed_type, {})})
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    (problem,) = _problems(env, distributed={"strategy": strategy})
    assert "accelerate config mixed_precision: bf16 but distributed.precision is fp32" in problem
    assert "set distributed.precision: bf16-mixed in the recipe" in problem and "mixed_precision: 'no'" in problem
    assert _problems(env, distributed={"strategy": strategy, "precision": "bf16-mixed"}) == []
    other = "fp16-mixed" if strategy == "zero2" else "bf16-true"  # bf16-true: no autocast, so it disagrees too
    assert _problems(env, distributed={"strategy": strategy, "precision": other})


def test_fp16_and_no_mixed_precision(tmp_path):
    env = _env(tmp_path, {"distributed_type": "MULTI_GPU", "mixed_precision": "fp16"})
    _assert_all(_problems(env, distributed={"precision": "bf16-mixed"}),
                ("mixed_precision: fp16", "distributed.precision: fp16-mixed"))
    assert _problems(env, distributed={"precision": "fp16-mixed"}) == []
    # "no" is what accelerate writes for a config without the field: it asks for nothing, any recipe passes.
    env = _env(tmp_path, {"distributed_type": "MULTI_GPU"})
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    for precision in ("fp32", "bf16-mixed", "bf16-true"):
        assert _problems(env, distributed={"precision": precision}) == []


def test_torch_compile_is_refused(tmp_path):
    env = _env(tmp_path, {"distributed_type": "MULTI_GPU",
                          "dynamo_config": {"dynamo_backend": "INDUCTOR", "dynamo_mode": "max-autotune"}})
    _assert_all(_problems(env), ("dynamo_config.dynamo_backend: inductor", "training.compile: true", "dynamo_backend: 'no'"))


def test_what_dist_ft_has_no_backend_for_is_refused():
    """fp8, TPU downcasting, Megatron-LM and tensor/context parallelism: accelerate exports these (fp8 needs
    Transformer Engine or torchao to get that far, TPU needs XLA), so the variables are set as accelerate 1.15 sets
    them (utils/launch.py)."""
    env = {"ACCELERATE_MIXED_PRECISION": "fp8", "ACCELERATE_DOWNCAST_BF16": "true", "ACCELERATE_USE_MEGATRON_LM":
           "true", "ACCELERATE_USE_PARALLELISM_CONFIG": "true", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    _assert_all(_problems(env), ("mixed_precision: fp8", "distributed.precision"),
                ("downcast_bf16", "distributed.precision: bf16-true"),
                ("MEGATRON_LM", "distributed.strategy"), ("parallelism_config", "distributed.strategy"))


# ---------------------------------------------------------------------------------------------- DeepSpeed

def test_inline_deepspeed_options_must_match_the_recipe(tmp_path):
    env = _env(tmp_path, {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "zero_stage": 2, "offload_optimizer_device": "cpu", "offload_param_device": "none",
        "gradient_accumulation_steps": 4, "gradient_clipping": 0.5, "zero3_init_flag": True,
        "zero3_save_16bit_model": True}})
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2" and env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "4"
    _assert_all(_problems(env, distributed={"strategy": "zero3"}),
                ("deepspeed_config.zero_stage: 2", "distributed.strategy is zero3", "distributed.strategy: zero2"),
                ("deepspeed_config.gradient_accumulation_steps: 4", "training.gradient_accumulation_steps: 4"),
                ("deepspeed_config.gradient_clipping: 0.5", "training.max_grad_norm: 0.5"),
                ("deepspeed_config.offload_optimizer_device: cpu", "distributed.offload: optimizer"),
                ("deepspeed_config.zero3_save_16bit_model: true", "distributed.precision: bf16-true"))


def test_inline_deepspeed_options_that_agree_pass(tmp_path):
    env = _env(tmp_path, {"distributed_type": "DEEPSPEED", "mixed_precision": "bf16", "deepspeed_config": {
        "zero_stage": 3, "offload_optimizer_device": "cpu", "offload_param_device": "cpu",
        "gradient_accumulation_steps": 4, "gradient_clipping": 1.0, "zero3_init_flag": True}})
    assert _problems(env, distributed={"strategy": "zero3", "offload": "all", "precision": "bf16-mixed"},
                     training={"gradient_accumulation_steps": 4, "max_grad_norm": 1.0}) == []


def _deepspeed_file(tmp_path, cfg: dict):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return path, _env(tmp_path, {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "deepspeed_config_file": str(path), "zero3_init_flag": False}})


def test_an_accelerate_deepspeed_file_is_compared_with_the_recipe(tmp_path):
    """The user's report: their own JSON (fp16, WarmupDecayLR, ...) ran with dist_ft's zero2.json and fp16 off."""
    path, env = _deepspeed_file(tmp_path, {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": 64, "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0, "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "betas": "auto", "eps": 1e-8, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 3e-5, "warmup_num_steps": 100,
                                                          "total_num_steps": 1000}}})
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(path)
    _assert_all(_problems(env, distributed={"strategy": "zero2"}, training={"learning_rate": 2e-4}),
                (f"deepspeed_config_file {path}: fp16.enabled is true", "distributed.precision: fp16-mixed"),
                ("gradient_accumulation_steps is 4", "training.gradient_accumulation_steps: 4"),
                ("train_batch_size is 64", "x 2 rank(s) is 8"),
                ("offload_optimizer.device: cpu", "distributed.offload: optimizer"),
                ("optimizer.params.lr is 3e-05", "training.learning_rate: 3e-05"),
                ("optimizer.params.weight_decay is 0.01", "training.weight_decay: 0.01"),
                ("scheduler section (WarmupDecayLR)", "training.lr_scheduler: linear", "training.warmup_steps"),
                ("fp16.initial_scale_power: 12", "zero_optimization.overlap_comm: true",
                 f"distributed.deepspeed_config: {path}"))


def test_an_accelerate_deepspeed_file_that_agrees_passes(tmp_path):
    cfg = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    cfg.update({"gradient_accumulation_steps": 2, "train_batch_size": 16, "gradient_clipping": 0.5,
                "bf16": {"enabled": True}, "fp16": {**cfg["fp16"], "enabled": False}})
    cfg["zero_optimization"]["stage"] = 2
    _, env = _deepspeed_file(tmp_path, cfg)
    recipe = {"distributed": {"strategy": "zero2", "precision": "bf16-mixed"},
              "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5}}
    assert _problems(env, **recipe) == []
    recipe["training"]["max_grad_norm"] = 1.0
    _assert_all(_problems(env, **recipe), ("gradient_clipping is 0.5", "training.max_grad_norm: 0.5"))


def test_the_recipes_own_deepspeed_file_is_left_to_the_deepspeed_resolution(tmp_path):
    path, env = _deepspeed_file(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": True},
                                           "scheduler": {"type": "WarmupLR"}})
    assert _problems(env, distributed={"strategy": "zero2"})  # not the recipe's file: refused
    assert _problems(env, distributed={"strategy": "zero2", "deepspeed_config": str(path)}) == []
    assert _problems(env, distributed={"strategy": "zero3", "deepspeed_config": str(path)}) == []  # resolve refuses


def test_an_unreadable_accelerate_deepspeed_file_is_refused(tmp_path):
    env = _env(tmp_path, {"distributed_type": "DEEPSPEED", "deepspeed_config": {
        "deepspeed_config_file": str(tmp_path / "missing.json")}})
    _assert_all(_problems(env, distributed={"strategy": "zero1"}), ("missing.json: cannot be read",))


# ---------------------------------------------------------------------------------------------- FSDP

def test_fsdp_options_must_match_the_recipe(tmp_path):
    env = _env(tmp_path, {"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 1, "fsdp_sharding_strategy": "SHARD_GRAD_OP", "fsdp_offload_params": True,
        "fsdp_activation_checkpointing": True, "fsdp_auto_wrap_policy": "SIZE_BASED_WRAP",
        "fsdp_state_dict_type": "FULL_STATE_DICT"}})
    assert env["FSDP_VERSION"] == "1" and env["FSDP_SHARDING_STRATEGY"] == "SHARD_GRAD_OP"
    _assert_all(_problems(env, distributed={"strategy": "fsdp"}),
                ("fsdp_config.fsdp_version: 1", "fsdp_version: 2"),
                ("fsdp_config.fsdp_sharding_strategy: SHARD_GRAD_OP", "distributed.strategy: zero2"),
                ("fsdp_config.fsdp_offload_params: true", "distributed.offload: all"),
                ("fsdp_config.fsdp_activation_checkpointing: true", "distributed.activation_checkpointing: true"),
                ("fsdp_config.fsdp_auto_wrap_policy: SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP"),
                ("fsdp_config.fsdp_state_dict_type: FULL_STATE_DICT", "SHARDED_STATE_DICT"))


def test_fsdp_options_that_agree_pass(tmp_path):
    env = _env(tmp_path, {"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_version": 2, "fsdp_reshard_after_forward": True, "fsdp_offload_params": True,
        "fsdp_activation_checkpointing": True, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "fsdp_state_dict_type": "SHARDED_STATE_DICT"}})
    assert _problems(env, distributed={"strategy": "fsdp", "offload": "all", "activation_checkpointing": True}) == []
    env = _env(tmp_path, {"distributed_type": "FSDP", "fsdp_config": {"fsdp_version": 2,
                                                                      "fsdp_reshard_after_forward": False}})
    _assert_all(_problems(env, distributed={"strategy": "fsdp"}),
                ("fsdp_reshard_after_forward: false", "distributed.strategy: zero2"))


# ---------------------------------------------------------------------------------------------- where it runs

def test_training_refuses_before_the_model_loads(monkeypatch, tmp_path, tiny_llama):
    import dist_ft.train.run as trainer

    def reached(*a, **k):
        raise AssertionError("the model was resolved before the launcher check")

    monkeypatch.setattr(trainer, "resolve_model_path", reached)
    for key, value in _env(tmp_path, {"distributed_type": "MULTI_GPU", "mixed_precision": "bf16"}).items():
        monkeypatch.setenv(key, value)
    recipe = recipe_from_dict(tiny_recipe(tiny_llama, tmp_path / "run"))
    with pytest.raises(RecipeError, match="accelerate config mixed_precision: bf16"):
        trainer.run_training(recipe)


def test_dist_ft_check_takes_an_accelerate_config(tmp_path):
    recipe = str(REPO / "configs" / "smollm2-text-pydoc-ddp.yaml")
    bad = tmp_path / "bf16.yaml"
    bad.write_text((REPO / "launch" / "accelerate" / "ddp.yaml").read_text().replace('mixed_precision: "no"',
                                                                                    "mixed_precision: bf16"))
    res = run_cli("check", recipe, "--ignore-output-dir", "--accelerate-config", str(bad), timeout=120)
    assert res.returncode == 2 and "accelerate config mixed_precision: bf16" in res.stderr, res.stderr
    res = run_cli("check", recipe, "--ignore-output-dir", "--accelerate-config",
                  str(REPO / "launch" / "accelerate" / "ddp.yaml"), timeout=120)
    assert res.returncode == 0, res.stderr
