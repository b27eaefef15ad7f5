"""Every fine-tuning method: the parameters it trains (counted independently of dist_ft), a few steps that lower
the loss, frozen weights bit-identical, gradual unfreezing block by block, strategy parity, refusals, export."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe
from dist_ft.config import RecipeError, recipe_from_dict
from dist_ft.train.loss import forward_logits, loss_sum

NVT = 4
METHODS = {
    "lora": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "dora": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "use_dora": True}},
    "qlora": {"kind": "qlora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "qlora8": {"kind": "qlora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "quant": {"bits": 8}},
    "ia3": {"kind": "ia3"},
    "prompt_tuning": {"kind": "prompt_tuning", "prompt": {"num_virtual_tokens": NVT}},
    "prefix_tuning": {"kind": "prefix_tuning", "prompt": {"num_virtual_tokens": NVT}},
    "partial": {"kind": "partial", "partial": {"last_blocks": 1, "head": True}},
    "bitfit": {"kind": "partial", "partial": {"bias_only": True, "head": False}},
    "gradual": {"kind": "partial", "partial": {"unfreeze_every_steps": 2, "last_blocks": 0}},
    "full": {"kind": "full"},
}
OPTIMIZER = {"full": "adamw_8bit"}  # the full-weight parity run doubles as the 8-bit AdamW run


def _recipe(model_path, out, method, **sections):
    return recipe_from_dict(tiny_recipe(model_path, out, method=METHODS[method], **sections))


def _build(recipe, model_path):
    from dist_ft.model import ModelBuilder, load_tokenizer
    tok = load_tokenizer(model_path)
    return ModelBuilder(recipe, model_path, num_labels=None, label_names=[], pad_token_id=tok.pad_token_id,
                        dtype=torch.float32, attn_implementation="sdpa").build()


def _expected_trainable(method, model_path) -> int:
    """From the base model and the method's definition, not from dist_ft or peft."""
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_path)
    cfg = base.config
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    params = dict(base.named_parameters())
    if method in ("lora", "qlora", "qlora8"):
        return sum((m.in_features + m.out_features) * 4 for m in linears.values())
    if method == "dora":  # plus one magnitude per output row
        return sum((m.in_features + m.out_features) * 4 + m.out_features for m in linears.values())
    if method == "ia3":  # peft's Llama defaults: k_proj, v_proj scaled on the output; down_proj on the input
        return sum(m.out_features for n, m in linears.items() if n.endswith(("k_proj", "v_proj"))) + \
            sum(m.in_features for n, m in linears.items() if n.endswith("down_proj"))
    if method == "prompt_tuning":
        return NVT * cfg.hidden_size
    if method == "prefix_tuning":
        return NVT * cfg.num_hidden_layers * 2 * cfg.head_dim * cfg.num_key_value_heads
    last = cfg.num_hidden_layers - 1
    if method == "partial":
        return sum(p.numel() for n, p in params.items() if n.startswith(f"model.layers.{last}.")) + \
            base.get_output_embeddings().weight.numel()
    if method == "bitfit":
        return sum(p.numel() for n, p in params.items() if n.endswith(".bias"))
    raise KeyError(method)


def _raw(p):
    """The stored values, flattened (bitsandbytes' packed 4-bit parameters included)."""
    return torch.Tensor(p.data).detach().flatten().clone()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 500, (4, 24), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "qlora8", "ia3", "prompt_tuning", "prefix_tuning",
                                    "partial", "bitfit"])
def test_method_trains_what_it_should(tmp_path, tiny_llama, tiny_qwen2, method):
    model_path = tiny_qwen2 if method == "bitfit" else tiny_llama  # the tiny Llama has no bias terms
    recipe = _recipe(model_path, tmp_path / "run", method)
    model = _build(recipe, model_path)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == _expected_trainable(method, model_path)
    batch = _batch()
    with torch.no_grad():  # bitsandbytes repacks 4-bit weights for the CPU kernel on first use: snapshot after
        forward_logits(model, batch)
    frozen = {n: _raw(p) for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=3e-2 if "tuning" in method else 1e-2)
    losses = []
    for _ in range(6):
        loss = loss_sum(*forward_logits(model, batch)) / (batch["labels"].numel() - 4)
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(_raw(p), frozen[n]), f"frozen {n} changed"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainable.items())


