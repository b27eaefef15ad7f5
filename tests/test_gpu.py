"""The GPU matrix: {DDP, FSDP2, ZeRO-2, ZeRO-3} x {full, LoRA, QLoRA} x {sdpa, flash_attention_2}, bf16, 2 GPUs
against 1 GPU with the same global batch; packed rows through flash-attention's variable-length path; NCCL
timeouts. Skipped without CUDA (with the reason); on a 2-GPU box:

    bash scripts/test.sh -m gpu          # or: .venv/bin/python -m pytest -m gpu tests/test_gpu.py
"""

import importlib.util
import time

import pytest
import torch

from conftest import read_metrics, run_cli, tiny_recipe, write_recipe

pytestmark = pytest.mark.gpu

STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]
METHODS = {"full": {"kind": "full"},
           "lora": {"kind": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
           "qlora": {"kind": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}}
ATTENTION = ["sdpa", "flash_attention_2"]


def _need(gpus: int, attn: str = "sdpa"):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs, found {torch.cuda.device_count()}")
    if attn.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed: pip install 'dist-ft[flash-attn]'")
    if not torch.cuda.is_bf16_supported():
        pytest.skip("the GPU has no bfloat16 (needs compute capability 8.0+)")


def _losses(tmp_path, name, model, *, nproc, strategy, method, attn, micro, packing=False):
    out = tmp_path / name
    r = tiny_recipe(model, out, method=METHODS[method], model={"path": str(model), "attn_implementation": attn},
                    data={"packing": packing, "max_length": 96},
                    training={"max_steps": 8, "micro_batch_size": micro, "learning_rate": 2e-3},
                    distributed={"strategy": strategy, "precision": "bf16-mixed"})
    path = write_recipe(tmp_path / f"{name}.yaml", r)
    args = ["launch", str(path), "--nproc-per-node", str(nproc)] if nproc > 1 else ["train", str(path)]
    res = run_cli(*args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"attention: {attn}" in res.stdout
    return [r["loss"] for r in read_metrics(out)[0]]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_gpus_match_one(tmp_path, tiny_llama, strategy, method, attn):
    _need(2, attn)
    if method == "qlora" and strategy in ("fsdp", "zero3"):
        res = run_cli("check", str(write_recipe(tmp_path / "q.yaml", tiny_recipe(
            tiny_llama, tmp_path / "q", method=METHODS[method], distributed={"strategy": strategy}))))
        assert res.returncode == 2 and "qlora" in res.stderr  # refused with the reason, not run
        return
    one = _losses(tmp_path, "one", tiny_llama, nproc=1, strategy="ddp", method=method, attn=attn, micro=4)
    two = _losses(tmp_path, "two", tiny_llama, nproc=2, strategy=strategy, method=method, attn=attn, micro=2)
    assert one[-1] < one[0]
    for a, b in zip(one, two):
        assert abs(a - b) <= 2e-2 * abs(a), (one, two)  # bf16 compute: ~1e-2 relative


def test_packed_rows_through_flash_varlen_match_padding(tmp_path, tiny_llama):
    """flash_attention_2 reads position-id restarts as sequence boundaries (cu_seqlens): packed = padded."""
    _need(1, "flash_attention_2")
    packed = _losses(tmp_path, "packed", tiny_llama, nproc=1, strategy="ddp", method="full",
                     attn="flash_attention_2", micro=2, packing=True)
    sdpa = _losses(tmp_path, "sdpa", tiny_llama, nproc=1, strategy="ddp", method="full", attn="sdpa", micro=2,
                   packing=True)
    for a, b in zip(packed, sdpa):
        assert abs(a - b) <= 2e-2 * abs(a), (packed, sdpa)


def test_nccl_timeout_ends_the_job(tmp_path, tiny_llama):
    _need(2)
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_llama, out, distributed={"timeout_seconds": 20}))
    t0 = time.perf_counter()
    res = run_cli("launch", str(path), "--nproc-per-node", "2", env={"DIST_FT_FAULT": "hang:3:1"}, timeout=600)
    assert res.returncode != 0 and time.perf_counter() - t0 < 300
    assert not (out / "final").exists()
