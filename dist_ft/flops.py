"""Model FLOPs utilisation: model FLOPs per token x tokens/s / the devices' peak.

Model FLOPs per token follow the PaLM paper (appendix B): 6 N for the matrix multiplies of forward and backward
over the N non-embedding parameters, plus 12 L d T for attention scores and values (L layers, d model width, T
tokens in the sequence). Recomputation (activation checkpointing) and frozen weights are not subtracted or added:
MFU measures useful model work, whatever the method spends.
"""

from __future__ import annotations

import time

import torch

# Dense peak FLOP/s per device, by (name fragment, dtype). bf16/fp16 tensor-core figures without sparsity; fp32
# entries are TF32 tensor-core peaks where the GPU has them (PyTorch uses TF32 for fp32 matmuls there).
GPU_PEAKS = [
    ("H200", {"bf16": 989e12, "fp32": 494e12}),
    ("H100", {"bf16": 989e12, "fp32": 494e12}),
    ("A100", {"bf16": 312e12, "fp32": 156e12}),
    ("L40S", {"bf16": 362e12, "fp32": 183e12}),
    ("A10", {"bf16": 125e12, "fp32": 62.5e12}),
    ("L4", {"bf16": 121e12, "fp32": 60e12}),
    ("4090", {"bf16": 165e12, "fp32": 82.6e12}),
    ("V100", {"bf16": 125e12, "fp32": 15.7e12}),  # fp16 tensor cores; no bf16
    ("T4", {"bf16": 65e12, "fp32": 8.1e12}),
]


def flops_per_token(config, seq_len: int) -> float:
    """PaLM model FLOPs per trained token for a Hugging Face decoder config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = cfg.hidden_size
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * d
    gated = getattr(cfg, "hidden_act", "gelu") in ("silu", "swiglu") or getattr(cfg, "model_type", "") in (
        "llama", "qwen2", "mistral", "gemma", "qwen3")
    attn = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
    mlp = (3 if gated else 2) * d * inter
    # The output projection to the vocabulary is a matrix multiply too (PaLM counts it with N).
    n = layers * (attn + mlp) + d * cfg.vocab_size
    return 6.0 * n + 12.0 * layers * d * seq_len


def gpu_peak(name: str, dtype: str) -> float | None:
    for fragment, peaks in GPU_PEAKS:
        if fragment.lower() in name.lower():
            return peaks["bf16" if dtype in ("bf16", "fp16") else "fp32"]
    return None


def measured_cpu_peak(threads: int | None = None, size: int = 512, seconds: float = 0.3) -> float:
    """FLOP/s of this process's fp32 matrix multiply, measured briefly (the CPU's practical peak)."""
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)  # its own stream: the training RNG must not move (exact resume)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0)


def device_peak(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, dtype)
        return peak, f"{name} datasheet" if peak else f"{name}: not in the table (no MFU)"
    return measured_cpu_peak(), "measured fp32 matmul on this CPU process"


def mfu(flops_per_tok: float, tokens_per_s: float, peak_per_device: float, devices: int) -> float:
    return flops_per_tok * tokens_per_s / (peak_per_device * devices)
