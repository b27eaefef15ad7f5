"""The transformer blocks of a model: the unit of FSDP2's wrap policy, of activation checkpointing, of the final
save's gathers, of per-block host-memory trimming and of the plan's block timing. A leaf module (torch only), so any
of those can import it without an import cycle."""

from __future__ import annotations

import torch


# Models whose _no_split_modules are finer than a useful unit: ResNet names every conv layer and shortcut, but its
# unit of compute (and of sharding, checkpointing, partial fine-tuning) is the stage.
_COARSER_UNITS = {"ResNetConvLayer": "ResNetStage", "ResNetShortCut": "ResNetStage"}


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    names = {_COARSER_UNITS.get(n, n) for n in names}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            return list(m)
    raise ValueError(f"{type(model).__name__}: no transformer blocks found to shard (no _no_split_modules and no "
                     "ModuleList of identical blocks); use distributed.strategy: ddp or zero3")


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's input embedding module, or None: a convolutional model (ResNet's stem) has none that transformers
    names, and its `get_input_embeddings` raises NotImplementedError."""
    if not hasattr(model, "get_input_embeddings"):
        return None
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return None
