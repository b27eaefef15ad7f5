"""Packed rows give every sample exactly the loss it gets alone: no attention or position leaks between samples,
for each attention backend available here, and for flash-attention through transformers' own dispatch over exact
CPU stand-ins for its kernels (the kernels need a GPU; the decision of what reaches them does not)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from dist_ft.data.batching import collate, pack
from dist_ft.data.formats import IGNORE, Example
from dist_ft.train.loss import forward_logits
from dist_ft.model import resolve_attention


def _per_token_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="none").view(labels.size(0), -1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_qwen2"])
def test_packed_equals_separate(attn, arch_fixture, request):
    path = request.getfixturevalue(arch_fixture)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()
    model.config.use_cache = False
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    examples = [Example(rng.integers(5, vocab, n).astype(np.int32), rng.integers(5, vocab, n).astype(np.int32))
                for n in (7, 12, 5, 9, 3)]
    rows = pack(examples, max_length=40, strategy="greedy")  # in order: the offsets below follow the samples
    assert len(rows) == 1
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        packed = _per_token_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                                 batch["labels"])[0]
    offset = 0
    for ex in examples:
        n = len(ex.input_ids)
        alone = collate([ex], pad_id=0)
        with torch.no_grad():
            ref = _per_token_loss(model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits,
                                  alone["labels"])[0]
        # Position offset+i of the packed row predicts token offset+i+1: same targets as the sample's own
        # positions 0..n-2 (the sample's first label is masked in the packed row and never a target alone).
        got = packed[offset:offset + n - 1]
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (attn, (got - ref).abs().max())
        if offset:  # the token before this sample must not be trained to predict its first token
            assert packed[offset - 1] == 0
        offset += n


def test_auto_attention_resolves_to_sdpa_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    impl, why = resolve_attention("auto", precision="bf16-mixed")
    assert impl == "sdpa" and "CUDA" in why


def test_flash_attention_refusals_name_the_reason(monkeypatch):
    """Here: no CUDA. On a GPU (simulated): package missing, fp32, an architecture transformers has no kernel for."""
    import importlib.util

    from dist_ft.model import flash_attention_problem, resolve_attention

    assert resolve_attention("auto", precision="bf16-mixed")[0] == "sdpa"
    assert "needs a CUDA GPU" in flash_attention_problem("flash_attention_2", precision="bf16-mixed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    assert "pip install 'dist-ft[flash-attn]'" in flash_attention_problem("flash_attention_2", precision="bf16-mixed")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    assert "bf16/fp16 only" in flash_attention_problem("flash_attention_2", precision="fp32")
    assert "not implemented for bloom" in flash_attention_problem("flash_attention_2", precision="bf16-mixed",
                                                                  model_type="bloom")
    assert flash_attention_problem("flash_attention_2", precision="bf16-mixed", model_type="llama") is None


# --- Packed micro-batches of several rows (issue 21, item 1). Flash-attention kernels find samples from position ids
# only in a batch of one row; losses.attention_inputs lays the rows end to end and names the boundaries for them. ---

def _two_packed_rows():
    """Rows [3, 4] + 1 padding and [5] + 3 padding: T = 8."""
    ids = torch.arange(1, 17).view(2, 8)
    labels = ids.clone() + 100
    labels[0, 7] = labels[1, 5:] = IGNORE
    labels[0, 0] = labels[0, 3] = labels[1, 0] = IGNORE  # pack() ignores every sample's first label
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2]])
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2"])
def test_flash_gets_one_row_with_the_sample_boundaries(impl):
    from dist_ft.train.loss import attention_inputs
    batch = _two_packed_rows()
    got = attention_inputs(batch, attn_implementation=impl)
    assert got["input_ids"].shape == got["position_ids"].shape == got["labels"].shape == (1, 16)
    assert torch.equal(got["input_ids"][0], batch["input_ids"].reshape(-1))
    assert torch.equal(got["position_ids"][0], batch["position_ids"].reshape(-1))
    assert got["cu_seq_lens_q"].dtype == torch.int32
    assert got["cu_seq_lens_q"].tolist() == got["cu_seq_lens_k"].tolist() == [0, 3, 7, 8, 13, 16]
    assert got["max_length_q"] == got["max_length_k"] == 5 and isinstance(got["max_length_q"], int)
    assert "attention_mask" not in got
    # Same targets as the [B, T] form (labels shifted by one within each row): nothing predicts across rows.
    flat_targets = F.pad(got["labels"][:, 1:], (0, 1), value=IGNORE)
    row_targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE).reshape(1, -1)
    assert torch.equal(flat_targets, row_targets)


def test_flash_boundaries_hold_for_one_row_and_for_rows_without_padding():
    from dist_ft.train.loss import attention_inputs
    one = {k: v[:1] for k, v in _two_packed_rows().items()}
    assert attention_inputs(one, attn_implementation="flash_attention_2")["cu_seq_lens_q"].tolist() == [0, 3, 7, 8]
    full = {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long),
            "position_ids": torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])}
    got = attention_inputs(full, attn_implementation="flash_attention_2")
    assert got["cu_seq_lens_q"].tolist() == [0, 4, 6, 8] and got["max_length_q"] == 4  # a row that ends a sample


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention", ""])
def test_other_kernels_get_packed_rows_as_they_are(impl):
    from dist_ft.train.loss import attention_inputs
    batch = _two_packed_rows()
    assert attention_inputs(batch, attn_implementation=impl) is batch  # they read restarts in every row


def test_padded_and_classification_batches_are_left_alone_under_flash():
    from dist_ft.train.loss import attention_inputs
    padded = collate([Example(np.arange(5, 12, dtype=np.int32), np.arange(5, 12, dtype=np.int32)),
                      Example(np.arange(5, 9, dtype=np.int32), np.arange(5, 9, dtype=np.int32))], pad_id=0)
    assert attention_inputs(padded, attn_implementation="flash_attention_2") is padded  # unpadded by its mask
    cls = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
           "labels": torch.tensor([0, 1])}
    assert attention_inputs(cls, attn_implementation="flash_attention_2") is cls


@pytest.fixture
def cpu_flash_kernels(monkeypatch):
    """transformers' own flash-attention path (integrations.flash_attention -> _flash_attention_forward, which chooses
    between the dense kernel, unpadding by the mask, and the varlen kernel) over CPU stand-ins for flash-attn's
    kernels: exact attention by SDPA, per sample for the varlen one. Every kernel call is recorded."""
    import transformers.modeling_flash_attention_utils as fa
    calls = []

    def attend(q, k, v, scale, causal):  # [B, T, H, D] in and out, as flash-attn lays them
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    def flash_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
        calls.append({"kernel": "dense", "q": tuple(q.shape)})
        return attend(q, k, v, softmax_scale, causal)

    def flash_varlen_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False, **kwargs):
        calls.append({"kernel": "varlen", "q": tuple(q.shape), "cu_seqlens": cu_seqlens_q.tolist(),
                      "max_seqlen": int(max_seqlen_q)})
        out = torch.empty_like(q)
        bounds = cu_seqlens_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            out[a:b] = attend(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0]
        return out

    kernels = ((flash_fn, flash_varlen_fn, None, fa._pad_input, fa._unpad_input),
               (fa._lazy_define_process_function(flash_varlen_fn), dict))
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: kernels)
    return calls


def _packed_and_alone(model, examples, max_length):
    rows = pack(examples, max_length=max_length, strategy="greedy")  # in order: the samples follow each other
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits, targets = forward_logits(model, batch)
        alone = []
        for ex in examples:
            one = collate([ex], pad_id=0)
            ref = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits[0]
            alone.append(ref[:len(ex.input_ids) - 1])  # positions 0..n-2 carry its targets (the last predicts nothing)
    return rows, batch, logits, targets, torch.cat(alone)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flash_attention_2"])
def test_packed_micro_batch_of_several_rows_equals_separate_samples(attn, tiny_llama, cpu_flash_kernels):
    """Per-token logits of a packed micro-batch (2 rows, B > 1) through the training loss's forward against each
    sample alone, tolerance 1e-5 (fp32). flash_attention_2 here is transformers' real dispatch over exact CPU
    kernels: before the fix it ran the dense kernel over each [B, T] row and the samples of a row attended to
    each other."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.config._attn_implementation = attn  # the layers look their kernel up by this name at every call
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    lengths = (7, 12, 5, 9, 3)
    examples = [Example(rng.integers(5, vocab, n).astype(np.int32), rng.integers(5, vocab, n).astype(np.int32))
                for n in lengths]
    rows, batch, logits, targets, ref = _packed_and_alone(model, examples, max_length=20)
    assert batch["input_ids"].shape == (2, 19)  # rows [7, 12] and [5, 9, 3] + 2 padding
    assert logits.shape == ref.shape and torch.equal(targets, torch.cat([torch.from_numpy(e.labels[1:]).long()
                                                                         for e in examples]))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    if attn == "flash_attention_2":  # pinned: what reaches the kernel in every layer
        layers = model.config.num_hidden_layers
        expected = {"kernel": "varlen", "q": (38, model.config.num_attention_heads,
                                             model.config.hidden_size // model.config.num_attention_heads),
                    "cu_seqlens": [0, 7, 19, 24, 33, 36, 38], "max_seqlen": 12}
        assert cpu_flash_kernels[:layers] == [expected] * layers
    else:
        assert cpu_flash_kernels == []


def test_rows_laid_end_to_end_give_the_same_logits_under_sdpa(tiny_llama):
    """The flash form itself ([1, B*T], boundaries as cu_seq_lens) run through sdpa keeps every sample's logits:
    the transform loses nothing whichever kernel reads it."""
    from dist_ft.train.loss import attention_inputs
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa", dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    vocab = model.config.vocab_size
    examples = [Example(rng.integers(5, vocab, n).astype(np.int32), rng.integers(5, vocab, n).astype(np.int32))
                for n in (6, 10, 4, 11, 8)]
    batch = collate(pack(examples, max_length=18, strategy="greedy"), pad_id=0)
    assert batch["input_ids"].shape[0] > 1
    flat = attention_inputs(batch, attn_implementation="flash_attention_2")
    inputs = {k: v for k, v in flat.items() if k != "labels"}
    with torch.no_grad():
        got = _per_token_loss(model(**inputs).logits, flat["labels"])[0]
        rows = _per_token_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                               batch["labels"])
    T = batch["input_ids"].shape[1]
    for r in range(rows.shape[0]):  # the flat row's positions r*T .. r*T+T-2 are row r's
        torch.testing.assert_close(got[r * T:r * T + T - 1], rows[r], atol=1e-5, rtol=1e-5)
    offset = 0
    for ex in examples[:2]:  # and row 0's samples match themselves alone
        n = len(ex.input_ids)
        alone = collate([ex], pad_id=0)
        with torch.no_grad():
            ref = _per_token_loss(model(**{k: v for k, v in alone.items() if k != "labels"}).logits, alone["labels"])
        torch.testing.assert_close(got[offset:offset + n - 1], ref[0], atol=1e-5, rtol=1e-5)
        offset += n
