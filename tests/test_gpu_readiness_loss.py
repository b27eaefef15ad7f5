"""GPU readiness of the loss path, pinned on a CPU (issue 21): the loss's chunk size by device type (item 7)."""

import pytest
import torch

from dist_ft import losses
from dist_ft.losses import chunk_rows, loss_sum


@pytest.mark.parametrize("vocab, rows", [(131072, 8), (49152, 21), (32000, 32), (1000, 1048), (1 << 21, 1)])
def test_cpu_chunks_stay_cache_sized(vocab, rows):
    # Today's CPU figures, unchanged: one chunk's fp32 copy is ~4 MB.
    assert chunk_rows(device_type="cpu", vocab=vocab) == rows


@pytest.mark.parametrize("device_type", ["cuda", "xpu", "mps"])
@pytest.mark.parametrize("vocab, rows", [(131072, 512), (49152, 1365), (256000, 262), (1 << 27, 1)])
def test_accelerator_chunks_are_large(device_type, vocab, rows):
    assert chunk_rows(device_type=device_type, vocab=vocab) == rows
    assert rows * vocab * 4 <= 256 << 20 or rows == 1  # one chunk's fp32 copy: at most 256 MB


def test_accelerator_loss_is_a_few_dozen_chunks_not_thousands():
    # 16k tokens at a 128k vocabulary: 2,048 chunks of ~10 launches each on the CPU's chunk size, 32 on a GPU's.
    tokens, vocab = 16384, 131072
    assert -(-tokens // chunk_rows(device_type="cpu", vocab=vocab)) == 2048
    assert -(-tokens // chunk_rows(device_type="cuda", vocab=vocab)) == 32


def test_the_loss_asks_for_its_chunk_size_by_the_logits_device(monkeypatch):
    asked = []

    def spy(*, device_type, vocab):
        asked.append((device_type, vocab))
        return 3

    monkeypatch.setattr(losses, "chunk_rows", spy)
    logits = torch.randn(10, 17, requires_grad=True)
    targets = torch.randint(0, 17, (10,))
    got = loss_sum(logits.clone(), targets)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert asked == [("cpu", 17)]
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
