"""Mixed precision, mapped in one place: the recipe's precision to parameter dtype, autocast dtype and loss scaling.

- fp32: everything in float32.
- bf16-mixed: float32 master weights, bfloat16 compute under autocast (FSDP2 and DeepSpeed express the same
  thing through their own policies, built from this table).
- fp16-mixed: float32 master weights, float16 compute and a dynamic loss scale (torch.amp.GradScaler on the
  rank's device, CPU included: CPU autocast runs float16 and the scaler unscales and steps there; DeepSpeed uses
  its own scaler from the JSON). An overflowing step is skipped on every rank and the scale lowered.
- bf16-true: weights, gradients and optimizer state in bfloat16 (half the memory, less accurate updates).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .spec import names_with, spec_for


@dataclass(frozen=True)
class PrecisionPlan:
    name: str
    param_dtype: torch.dtype  # dtype the weights are stored and updated in
    compute_dtype: torch.dtype  # dtype matmuls run in
    needs_scaler: bool

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != self.param_dtype

    def autocast_context(self, device: torch.device):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)


def frozen_linears_in_compute_dtype(model: torch.nn.Module, plan: PrecisionPlan, method) -> int:
    """Under autocast, store each frozen Linear's weight (and bias) in the compute dtype; returns how many.

    Autocast reads an fp32 Linear weight only through the 16-bit copy it makes in every forward (and keeps for the
    backward); a frozen weight is never updated, so that copy can be the stored weight: the same values in every
    matmul (the cast is the same round-to-nearest), half the memory for the frozen base and no cast per step.
    Only where nothing else reads the fp32 values: adapter methods (their saves hold the adapters alone), not DoRA
    (its magnitude is computed from the base weight itself), and not a weight tied to a non-Linear module (an
    embedding tied to the head: the embedding's output, and so the residual stream, stays fp32 as under autocast).
    """
    if not plan.autocast or method.kind in ("full", "partial") or (method.kind in ("lora", "qlora")
                                                                    and method.lora.use_dora):
        return 0
    owners: dict[int, set[bool]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(isinstance(module, torch.nn.Linear))
    n = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad or p.dtype != torch.float32 or owners[id(p)] != {True}:
                continue
            p.data = p.data.to(plan.compute_dtype)
            n += 1
    return n


# Architectures whose blocks feed each pre-attention / pre-MLP norm's output to Linear projections only (q, k, v;
# gate, up): casting it once gives those matmuls the same inputs autocast would give each of them.
NORMS_FEEDING_LINEARS = {"llama": ("input_layernorm", "post_attention_layernorm"),
                         "mistral": ("input_layernorm", "post_attention_layernorm"),
                         "qwen2": ("input_layernorm", "post_attention_layernorm"),
                         "qwen3": ("input_layernorm", "post_attention_layernorm")}


def autocast_inputs_cast_once(model: torch.nn.Module, plan: PrecisionPlan) -> int:
    """Under autocast, cast the 16-bit inputs of a block's projections once instead of once per projection; returns
    how many places now do so.

    Autocast casts an fp32 activation to bf16 separately for every matmul that reads it, and peft first casts a
    LoRA layer's bf16 input back to its fp32 adapter's dtype (for autocast to cast it down again): on a LoRA block
    the same values are held as ~6 separate 16-bit copies, each kept for the backward, so bf16-mixed used more
    activation memory than fp32 (which shares one tensor) and spent its time copying. Here a Llama-like block's two
    norms hand their consumers (Linear projections only) the 16-bit copy once, and peft's cast of LoRA inputs is
    turned off: every matmul sees exactly the values it saw before (the same round-to-nearest, once), sharing one
    tensor. Elsewhere (other architectures, no autocast) nothing changes."""
    if not plan.autocast:
        return 0
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            n += 1
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    names = NORMS_FEEDING_LINEARS.get(getattr(config, "model_type", None), ())
    dtype = plan.compute_dtype

    def to_compute(module, args, output):
        return output.to(dtype) if torch.is_autocast_enabled(output.device.type) else output

    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            module.register_forward_hook(to_compute)
            n += 1
    return n


PLANS = {
    "fp32": PrecisionPlan("fp32", torch.float32, torch.float32, False),
    "bf16-mixed": PrecisionPlan("bf16-mixed", torch.float32, torch.bfloat16, False),
    "fp16-mixed": PrecisionPlan("fp16-mixed", torch.float32, torch.float16, True),
    "bf16-true": PrecisionPlan("bf16-true", torch.bfloat16, torch.bfloat16, False),
}


def precision_plan(name: str) -> PrecisionPlan:
    return PLANS[name]


def has_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability computes in bfloat16 natively (Ampere, 8.0, and later).

    Not `torch.cuda.is_bf16_supported()`: by default (`including_emulation=True`) it answers True on any GPU where
    bf16 tensors can be made, so V100 (7.0) and T4 (7.5) would run bf16 emulated, many times slower than fp16.
    """
    return tuple(capability) >= (8, 0)


def cpu_has_fp16_kernels() -> bool:
    """Whether oneDNN has float16 kernels on this CPU (AVX512-FP16 or AMX-FP16): what DeepSpeed's CPU accelerator
    asks before it accepts `fp16.enabled` (torch's own CPU autocast runs float16 without them)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def hardware_problem(name: str, *, strategy: str | None = None, cuda_available: bool | None = None,
                     capability: tuple[int, int] | None = None, cpu_fp16: bool | None = None) -> str | None:
    """Why this machine cannot run `name` (under `strategy`; None when it can). Checked before any work starts."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    # fp16-mixed runs on any CPU under torch's GradScaler (CPU autocast computes in float16, GradScaler("cpu")
    # scales and steps). A backend with its own loss scaler (DeepSpeed) refuses fp16 at initialize on a CPU unless
    # oneDNN has fp16 kernels.
    if name == "fp16-mixed" and not cuda and strategy is not None and spec_for(strategy).own_loss_scaler and not (
            cpu_has_fp16_kernels() if cpu_fp16 is None else cpu_fp16):
        torch_scaled = " or ".join(names_with(lambda s: not s.own_loss_scaler))
        return (f"distributed.precision: fp16-mixed with {strategy} on CPU: DeepSpeed's CPU accelerator runs fp16 "
                "only where oneDNN has float16 kernels (AVX512-FP16 or AMX-FP16), and this CPU has none; use "
                f"strategy {torch_scaled} for fp16-mixed (torch's loss scaler), or bf16-mixed with {strategy}")
    if name in ("bf16-mixed", "bf16-true") and cuda:
        cc = torch.cuda.get_device_capability() if capability is None else capability
        if not has_native_bf16(cc):
            return (f"distributed.precision: {name} needs a GPU with bfloat16 (compute capability 8.0+, e.g. A100, "
                    f"H100; this one is {cc[0]}.{cc[1]}); use fp16-mixed on this GPU")
    return None
