"""Activation checkpointing, in one place: recompute each transformer block's activations during backward.

Non-reentrant checkpointing is the variant that works with frozen inputs (LoRA), FSDP2 and DeepSpeed alike.
"""

from __future__ import annotations

import torch


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    target = model
    # A PEFT model forwards the call to the model it wraps.
    if not hasattr(target, "gradient_checkpointing_enable") and hasattr(target, "get_base_model"):
        target = target.get_base_model()
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ValueError(f"distributed.activation_checkpointing: {type(target).__name__} does not support "
                         "gradient checkpointing; set it to false")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With frozen embeddings (LoRA) the checkpointed blocks' inputs need grads, or nothing flows back through them.
    if hasattr(target, "enable_input_require_grads"):
        target.enable_input_require_grads()
