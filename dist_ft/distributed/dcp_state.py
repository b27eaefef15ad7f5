"""Model and optimizer state through torch.distributed.checkpoint (DCP), for DDP and FSDP2 alike.

`get_state_dict` names every tensor by its fully qualified name in the user's model, whatever wraps it (DDP,
fully_shard), and DCP stores each tensor once with its global shape: so a checkpoint written by 2 FSDP2 ranks
loads on 1 DDP rank, and the reverse, with DCP resharding on read. Replicated DDP tensors are written once, the
writes spread over the ranks. LoRA checkpoints leave out the frozen base weights (they never change; the model
path in the manifest says where they come from).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..safe_load import dcp_reader


def _options(trainable_only: bool, strict: bool = True) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=strict and not trainable_only)


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path, *, trainable_only: bool,
         extra: dict | None = None) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    state = {"model": model_sd, "optim": optim_sd, **(extra or {})}
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(state, checkpoint_id=str(folder))


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path, *, trainable_only: bool,
         extra: dict | None = None) -> None:
    """Fill model and optimizer from `folder` in place; a missing or mismatched tensor raises (DCP names it)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    state = {"model": model_sd, "optim": optim_sd, **(extra or {})}
    dcp.load(state, storage_reader=dcp_reader(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(trainable_only))


def stored_names(folder: Path) -> set[str]:
    """The tensor names a DCP folder holds (from its metadata file alone)."""
    return set(dcp_reader(folder).read_metadata().state_dict_metadata)


def read_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every model tensor a DCP folder holds, whole, read by this process alone (no process group needed)."""
    meta = dcp_reader(folder).read_metadata().state_dict_metadata
    state = {"model": {n[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
                       for n, m in meta.items() if n.startswith("model.") and hasattr(m, "size")}}
    dcp.load(state, storage_reader=dcp_reader(folder), no_dist=True)
    return state["model"]


def load_model_only(model: torch.nn.Module, folder: Path, *, skip_quant_state: bool = False) -> list[str]:
    """Load the model tensors of a DCP folder into an unwrapped model in this one process (no process group):
    for export. Returns the names the folder held (the trainable ones, for a LoRA checkpoint). With
    `skip_quant_state`, bitsandbytes' quantisation constants (a qlora base rebuilt in full precision) are left."""
    names = sorted(n[len("model."):] for n in stored_names(folder) if n.startswith("model."))
    own = model.state_dict()
    if skip_quant_state:
        names = [n for n in names if n in own or ".weight." not in n]
    missing = [n for n in names if n not in own]
    if missing:
        raise KeyError(f"{folder}: holds tensors the model lacks: {missing[:5]}")
    state = {"model": {n: own[n] for n in names}}
    dcp.load(state, storage_reader=dcp_reader(folder), no_dist=True)
    model.load_state_dict(state["model"], strict=False)
    return names
