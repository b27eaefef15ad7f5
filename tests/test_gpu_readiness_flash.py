"""On a GPU with flash-attn (issue 21, item 1): a packed micro-batch of several rows through the training loss's
forward gives every sample's per-token logits as it gets alone, with the real flash-attention kernels. The CPU
side (tests/test_packing_attention.py) pins what reaches the kernels; this checks the kernels agree.

    bash scripts/test.sh -m gpu tests/test_gpu_readiness_flash.py
"""

import importlib.util

import numpy as np
import pytest
import torch

from dist_ft.data.batching import collate, pack
from dist_ft.data.formats import Example
from dist_ft.train.loss import forward_logits

# bf16 logits of the same sample from the varlen and the dense flash kernel: rounding only. Samples attending to each
# other (the defect) differ by far more, which the test checks too, so the tolerance cannot hide it.
TOLERANCE = 2e-2


@pytest.mark.gpu
def test_packed_rows_under_flash_attention_equal_samples_alone(tiny_llama):
    from transformers import AutoModelForCausalLM
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed: pip install 'dist-ft[flash-attn]'")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash-attention 2 needs an Ampere or newer GPU")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda().eval()
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    examples = [Example(rng.integers(5, vocab, n).astype(np.int32), rng.integers(5, vocab, n).astype(np.int32))
                for n in (70, 120, 50, 90, 30)]
    batch = {k: v.cuda() for k, v in collate(pack(examples, max_length=200, strategy="greedy"), pad_id=0).items()}
    assert batch["input_ids"].shape[0] == 2  # rows [70, 120] and [50, 90, 30]: B > 1, the case that mixed samples
    with torch.no_grad():
        logits, _ = forward_logits(model, batch)
        alone = torch.cat([model(input_ids=torch.as_tensor(e.input_ids, dtype=torch.long, device="cuda")[None]
                                 ).logits[0, :len(e.input_ids) - 1] for e in examples])
        # The [B, T] rows as they were handed to the model before the fix: dense attention across each row.
        mixed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    diff = (logits.float() - alone.float()).abs().max().item()
    assert diff <= TOLERANCE, diff
    row1 = batch["input_ids"].shape[1] + 50  # sample 4 (90 tokens) follows sample 3 in row 1: it saw sample 3 then
    leaked = (mixed.reshape(-1, vocab)[row1:row1 + 89].float() - alone[70 - 1 + 120 - 1 + 50 - 1:][:89].float())
    assert leaked.abs().max().item() > 5 * TOLERANCE  # the comparison can see the defect it guards against
