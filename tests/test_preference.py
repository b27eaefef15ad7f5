"""Preference objectives (issue 23, the math layer): each loss and its gradients against an independent
implementation written here from the papers' formulas on fixed log-probs; sequence log-probs against a brute-force
full-vocabulary computation; DPO against TRL's DPOTrainer on the same batch and weights.

    .venv/bin/python -m pytest tests/test_preference.py -q
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dist_ft.data.formats import IGNORE
from dist_ft.train import preference as P

F64 = torch.float64

# Fixed per-sequence log-probs (sums over answer tokens) and answer lengths for 6 pairs, with both signs of the
# margin and a pair where the policy equals the reference.
PI_C = [-12.0, -30.5, -7.25, -41.0, -3.0, -18.0]
PI_R = [-14.5, -28.0, -9.0, -41.0, -6.5, -17.0]
REF_C = [-13.0, -29.0, -8.0, -40.0, -3.0, -18.5]
REF_R = [-13.5, -29.5, -8.5, -41.0, -5.0, -18.0]
N_C = [6, 15, 4, 20, 2, 9]
N_R = [7, 14, 5, 20, 3, 8]


def _leaves():
    return [torch.tensor(v, dtype=F64, requires_grad=True) for v in (PI_C, PI_R, REF_C, REF_R)]


def _sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _grads(loss: torch.Tensor, leaves) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss.sum(), leaves, allow_unused=True))


# ---------------------------------------------------------------------------------------------- the formulas

@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_and_gradient_equal_the_paper(beta, eps):
    pc, pr, rc, rr = _leaves()
    out = P.dpo(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    d_pc, d_pr = _grads(out.losses, [pc, pr])
    for i in range(len(PI_C)):
        h = beta * ((PI_C[i] - REF_C[i]) - (PI_R[i] - REF_R[i]))
        want = -(1 - eps) * math.log(_sigma(h)) - eps * math.log(_sigma(-h))
        assert out.losses[i].item() == pytest.approx(want, rel=1e-12)
        # d/dh [-log s(h)] = -(1 - s(h)); d/dh [-log s(-h)] = s(h); dh/dpi_c = beta, dh/dpi_r = -beta
        dh = -(1 - eps) * (1 - _sigma(h)) + eps * _sigma(h)
        assert d_pc[i].item() == pytest.approx(beta * dh, rel=1e-10)
        assert d_pr[i].item() == pytest.approx(-beta * dh, rel=1e-10)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (PI_C[i] - REF_C[i]))
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (PI_R[i] - REF_R[i]))


def test_ipo_loss_and_gradient_equal_the_paper():
    beta = 0.1
    pc, pr, rc, rr = _leaves()
    nc, nr = torch.tensor(N_C, dtype=torch.float64), torch.tensor(N_R, dtype=torch.float64)
    out = P.ipo(pc, pr, rc, rr, nc, nr, beta=beta)
    d_pc, d_pr = _grads(out.losses, [pc, pr])
    for i in range(len(PI_C)):
        h = (PI_C[i] - REF_C[i]) / N_C[i] - (PI_R[i] - REF_R[i]) / N_R[i]
        assert out.losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert d_pc[i].item() == pytest.approx(2 * (h - 1 / (2 * beta)) / N_C[i], rel=1e-10)
        assert d_pr[i].item() == pytest.approx(-2 * (h - 1 / (2 * beta)) / N_R[i], rel=1e-10)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_loss_and_gradient_equal_the_paper(beta, gamma):
    pc, pr, _, _ = _leaves()
    nc, nr = torch.tensor(N_C, dtype=torch.float64), torch.tensor(N_R, dtype=torch.float64)
    out = P.simpo(pc, pr, nc, nr, beta=beta, gamma=gamma)
    d_pc, d_pr = _grads(out.losses, [pc, pr])
    for i in range(len(PI_C)):
        z = beta / N_C[i] * PI_C[i] - beta / N_R[i] * PI_R[i] - gamma
        assert out.losses[i].item() == pytest.approx(-math.log(_sigma(z)), rel=1e-12)
        assert d_pc[i].item() == pytest.approx(-(1 - _sigma(z)) * beta / N_C[i], rel=1e-10)
        assert d_pr[i].item() == pytest.approx((1 - _sigma(z)) * beta / N_R[i], rel=1e-10)


def test_orpo_loss_and_gradient_equal_the_paper():
    beta = 0.1
    pc, pr, _, _ = _leaves()
    nc, nr = torch.tensor(N_C, dtype=torch.float64), torch.tensor(N_R, dtype=torch.float64)
    out = P.orpo(pc, pr, nc, nr, beta=beta)
    d_pc, d_pr = _grads(out.losses, [pc, pr])
    for i in range(len(PI_C)):
        p_c, p_r = math.exp(PI_C[i] / N_C[i]), math.exp(PI_R[i] / N_R[i])  # P(y|x) per token, eq. 4
        odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
        want = -PI_C[i] / N_C[i] - beta * math.log(_sigma(math.log(odds_c / odds_r)))
        assert out.losses[i].item() == pytest.approx(want, rel=1e-10)
        # Hong et al. eq. 10 (through the mean log-prob m = log p): d log odds / dm = 1 / (1 - p)
        z = math.log(odds_c / odds_r)
        assert d_pc[i].item() == pytest.approx((-1 - beta * (1 - _sigma(z)) / (1 - p_c)) / N_C[i], rel=1e-8)
        assert d_pr[i].item() == pytest.approx(beta * (1 - _sigma(z)) / (1 - p_r) / N_R[i], rel=1e-8)


def test_kto_loss_and_gradient_equal_the_paper():
    beta, wd, wu = 0.1, 1.0, 1.33
    pi = torch.tensor(PI_C + PI_R, dtype=F64, requires_grad=True)
    ref = torch.tensor(REF_C + REF_R, dtype=F64)
    desirable = torch.tensor([True] * 6 + [False] * 6)
    kl = torch.tensor(0.8, dtype=F64)
    out = P.kto(pi, ref, desirable, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    (d_pi,) = _grads(out.losses, [pi])
    for i in range(12):
        r = (PI_C + PI_R)[i] - (REF_C + REF_R)[i]
        if i < 6:
            want, grad = wd * (1 - _sigma(beta * (r - 0.8))), -wd * beta * _sigma(beta * (r - 0.8)) * (
                1 - _sigma(beta * (r - 0.8)))
        else:
            want, grad = wu * (1 - _sigma(beta * (0.8 - r))), wu * beta * _sigma(beta * (0.8 - r)) * (
                1 - _sigma(beta * (0.8 - r)))
        assert out.losses[i].item() == pytest.approx(want, rel=1e-12)
        assert d_pi[i].item() == pytest.approx(grad, rel=1e-10)
    # the reference point is a constant and never below 0
    neg = P.kto(pi, ref, desirable, torch.tensor(-3.0, dtype=F64), beta=beta)
    zero = P.kto(pi, ref, desirable, torch.tensor(0.0, dtype=F64), beta=beta)
    assert torch.equal(neg.losses, zero.losses)


# ---------------------------------------------------------------------------------------------- log-probs

def _batch(tok_ids: list[list[int]], answer_from: list[int], pad: int = 0) -> dict[str, torch.Tensor]:
    T = max(map(len, tok_ids))
    ids = torch.full((len(tok_ids), T), pad, dtype=torch.long)
    labels = torch.full((len(tok_ids), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(tok_ids), T), dtype=torch.long)
    for i, (row, a) in enumerate(zip(tok_ids, answer_from)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, a:len(row)] = torch.tensor(row[a:])
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_sequence_logps_equal_a_full_vocabulary_computation(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (11, 7, 15, 9)]
    batch = _batch(rows, [4, 2, 10, 3])
    with torch.no_grad():
        sums, counts = P.sequence_logps(model, batch)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).logits.float(), -1)
    for i, row in enumerate(rows):
        a = [4, 2, 10, 3][i]
        want = sum(logp[i, t - 1, row[t]].item() for t in range(a, len(row)))
        assert counts[i].item() == len(row) - a
        assert sums[i].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------------------------- TRL

def test_dpo_equals_trls_dpo_trainer_on_the_same_batch(tiny_llama, tmp_path):
    """TRL's DPOTrainer computes its loss on a batch it collated; dist_ft's log-probs and DPO loss on the same token
    ids, answer masks, policy and reference weights agree within 1e-4."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that has moved away from its reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pairs = {"prompt": ["the cat sat on", "a word means", "once upon a", "to be or"],
             "chosen": [" the mat today", " what it says", " time there was", " not to be"],
             "rejected": [" a hat", " nothing at all here", " dog", " maybe later then"]}
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.1,
                         loss_type=["sigmoid"], report_to=[], use_cpu=True, max_length=64, bf16=False,
                         precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=datasets.Dataset.from_dict(pairs), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)
    ids, comp = batch["input_ids"].cpu(), batch["completion_mask"].cpu()
    ours_batch = {"input_ids": ids, "attention_mask": batch["attention_mask"].cpu(),
                  "labels": ids.masked_fill(comp == 0, IGNORE)}
    with torch.no_grad():
        pi, _ = P.sequence_logps(policy.eval(), ours_batch)
        ref, _ = P.sequence_logps(reference, ours_batch)
    half = ids.size(0) // 2  # TRL's batch is [chosen..., rejected...], as ours
    ours = P.dpo(pi[:half], pi[half:], ref[:half], ref[half:], beta=0.1).losses.mean()
    assert abs(ours.item() - 0.6931) > 1e-3  # the policy really differs from its reference
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)
