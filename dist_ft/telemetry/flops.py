"""Model FLOPs utilisation: model FLOPs per token x tokens/s / the devices' peak.

Model FLOPs per token follow the PaLM paper (appendix B): 6 N for the matrix multiplies of forward and backward
over the N non-embedding parameters, plus 12 L d T for attention scores and values (L layers, d model width, T
tokens in the sequence): forward 2 N + 4 L d T, the backward's input gradients as much again (the attention's
twice: both operands of its matmuls are activations), the weight gradients 2 N. That is full fine-tuning. A method
that freezes weights computes less, and `step_flops_per_token` counts what it computes (`MethodFlops`): no weight
gradients for frozen matrices, no input gradients below the lowest trainable block, the adapters' own matmuls.
MFU counts that model work; HFU adds what activation checkpointing recomputes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuPeaks:
    """Dense (no structured sparsity) tensor-core peak FLOP/s of one GPU model, from the vendor's datasheet. fp32 is
    the TF32 tensor-core figure where the GPU has TF32 (topology.py turns TF32 on for fp32 matmuls), else the
    CUDA-core fp32 figure. bf16/fp16 are with fp32 accumulation; None where the GPU has no such tensor cores."""
    model: str
    bf16: float | None
    fp16: float | None
    fp32: float

    def for_dtype(self, dtype: str) -> float | None:
        return {"bf16": self.bf16, "fp16": self.fp16, "fp32": self.fp32}[dtype]


T = 1e12
# Each model once, keyed by the exact names `torch.cuda.get_device_name()` reports for it (case and surrounding
# spaces aside). Names are matched whole: "NVIDIA L40" is not "NVIDIA L4", an H100 PCIe is not an SXM part. A name not
# listed gets no MFU rather than another GPU's figure.
_GPUS = [
    (GpuPeaks("H100 SXM", 989 * T, 989 * T, 494 * T),  # 1,979 / 989 TFLOPS with sparsity
     ["NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB", "NVIDIA H100 SXM5 64GB", "NVIDIA H100 64GB HBM3"]),
    (GpuPeaks("H100 PCIe", 756 * T, 756 * T, 378 * T), ["NVIDIA H100 PCIe"]),  # 1,513 / 756 with sparsity
    (GpuPeaks("H100 NVL", 835 * T, 835 * T, 417.5 * T), ["NVIDIA H100 NVL"]),  # 1,671 / 835 with sparsity
    (GpuPeaks("GH200", 989 * T, 989 * T, 494 * T), ["NVIDIA GH200 480GB", "NVIDIA GH200 144G HBM3e"]),
    (GpuPeaks("H200 SXM", 989 * T, 989 * T, 494 * T), ["NVIDIA H200", "NVIDIA H200 141GB HBM3e"]),
    (GpuPeaks("H200 NVL", 835 * T, 835 * T, 417.5 * T), ["NVIDIA H200 NVL"]),
    # SXM4 and PCIe A100s share their datasheet peaks.
    (GpuPeaks("A100", 312 * T, 312 * T, 156 * T),
     ["NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100-PCIE-80GB",
      "NVIDIA A100 80GB PCIe", "NVIDIA A100 40GB PCIe", "NVIDIA A100-SXM-80GB"]),
    (GpuPeaks("A40", 149.7 * T, 149.7 * T, 74.8 * T), ["NVIDIA A40"]),
    (GpuPeaks("A10", 125 * T, 125 * T, 62.5 * T), ["NVIDIA A10"]),
    (GpuPeaks("L40S", 362.05 * T, 362.05 * T, 183 * T), ["NVIDIA L40S"]),
    (GpuPeaks("L40", 181.05 * T, 181.05 * T, 90.5 * T), ["NVIDIA L40"]),  # half-rate fp32 accumulation
    (GpuPeaks("L4", 121 * T, 121 * T, 60 * T), ["NVIDIA L4"]),
    (GpuPeaks("RTX 4090", 165.2 * T, 165.2 * T, 82.6 * T), ["NVIDIA GeForce RTX 4090"]),
    # Volta and Turing: fp16 tensor cores only (bf16 is emulated), no TF32.
    (GpuPeaks("V100 SXM2", None, 125 * T, 15.7 * T), ["Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"]),
    (GpuPeaks("V100 PCIe", None, 112 * T, 14 * T), ["Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB"]),
    (GpuPeaks("V100S PCIe", None, 130 * T, 16.4 * T), ["Tesla V100S-PCIE-32GB"]),
    (GpuPeaks("T4", None, 65 * T, 8.1 * T), ["Tesla T4"]),
]
GPU_PEAKS = {name.lower(): peaks for peaks, names in _GPUS for name in names}
# `dist-ft plan --gpu` names (plan.GPU_MEMORY_GIB) for the part each stands for.
PLAN_GPUS = {"H100": "NVIDIA H100 80GB HBM3", "H200": "NVIDIA H200", "A100-80G": "NVIDIA A100-SXM4-80GB",
             "A100-40G": "NVIDIA A100-SXM4-40GB", "L40S": "NVIDIA L40S", "L4": "NVIDIA L4", "A10": "NVIDIA A10",
             "4090": "NVIDIA GeForce RTX 4090", "V100": "Tesla V100-SXM2-32GB", "T4": "Tesla T4"}


def gpu_peaks(device_name: str) -> GpuPeaks | None:
    """The datasheet peaks of the GPU that `torch.cuda.get_device_name()` calls `device_name` (or a `dist-ft plan`
    GPU name); None for a GPU not in the table. Pure."""
    name = PLAN_GPUS.get(device_name.strip(), device_name)
    return GPU_PEAKS.get(" ".join(name.split()).lower())


def flops_per_token(config, seq_len: int) -> float:
    """PaLM model FLOPs per trained token for a Hugging Face decoder config (full fine-tuning)."""
    blocks, head, attention, _ = _matmul_counts(config, seq_len)
    return 6.0 * (blocks + head) + 3.0 * attention


@dataclass(frozen=True)
class MethodFlops:
    """What a method's step computes, read off the model (`method_flops`): the share of transformer blocks that pass
    input gradients back (every block from the lowest one with a trainable parameter up), the share of the base
    matmul weights that get weight gradients, the adapters' own matmul parameters (trained), and whether the
    blocks' forward is recomputed (activation checkpointing)."""
    grad_blocks: float = 1.0
    weight_grads: float = 1.0
    adapter_params: int = 0
    recompute: bool = False


