"""Packed rows give every sample exactly the loss it gets alone: no attention or position leaks between samples,
for each attention backend available here."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from dist_ft.data.batching import collate, pack
from dist_ft.data.formats import IGNORE, Example
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