def test_method_counts_are_logged(tmp_path, tiny_llama):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out, method=METHODS["ia3"],
                                                         training={"max_steps": 1}))
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-2000:]
    expected = _expected_trainable("ia3", tiny_llama)
    assert f"trainable parameters {expected:,} of" in res.stdout
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["trainable_params"] == expected and start["total_params"] > expected


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradual_unfreezing_opens_one_block_at_a_time(tmp_path, tiny_llama, one_process_group):
    """2 blocks, one more every 2 steps, head open from the start: block 1 first changes at step 3, block 0 at 5."""
    from dist_ft.distributed.ddp.strategy import DDPStrategy
    from dist_ft.distributed.precision import precision_plan
    from dist_ft.distributed.topology import Topology
    from dist_ft.methods import UnfreezeSchedule
    from dist_ft.model import ModelBuilder, load_tokenizer
    from dist_ft.train.optim import make_optimizer as _make_optimizer
    from dist_ft.train.step import train_step

    recipe = _recipe(tiny_llama, tmp_path / "run", "gradual", training={"learning_rate": 1e-2})
    topo = Topology(0, 1, 0, 1, torch.device("cpu"), "gloo", "none")
    tok = load_tokenizer(tiny_llama)
    builder = ModelBuilder(recipe, tiny_llama, num_labels=None, label_names=[], pad_token_id=tok.pad_token_id,
                           dtype=torch.float32, attn_implementation="sdpa")
    strategy = DDPStrategy(topo=topo, precision=precision_plan("fp32"), activation_checkpointing=False,
                           recipe=recipe)
    strategy.setup(builder, _make_optimizer(recipe))
    model = strategy.unwrap()
    schedule = UnfreezeSchedule(model, recipe, steps_per_epoch=100)

    def snapshot():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(a, b, prefix):
        return any(not torch.equal(a[n], b[n]) for n in a if n.startswith(prefix))

    first_change = {}
    for step in range(1, 7):
        strategy.grad_mask = schedule.frozen_params(step)
        before = snapshot()
        train_step(strategy, [_batch(step)], 1.0)
        after = snapshot()
        for part in ("model.layers.0.", "model.layers.1.", "model.embed_tokens."):
            if changed(before, after, part):
                first_change.setdefault(part, step)
        # What is not open yet never moves.
        for n in before:
            if any(p is dict(model.named_parameters())[n] for p in strategy.grad_mask):
                assert torch.equal(before[n], after[n]), (step, n)
    # embed_tokens is the (tied) head: open from step 1.
    assert first_change == {"model.embed_tokens.": 1, "model.layers.1.": 3, "model.layers.0.": 5}, first_change
    assert [schedule.open_blocks(s) for s in range(1, 8)] == [0, 0, 1, 1, 2, 2, 2]


def test_adamw_8bit_keeps_8bit_state():
    from dist_ft.train.optim import make_optimizer as _make_optimizer
    recipe = recipe_from_dict({"training": {"optimizer": "adamw_8bit", "learning_rate": 1e-3}})
    layer = torch.nn.Linear(128, 128)
    opt = _make_optimizer(recipe)(layer.parameters())
    assert type(opt).__name__ == "AdamW8bit"
    x = torch.randn(8, 128)
    before = layer.weight.detach().clone()
    layer(x).pow(2).mean().backward()
    opt.step()
    assert opt.state[layer.weight]["state1"].dtype == torch.uint8  # the moments are 8-bit
    assert not torch.equal(before, layer.weight)


@pytest.mark.parametrize("method,strategy,fragment", [
    ("prompt_tuning", "fsdp", "use ddp, zero1 or zero2"),
    ("prefix_tuning", "zero3", "use ddp, zero1 or zero2"),
    ("gradual", "zero2", "use ddp or fsdp"),
])
def test_incompatible_pairs_are_refused(tiny_llama, tmp_path, method, strategy, fragment):
    with pytest.raises(RecipeError) as err:
        _recipe(tiny_llama, tmp_path / "run", method, distributed={"strategy": strategy})
    assert fragment in str(err.value) and "method" in str(err.value)


def test_refusals_report_everything_at_once(tiny_llama, tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe(tiny_llama, tmp_path, method={"kind": "prompt_tuning"},
                                     data={"packing": True}, training={"optimizer": "adamw_8bit"},
                                     distributed={"strategy": "fsdp"}))
    text = str(err.value)
    assert "data.packing" in text and "training.optimizer" in text and "method.kind" in text


def test_bitfit_on_a_model_without_biases_is_refused(tiny_llama, tmp_path):
    with pytest.raises(RecipeError, match="selects no parameter"):
        _build(_recipe(tiny_llama, tmp_path / "run", "bitfit"), tiny_llama)


# ---------------------------------------------------------------------------------------------- processes

_SLOW = pytest.mark.slow
# CI time: each method on one or two backends in the non-slow run, the rest in the slow suite (full under DDP is
# test_strategies' parity; QLoRA under DDP also tests_preference_training's).
PARITY = [pytest.param("qlora", "ddp", marks=_SLOW), ("qlora", "zero2"), ("ia3", "ddp"),
          pytest.param("ia3", "fsdp", marks=_SLOW), pytest.param("ia3", "zero3", marks=_SLOW),
          ("prompt_tuning", "ddp"), pytest.param("prompt_tuning", "zero2", marks=_SLOW),
          pytest.param("prefix_tuning", "ddp", marks=_SLOW), pytest.param("partial", "ddp", marks=_SLOW), ("partial", "fsdp"),
          pytest.param("partial", "zero3", marks=_SLOW), ("gradual", "ddp"), pytest.param("gradual", "fsdp", marks=_SLOW),
          pytest.param("full", "ddp", marks=_SLOW)]


