"""training.fused_loss: the head and the cross-entropy fused over chunks of target rows (dist_ft/train/fused_loss.py).
Checked against PyTorch's own F.linear + F.cross_entropy (values and every gradient), inside a model against the
unfused training loss, across strategies on 2 processes, and for what it must refuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_ft.data.formats import IGNORE
from dist_ft.train import fused_loss
from dist_ft.train.step import training_loss_sum
from conftest import read_metrics, run_cli, tiny_recipe, write_recipe


def _reference(hidden, weight, bias, targets):
    """Autograd through the whole [N, V] logits in fp32: what the fusion must equal."""
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    b = bias.detach().float().requires_grad_() if bias is not None else None
    loss = F.cross_entropy(F.linear(h, w, b), targets, ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad if b is not None else None


def _head_inputs(seed, n, hdim, vocab, with_bias, ignored):
    """Random fp32 head inputs that need gradients, and targets with `ignored` rows set to IGNORE."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hdim, generator=g) * 0.5).requires_grad_()
    bias = torch.randn(vocab, generator=g).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[ignored] = IGNORE
    return g, hidden, weight, bias, targets


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_equals_linear_then_cross_entropy(rows, with_bias):
    _, hidden, weight, bias, targets = _head_inputs(0, 37, 16, 101, with_bias, [3, 10, 11])
    loss = fused_loss.LinearCrossEntropySum.apply(hidden, weight, bias, targets, rows)
    (loss * 0.37).backward()  # the incoming gradient scales every gradient (train_step's 1/targets)
    ref_loss, ref_h, ref_w, ref_b = _reference(hidden, weight, bias, targets)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert torch.allclose(hidden.grad, ref_h * 0.37, atol=1e-6)
    assert torch.allclose(weight.grad, ref_w * 0.37, atol=1e-6)
    assert hidden.grad[[3, 10, 11]].abs().max() == 0  # ignored rows give no gradient
    if with_bias:
        assert torch.allclose(bias.grad, ref_b * 0.37, atol=1e-6)


def test_bf16_is_within_rounding_and_a_frozen_head_gets_no_gradient():
    g = torch.Generator().manual_seed(1)
    n, hdim, vocab = 64, 32, 300
    hidden = torch.randn(n, hdim, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, hdim, generator=g) * 0.3).to(torch.bfloat16)  # frozen (LoRA, QLoRA)
    targets = torch.randint(0, vocab, (n,), generator=g)
    loss = fused_loss.LinearCrossEntropySum.apply(hidden, weight, None, targets, 10)
    loss.backward()
    ref_loss, ref_h, _, _ = _reference(hidden, weight, None, targets)
    assert weight.grad is None and hidden.grad.dtype == torch.bfloat16
    assert abs(float(loss.detach()) - float(ref_loss)) <= 2e-3 * float(ref_loss)  # logits rounded to bf16 once
    rel = (hidden.grad.float() - ref_h).norm() / ref_h.norm()
    assert rel < 1e-2, rel  # one bf16 rounding of the logits' gradient and of the product


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_per_row_losses_equal_cross_entropy_rows_under_any_row_weights(rows, with_bias):
    """The preference objectives' form: each row's cross-entropy, then a weighted sum with weights known only in
    the backward. Values and every gradient against autograd through the whole logits."""
    n = 29
    g, hidden, weight, bias, targets = _head_inputs(2, n, 16, 97, with_bias, [0, 5])
    row_w = torch.randn(n, generator=g)  # a nonlinear objective's per-row weights, e.g. DPO's
    ce = fused_loss.LinearCrossEntropyRows.apply(hidden, weight, bias, targets, rows)
    (ce * row_w).sum().backward()
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if with_bias else None
    ref = F.cross_entropy(F.linear(h, w, b), targets, ignore_index=IGNORE, reduction="none")
    (ref * row_w).sum().backward()
    assert torch.allclose(ce, ref.detach(), atol=1e-5) and ce[[0, 5]].abs().max() == 0
    assert torch.allclose(hidden.grad, h.grad, atol=1e-6)
    assert torch.allclose(weight.grad, w.grad, atol=1e-6)
    if with_bias:
        assert torch.allclose(bias.grad, b.grad, atol=1e-6)