def step_flops_per_token(config, seq_len: int, m: MethodFlops = MethodFlops()) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token of one training step under method `m`. With the defaults
    (full fine-tuning) the model FLOPs are PaLM's 6 N + 12 L d T."""
    blocks, head, attention, last = _matmul_counts(config, seq_len)
    A, g = m.adapter_params, m.grad_blocks
    forward = 2.0 * (blocks + head + A) + attention
    input_grads = 2.0 * (head + g * (blocks + A)) + 2.0 * g * attention  # the head's always: it feeds the loss
    weight_grads = 2.0 * m.weight_grads * (blocks + head) + 2.0 * A
    model = forward + input_grads + weight_grads
    # Non-reentrant checkpointing recomputes a block's forward only as far as backward needs saved tensors: not
    # its last matmul (the MLP's down projection), whose output nothing saves.
    recompute = g * (2.0 * (blocks - last + A) + attention) if m.recompute else 0.0
    return model, model + recompute


def method_flops(model: torch.nn.Module, config, *, recompute: bool) -> MethodFlops:
    """MethodFlops of `model` as built (a Hugging Face or PEFT causal LM, unwrapped): from which parameters train."""
    from ..distributed.fsdp.strategy import transformer_blocks

    blocks = transformer_blocks(model)
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    embeddings = model.get_input_embeddings()
    if embeddings is not None and any(p.requires_grad for p in embeddings.parameters()):
        lowest = 0  # a trained embedding needs input gradients all the way down
    else:
        lowest = trains.index(True) if True in trains else len(blocks)
    g = (len(blocks) - lowest) / max(len(blocks), 1)
    adapters = trained = 0
    tied = getattr(model.get_output_embeddings(), "weight", None) is getattr(embeddings, "weight", None)
    for name, p in model.named_parameters():
        if not p.requires_grad or p.dim() < 2:
            continue
        if "lora_" in name:
            adapters += p.numel()
        elif p is not getattr(embeddings, "weight", None) or tied:
            trained += p.numel()
    blocks_n, head_n, _, _ = _matmul_counts(config, 1)
    return MethodFlops(g, min(trained / max(blocks_n + head_n, 1), 1.0), adapters, recompute)


def _matmul_counts(config, seq_len: int) -> tuple[float, float, float, float]:
    """(matmul weights of the transformer blocks, of the output head, attention forward FLOPs per token, weights of
    the blocks' last matmuls: the MLP down projections)."""
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
    return float(layers * (attn + mlp)), float(d * cfg.vocab_size), 4.0 * layers * d * seq_len, float(layers * d * inter)


def gpu_peak(name: str, dtype: str) -> float | None:
    """Peak FLOP/s of GPU `name` for matmuls in `dtype` (bf16 | fp16 | fp32); None when unknown (MFU not reported)."""
    peaks = gpu_peaks(name)
    return peaks.for_dtype(dtype) if peaks else None


_CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measured_cpu_peak(threads: int | None = None, size: int = 512, seconds: float = 0.3, windows: int = 5,
                      dtype: str = "fp32") -> float:
    """FLOP/s of this process's matrix multiply in `dtype` (the CPU's practical peak for it: a CPU with bf16
    matrix instructions runs bf16 several times faster than fp32, so a bf16 run's MFU is against the bf16 figure):
    warmed up, then the median of `windows` short timings, so that one window lost to another process does not set
    the figure."""
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)  # its own stream: the training RNG must not move (exact resume)
    a, b = (torch.randn(size, size, generator=g).to(_CPU_DTYPES[dtype]) for _ in range(2))
    for _ in range(3):
        a @ b  # warm-up: first calls allocate and pick kernels
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / windows or n == 0:
            a @ b
            n += 1
        rates.append(2 * size**3 * n / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def device_peak(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from); `dtype`: fp32, bf16 or fp16, the compute dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, dtype)
        return peak, f"{name} datasheet" if peak else f"{name}: not in the table (no MFU)"
    return measured_cpu_peak(dtype=dtype), f"measured {dtype} matmul on this CPU process"


def mfu(flops_per_tok: float, tokens_per_s: float, peak_per_device: float, devices: int) -> float:
    return flops_per_tok * tokens_per_s / (peak_per_device * devices)