def _losses(tmp_path, name, model, method, nproc, micro, strategy="ddp"):
    out = tmp_path / name
    r = tiny_recipe(model, out, method=METHODS[method],
                    training={"max_steps": 6, "micro_batch_size": micro, "learning_rate": 1e-2,
                              "optimizer": OPTIMIZER.get(method, "adamw")},
                    distributed={"strategy": strategy})
    path = write_recipe(tmp_path / f"{name}.yaml", r)
    args = ["launch", str(path), "--nproc-per-node", str(nproc)] if nproc > 1 else ["train", str(path)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return [r["loss"] for r in read_metrics(out)[0]]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama):
    cache, base = {}, tmp_path_factory.mktemp("one")

    def get(method):
        if method not in cache:
            cache[method] = _losses(base, method, tiny_llama, method, 1, 4)
        return cache[method]
    return get


@pytest.mark.parametrize("method,strategy", PARITY)
def test_two_processes_match_one(tmp_path, tiny_llama, one_process, method, strategy):
    ref = one_process(method)
    two = _losses(tmp_path, "two", tiny_llama, method, 2, 2, strategy)
    assert ref[-1] < ref[0]
    for a, b in zip(ref, two):
        assert abs(a - b) <= 1e-4 * abs(a), (method, strategy, ref, two)


@pytest.mark.parametrize("method", ["qlora", pytest.param("dora", marks=pytest.mark.slow)])
def test_merge_lora_export(tmp_path, tiny_llama, method):
    """--merge-lora gives the adapter model's logits: DoRA, and QLoRA (merged into a dequantised, full-precision
    base, compared with the adapter on that same base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    r = tiny_recipe(tiny_llama, out, method=METHODS[method], training={"max_steps": 3, "learning_rate": 1e-2},
                    checkpoint={"every_steps": 3})
    _ = _losses  # same recipe shape as above, one process
    path = write_recipe(tmp_path / "r.yaml", r)
    res = run_cli("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    for args, name in (([], "adapter"), (["--merge-lora"], "merged")):
        res = run_cli("export", str(out / "checkpoints" / "step-00000003"), str(tmp_path / name), *args)
        assert res.returncode == 0, res.stderr[-3000:]
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "lora" not in " ".join(load_file(tmp_path / "merged" / "model.safetensors"))
    batch = {"input_ids": _batch()["input_ids"]}
    with torch.no_grad():
        assert torch.allclose(adapter(**batch).logits, merged(**batch).logits, atol=1e-4)


def test_qlora_gradients_survive_an_evaluation(tmp_path, tiny_llama):
    """An evaluation before training (eval mode, no grad) must not change the gradients of the training step
    after it. bitsandbytes repacks 4-bit weights for a CPU inference kernel without a backward on such a forward
    (on CPUs with AVX512-BF16); gradients then stop at every quantised layer and only the last adapters learn."""
    pytest.importorskip("bitsandbytes")
    recipe = _recipe(tiny_llama, tmp_path / "out", "qlora")
    batch = {"input_ids": torch.randint(0, 500, (2, 12))}

    def grads(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        model = _build(recipe, tiny_llama)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fresh, after_eval = grads(False), grads(True)
    assert fresh.keys() == after_eval.keys() and fresh
    first_layer = [n for n in fresh if ".layers.0." in n and "lora_B" in n]
    assert first_layer and all(fresh[n].abs().sum() > 0 for n in first_layer)
    for n in fresh:
        assert torch.allclose(fresh[n], after_eval[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("precision, unquantised", [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_qlora_keeps_the_unquantised_weights_in_the_precision_asked(tmp_path, tiny_llama, precision, unquantised):
    """QLoRA's weights that are not quantised (embeddings, head, norms): 16-bit in bf16-true, as the recipe asked
    (peft's fp32 preparation doubled their memory and their FSDP2 all-gathers); fp32 under mixed precision, which
    keeps every weight in fp32 (peft's prepare_model_for_kbit_training)."""
    pytest.importorskip("bitsandbytes")
    from dist_ft.model import ModelBuilder, load_tokenizer
    recipe = _recipe(tiny_llama, tmp_path / "out", "qlora", distributed={"precision": precision})
    tok = load_tokenizer(tiny_llama)
    model = ModelBuilder(recipe, tiny_llama, num_labels=None, label_names=[], pad_token_id=tok.pad_token_id,
                         dtype=torch.bfloat16, attn_implementation="sdpa").build()
    base = model.get_base_model()
    quantised = [n for n, p in base.named_parameters() if type(p).__name__ == "Params4bit"]
    others = {n: p.dtype for n, p in base.named_parameters() if type(p).__name__ != "Params4bit" and "lora_" not in n}
    assert quantised and "model.embed_tokens.weight" in others  # (tied to the head in this tiny model)
    assert set(others.values()) == {unquantised}, others
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
