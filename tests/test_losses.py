"""The training loss: its own cross-entropy (gradient worked out in the forward, a chunk of rows at a time) against
torch's, in value and gradient, with ignored targets and rows split across several chunks; and the head run only
at target positions against the head run everywhere, in loss and in every parameter's gradient."""

import pytest
import torch
import torch.nn.functional as F

from dist_ft.train import loss as losses
from dist_ft.data.formats import IGNORE
from dist_ft.train.loss import _CrossEntropySum, forward_logits, loss_sum


def _flat(logits, labels):
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return logits.reshape(-1, logits.size(-1)), targets.reshape(-1)


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype, reuse, monkeypatch):
    monkeypatch.setattr(_CrossEntropySum, "CHUNK_ELEMENTS", 7 * 1000)  # 7 rows a chunk: 150 rows in 22 chunks
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 50, 1000)).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 50))
    labels[0, :10] = IGNORE
    labels[2, 5] = IGNORE
    produced = logits.clone()  # as a head's output is: not a leaf, and what reuse_logits overwrites
    ours = loss_sum(*_flat(produced, labels), reuse_logits=reuse)
    (0.37 * ours).backward()
    grad, logits.grad = logits.grad.clone(), None
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1)
    ref = F.cross_entropy(logits.reshape(-1, 1000).float(), targets, ignore_index=IGNORE, reduction="sum")
    (0.37 * ref).backward()
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    assert grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of the gradient
    assert (grad.float() - logits.grad.float()).abs().max() <= tol
    assert (grad[0, :9] == 0).all()  # rows whose (shifted) target is ignored get no gradient


def test_reused_logits_hold_the_gradient_unless_their_producer_keeps_them():
    torch.manual_seed(0)
    z = torch.randn(4, 6, 13, requires_grad=True)
    w = torch.randn(13, 13, requires_grad=True)
    labels = torch.randint(0, 13, (4, 6))
    logits = z @ w  # as a head makes them: the matmul keeps its inputs, not its output
    loss_sum(*_flat(logits, labels), reuse_logits=True).backward()
    grad_z = z.grad.clone()
    torch.testing.assert_close(logits.detach() @ w.detach().T, grad_z)  # the gradient lives where the logits were
    # A soft-cap's tanh keeps its output for its backward: the gradient gets a tensor of its own, and is right.
    z.grad = None
    capped = 5.0 * torch.tanh((z @ w) / 5.0)
    loss_sum(*_flat(torch.tanh(capped), labels), reuse_logits=True).backward()
    got, z.grad = z.grad.clone(), None
    ref = F.cross_entropy(torch.tanh(5.0 * torch.tanh((z @ w) / 5.0)).reshape(-1, 13),
                          F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    ref.backward()
    torch.testing.assert_close(got, z.grad)
    # Kept out of sight (a Function saving its own output), overwriting stops the backward: never a wrong gradient.

    class Keeps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = x * 2
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * 2 + 0 * y

    with pytest.raises(RuntimeError, match="inplace"):
        loss_sum(*_flat(Keeps.apply(z @ w), labels), reuse_logits=True).backward()


def test_logits_are_left_unchanged_and_eval_uses_torch():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.randint(0, 11, (2, 5))
    loss_sum(*_flat(logits, labels)).backward()
    assert torch.equal(logits.detach(), before)  # the fp32 path works on a copy of each chunk, never in place
    with torch.no_grad():
        assert loss_sum(*_flat(logits, labels)).grad_fn is None


class _Wrapper(torch.nn.Module):
    """Stands for DDP and DeepSpeed's engine: the model under `.module`, keyword arguments passed through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        return self.module(**kw)


def _instruction_batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (3, 20), generator=g)
    labels = ids.clone()
    labels[0, :12] = IGNORE  # prompts of different lengths carry no target
    labels[1, :5] = IGNORE
    labels[2, 15:] = IGNORE  # padding at the end
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits, targets = forward_logits(model, batch)
    loss = loss_sum(logits, targets)
    loss.backward()
    return logits.shape, float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora", "prompt_tuning"])
def test_head_runs_only_at_target_positions(tiny_llama, monkeypatch, method):
    import peft
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           init_lora_weights=False))
    elif method == "prompt_tuning":
        model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model = _Wrapper(model)
    batch = _instruction_batch(model.module.config.vocab_size)
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    selects = losses.selects_positions(model)
    assert selects == (method != "prompt_tuning")  # virtual tokens would shift the positions a mask names
    shape, loss, grads = _loss_and_grads(model, batch)
    assert shape[0] == (n_targets if selects else batch["input_ids"].numel())
    monkeypatch.setattr(losses, "selects_positions", lambda m: False)
    full_shape, ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert full_shape[0] == batch["input_ids"].numel()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_classifier_logits_are_per_sample(tiny_classifier):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    ids = torch.randint(4, 100, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([2, 0])}
    with torch.no_grad():
        logits, targets = forward_logits(model, batch)
    assert logits.shape == (2, 3) and torch.equal(targets, batch["labels"])
    ref = F.cross_entropy(logits.float(), targets, reduction="sum")
    assert float(loss_sum(logits, targets)) == pytest.approx(float(ref), rel=1e-6)
