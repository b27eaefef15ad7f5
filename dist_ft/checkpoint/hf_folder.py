"""final/ of a full fine-tune, written one unit at a time: no rank ever holds more than one gathered unit.

A unit is what FSDP2 shards together (distributed/fsdp/strategy.py `shard_model`): one transformer block, the input
embeddings, the output embeddings, and the rest (final norm, a classifier head, tied weights kept once). The
strategy gathers one unit to rank 0 (`Strategy.gathered_units`, a collective), rank 0 writes it as one safetensors
file, frees it, and the next unit is gathered. The folder is what `save_pretrained` writes, with the same tensor
names (transformers' own tie removal, `_keys_to_ignore_on_save`, weight-conversion reversal), its config and
generation config (written by `save_pretrained` itself with no tensors), and a `model.safetensors.index.json`
when there is more than one file.

    units = save_units(model)                          # every rank: the same names in the same order
    written = write_units(tmp, model, strategy.gathered_units(units), is_main=...)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

INDEX = "model.safetensors.index.json"


@dataclass
class UnitsWritten:
    files: int
    tensors: int
    total_bytes: int
    largest_unit_bytes: int  # the most gathered on rank 0 at any moment (one unit)
    largest_unit: str


@dataclass
class SaveUnit:
    name: str              # "block:3", "embed", "head", "rest"
    tensors: list[str]     # state-dict names, as save_pretrained writes them


def save_units(model: torch.nn.Module) -> list[SaveUnit]:
    """The names final/ holds, grouped by unit, in state-dict order. Pure: depends on the model's structure only, so
    every rank computes the same list (the gathers that follow are collectives in this order)."""
    state = model.state_dict(keep_vars=True)  # sharded or partitioned tensors: nothing is gathered here
    keep = _names_to_save(model, state)
    prefixes = _unit_prefixes(model)
    units: dict[str, SaveUnit] = {}
    for name in state:
        if name not in keep:
            continue
        unit = next((u for p, u in prefixes if name.startswith(p)), "rest")
        units.setdefault(unit, SaveUnit(unit, [])).tensors.append(name)
    return list(units.values())


def _unit_prefixes(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(module name + ".", unit) for the blocks and the embeddings, as shard_model wraps them."""
    from ..blocks import input_embeddings
    from ..distributed.fsdp.strategy import transformer_blocks
    try:
        blocks = transformer_blocks(model)
    except ValueError:  # no repeated blocks: the embeddings and one unit for the rest
        blocks = []
    unit_of = {id(b): f"block:{i}" for i, b in enumerate(blocks)}
    inp = input_embeddings(model)
    outp = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inp is not None:
        unit_of.setdefault(id(inp), "embed")
    if outp is not None and outp is not inp:
        unit_of.setdefault(id(outp), "head")
    return [(name + ".", unit_of[id(m)]) for name, m in model.named_modules() if id(m) in unit_of and name]


def _names_to_save(model: torch.nn.Module, state: dict) -> set[str]:
    """What save_pretrained keeps of `state`: one name per tied tensor (transformers' own choice), none of
    `_keys_to_ignore_on_save`. Decided on stand-ins that share storage exactly where the live tensors are the same
    object, since sharded tensors cannot be compared by storage."""
    token: dict[int, torch.Tensor] = {}
    stand_ins = {n: token.setdefault(id(t), torch.empty(1)) for n, t in state.items()}
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        stand_ins.pop(key, None)
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # another transformers: keep the first name of each tensor, as ZeRO-3's gather does
        seen: set[int] = set()
        return {n for n, t in stand_ins.items() if not (id(t) in seen or seen.add(id(t)))}
    return set(remove_tied_weights_from_state_dict(stand_ins, model))


def _revert_conversion(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's original names and layout (save_pretrained's `save_original_format`); per unit, which holds
    any tensors a conversion combines (a block's experts)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return revert_weight_conversion(model, tensors)


def write_config(folder: Path, model: torch.nn.Module) -> None:
    """config.json and generation_config.json (and remote code), exactly as save_pretrained writes them: it is called
    with no tensors, and the empty weights file it may leave is removed."""
    model.save_pretrained(folder, state_dict={}, safe_serialization=True)
    for path in folder.glob("model*.safetensors*"):
        path.unlink()


def write_units(folder: Path | None, model: torch.nn.Module, units: list[SaveUnit],
                gathered: Iterable[dict[str, torch.Tensor] | None]) -> UnitsWritten | None:
    """Consume `gathered` (one dict per unit on rank 0, None elsewhere; every rank iterates it, as it is a
    collective) and, on rank 0 (`folder` not None), write each unit as its own safetensors file, then the index.
    Returns what was written on rank 0, None elsewhere."""
    from safetensors.torch import save_file

    count = len(units)
    weight_map: dict[str, str] = {}
    total = largest = params = 0
    largest_name = ""
    source = iter(gathered)
    for i, unit in enumerate(units):
        # Taken with next() and deleted below: a for-loop over zip() would hold the last unit while gathering the next.
        tensors = next(source)
        if folder is None:
            continue
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > largest:
            largest, largest_name = size, unit.name
        tensors = _revert_conversion(model, tensors)
        filename = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update({k: filename for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        params += sum(t.numel() for t in tensors.values())
        del tensors  # freed before the next unit is gathered
    end = object()
    if next(source, end) is not end:  # run the gatherer to its end (ZeRO-3 restores its persistent parameters there)
        raise RuntimeError("the strategy gathered more units than were asked for")
    if folder is None:
        return None
    if count > 1:
        index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
        tmp = folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder / INDEX)
    return UnitsWritten(files=count, tensors=len(weight_map), total_bytes=total, largest_unit_bytes=largest,
                        largest_unit=largest_name)

