"""The training loss: its own cross-entropy (gradient worked out in the forward, a chunk of rows at a time) against
torch's, in value and gradient, with ignored targets and rows split across several chunks."""

import pytest
import torch
import torch.nn.functional as F

from dist_ft.data.formats import IGNORE
from dist_ft.losses import _CrossEntropySum, loss_sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(dtype, monkeypatch):
    monkeypatch.setattr(_CrossEntropySum, "CHUNK_ELEMENTS", 7 * 1000)  # 7 rows a chunk: 150 rows in 22 chunks
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 50, 1000)).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 50))
    labels[0, :10] = IGNORE
    labels[2, 5] = IGNORE
    ours = loss_sum(logits, labels)
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


def test_logits_are_left_unchanged_and_eval_uses_torch():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.randint(0, 11, (2, 5))
    loss_sum(logits, labels).backward()
    assert torch.equal(logits.detach(), before)  # the fp32 path works on a copy of each chunk, never in place
    with torch.no_grad():
        assert loss_sum(logits, labels).grad_fn is None