def _model_and_batch(tiny_llama, dtype=torch.float32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = IGNORE  # a prompt
    labels[2, 15:] = IGNORE  # padding
    return model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_inside_a_model_equals_the_unfused_training_loss(tiny_llama):
    """The same model, batch and parameters: loss and every parameter's gradient, fused against unfused."""
    model, batch = _model_and_batch(tiny_llama)
    losses, grads = {}, {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        loss = training_loss_sum(model, batch, fused=fused)
        loss.backward()
        losses[fused] = float(loss)
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert fused_loss.why_not_fusable(model) is None
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    # (this tiny model ties its head to the embeddings: the head's gradient arrives there, with the embedding's)
    assert grads[True].keys() == grads[False].keys() and "model.embed_tokens.weight" in grads[True]
    for n in grads[False]:
        assert torch.allclose(grads[True][n], grads[False][n], atol=1e-6, rtol=1e-5), n
    # the head still gives logits when no targets are set (evaluation, generation)
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"]).logits.shape[-1] == model.config.vocab_size


def test_refuses_what_it_cannot_fuse(tiny_llama, tmp_path):
    model, _ = _model_and_batch(tiny_llama)
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fused_loss.why_not_fusable(model)
    from dist_ft.config import RecipeError, recipe_from_dict
    for training, method, needle in [
            ({"fused_loss": True}, {"kind": "prompt_tuning"}, "prompt_tuning shifts"),
    ]:
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(tiny_recipe(tiny_llama, tmp_path / "o", training=training, method=method))
        assert needle in str(e.value)
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(tiny_recipe(tiny_llama, tmp_path / "o", training={"fused_loss": True},
                                     model={"task": "sequence_classification"}))
    assert "training.fused_loss" in str(e.value)


def test_sequence_log_probs_for_the_preference_losses_equal_the_unfused(tiny_llama):
    """DPO's policy term through the fused head: each sequence's summed log-probabilities (rows and packed segments)
    and every parameter's gradient of a DPO-like loss, fused against the logits path."""
    from dist_ft.train.preference import dpo, sequence_logps

    model, batch = _model_and_batch(tiny_llama)
    packed = {**batch, "segments": torch.tensor([[0] * 10 + [1] * 10, [2] * 20, [3] * 12 + [4] * 8])}
    for b in (batch, packed):
        out = {}
        for fused in (False, True):
            model.zero_grad(set_to_none=True)
            logps, counts = sequence_logps(model, b, fused=fused)
            k = logps.size(0) // 2
            dpo(logps[:k], logps[k:2 * k], torch.zeros(k), torch.zeros(k), beta=0.1).losses.sum().backward()
            out[fused] = (logps.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None})
        assert torch.allclose(out[True][0], out[False][0], atol=1e-5) and torch.equal(out[True][1], out[False][1])
        assert out[True][2].keys() == out[False][2].keys() and out[True][2]
        for n in out[False][2]:
            assert torch.allclose(out[True][2][n], out[False][2][n], atol=1e-6, rtol=1e-4), n


def test_the_reference_policy_runs_the_fused_head_too(tiny_llama, monkeypatch):
    """With training.fused_loss the reference's forward (adapters off, a frozen copy, the precomputed pass) holds no
    whole logits either: it used to run the logits path, whose [targets x vocab] logits and their fp32 log-softmax
    made it the step's largest tensor. Equal to the unfused reference, and the logits path is never taken."""
    from types import SimpleNamespace
    from contextlib import nullcontext
    from dist_ft.train import preference
    from dist_ft.train.reference import ReferencePolicy

    model, batch = _model_and_batch(tiny_llama)
    strategy = SimpleNamespace(forward_context=nullcontext)
    cfg = SimpleNamespace(kind="dpo", reference="copy")
    out = {}
    for fused in (False, True):
        ref = ReferencePolicy(cfg, "full", fused)
        ref.copy = model
        if fused:
            monkeypatch.setattr(preference, "forward_logits", lambda *a, **k: pytest.fail("whole logits"))
        out[fused] = ref.logps(strategy, batch)
    assert not out[True].requires_grad and torch.allclose(out[True], out[False], atol=1e-5)


def test_a_fused_dpo_run_on_two_ranks_trains_what_the_unfused_one_trains(tmp_path, tiny_llama):
    """training.fused_loss with objective.kind dpo (LoRA, the reference: adapters off) under FSDP2, 2 ranks."""
    from test_preference_training import _pairs

    losses, pairs = {}, _pairs(tmp_path / "pairs.jsonl")
    for fused in (False, True):
        out = tmp_path / f"dpo-{fused}"
        recipe = tiny_recipe(tiny_llama, out, training={"max_steps": 3, "micro_batch_size": 2, "fused_loss": fused},
                             data={"train": str(pairs), "format": "preference", "max_length": 48,
                                   "max_train_samples": None, "max_eval_samples": None, "eval_fraction": 0.2},
                             objective={"kind": "dpo"},
                             method={"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                             distributed={"strategy": "fsdp"})
        r = run_cli("launch", str(write_recipe(tmp_path / f"dpo-{fused}.yaml", recipe)), "--nproc-per-node", "2",
                    timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        losses[fused] = [x["loss"] for x in read_metrics(out)[0]]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


# CI time: ZeRO-3's run in the slow suite (FSDP2's stays: both gather the head around its forward)
@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_two_ranks_train_what_the_unfused_loss_trains(tmp_path, tiny_llama, strategy):
    """FSDP2 and ZeRO-3 gather the head around its forward: the fused head must see the whole weight. Full
    fine-tuning (the head trains too), 3 steps, losses equal to the unfused run's."""
    losses = {}
    for fused in (False, True):
        out = tmp_path / f"{strategy}-{fused}"
        recipe = tiny_recipe(tiny_llama, out, method={"kind": "full"},
                             training={"max_steps": 3, "micro_batch_size": 2, "fused_loss": fused},
                             distributed={"strategy": strategy})
        r = run_cli("launch", str(write_recipe(tmp_path / f"{strategy}-{fused}.yaml", recipe)),
                    "--nproc-per-node", "2", timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        if fused:
            assert "fused loss" in r.stdout + r.stderr
        losses[fused] = [x["loss"] for x in read_metrics(out)[0]]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("gpu", ["H100", "cpu"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_plan_counts_the_fused_head_without_the_logits(method, gpu):
    """Llama-3-8B (128k vocabulary) at 4,096 tokens: the plan's head-and-loss row is the [4096 x 128,256] gradient
    unfused, and one chunk plus the head input's gradient and a log-sum-exp per row fused (a trained head's own
    gradient is the same either way, in the gradients row)."""
    from dist_ft import plan as P
    from dist_ft.config import load_recipe
    base = ["model.path=builtin:llama-3-8b", f"method.kind={method}", "distributed.strategy=fsdp",
            "distributed.precision=bf16-true", "data.max_length=4096", "training.micro_batch_size=1"]
    cluster = P.make_cluster(nodes=1, gpus_per_node=8, gpu=gpu)
    rows = {}
    for fused in (False, True):
        plan = P.make_plan(load_recipe(None, base + [f"training.fused_loss={str(fused).lower()}"]), cluster,
                           find_max=False, timed=False)
        rows[fused] = next(r for r in plan.rows if r.key == "logits")
    vocab, hidden = 128_256, 4096
    chunk = fused_loss.chunk_rows(device_type="cpu" if gpu == "cpu" else "cuda", vocab=vocab)
    assert rows[False].device == 4096 * vocab * 2
    assert rows[True].device == chunk * vocab * (2 + 4) + 4096 * (hidden * 2 + 4)
    assert "fused" in rows[True].detail
    # the bar, on this machine: at most 1/8 of the unfused head and loss
    assert rows[True].device <= rows[False].device / (8 if gpu == "cpu" else 4)
