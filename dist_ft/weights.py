"""Model weights without a full copy: read any row range of a pretrained tensor straight from the safetensors
files, and give every parameter that the checkpoint lacks (LoRA adapters, a new classification head) a
deterministic initial value seeded by (recipe seed, parameter name).

Name-seeded initialisation makes the starting point independent of how the model was built (on the meta device
and sharded, or whole on one device) and of the number of ranks, so every strategy starts from the same weights
and their losses can be compared step by step. No torch.distributed here: the strategies map their shards to
row ranges and call `ModelWeights.rows`.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .host_memory import Trimmer

# PEFT's wrappers around a pretrained module, removed to find the checkpoint's own name.
_PEFT_PARTS = (re.compile(r"^base_model\.model\."), re.compile(r"\.base_layer(?=\.)"),
               re.compile(r"\.original_module(?=\.)"), re.compile(r"\.modules_to_save\.[^.]+(?=\.)"))


def canonical_name(name: str) -> str:
    for pattern in _PEFT_PARTS:
        name = pattern.sub("" if pattern.pattern.startswith("^") else "", name)
    return name


def _index(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (or index); only safetensors weights are read "
                                "(never pickle)")
    with safe_open(single, framework="pt") as fh:
        return {k: single for k in fh.keys()}


def _renamed_keys(model: torch.nn.Module, files: dict[str, Path]) -> dict[str, str]:
    """Checkpoint keys under the names the model has for them, where transformers renames keys as it loads: its
    modules were renamed after the checkpoints were written (transformers 5's ViT: `encoder.layer.N.attention.
    attention.query` is `layers.N.attention.q_proj`), and save_pretrained writes the old names back. Renamings only;
    a model whose loading also converts tensors (splits, merges) is not mapped here, and its unmatched parameters
    are reported by `audit`."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads checkpoints under their own names
        return {}
    if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
        return {}
    transforms = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if not renamings or len(renamings) != len(transforms):
        return {}
    out = {}
    for key in files:
        new = rename_source_key(key, renamings, [])[0]
        if new != key and new not in files:
            out[new] = key
    return out


class WeightsError(ValueError):
    """The model folder does not give the model the recipe builds: tensors that are neither in the checkpoint nor
    created by the recipe, or of the wrong shape."""


@dataclass
class LoadReport:
    """Where every parameter of the built model comes from (canonical names, tied weights counted once)."""
    loaded: list[str]     # read from the checkpoint
    created: list[str]    # created by the recipe: adapters, prompt embeddings, a new classification head
    unused: list[str]     # checkpoint tensors no parameter reads (a pretraining head, a pooler the task lacks)
    total: int            # tensors in the checkpoint

    def describe(self) -> str:
        text = f"loaded {len(self.loaded)} of {self.total} pretrained tensors"
        if self.unused:
            text += f" ({len(self.unused)} unused: {_names(self.unused)})"
        if self.created:
            text += f"; {len(self.created)} created by the recipe ({_names(self.created)})"
        return text


def _names(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


class ModelWeights:
    """Row-range reads from a model folder's safetensors files, plus seeded values for what they lack.

    Names are resolved the way transformers' `from_pretrained` does: a model with a task head names its base
    `<base_model_prefix>.*` (`bert.encoder...`, `model.layers...`), while a folder saved from the bare base model
    stores the same tensors without the prefix (the bundled MiniLM is such a folder), and the other way round. Tied
    parameters (an output embedding tied to the input one) are found under any of their names.
    """

    def __init__(self, folder: Path, *, seed: int, init_std: float = 0.02, prefix: str = "",
                 skip: set[str] | frozenset = frozenset()):
        self.folder = Path(folder)
        self.skip = set(skip)  # canonical names whose checkpoint tensors are not used (a replaced head)
        self._renamed: dict[str, str] = {}  # the model's name -> the checkpoint's, where transformers renames on load
        self.files = _index(self.folder)
        self.seed = seed
        self.init_std = init_std
        self.prefix = prefix
        self._aliases: dict[str, list[str]] = {}
        self.trimmer = Trimmer()  # the read buffers freed between kept shards go back to the OS (host_memory.py)

    def bind(self, model: torch.nn.Module) -> "ModelWeights":
        """Learn the model's base-model prefix and its tied parameters (call on the built, possibly meta, model)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.prefix = getattr(base, "base_model_prefix", "") or self.prefix
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(canonical_name(name))
        self._aliases = {n: names for names in groups.values() if len(names) > 1 for n in names}
        self._renamed = _renamed_keys(base, self.files)
        return self

    def _candidates(self, c: str) -> list[str]:
        out = [c]
        if self.prefix:
            p = self.prefix + "."
            out.append(c[len(p):] if c.startswith(p) else p + c)
        else:  # nothing bound: the decoders' usual prefix
            out += [c.removeprefix("model."), "model." + c]
        return out

    def _lookup(self, name: str) -> str | None:
        c = canonical_name(name)
        if c in self.skip:
            return None
        for alias in [c] + [a for a in self._aliases.get(c, ()) if a != c]:
            for candidate in self._candidates(alias):
                if candidate in self.files:
                    return candidate
                if candidate in self._renamed:
                    return self._renamed[candidate]
        return None

    def has(self, name: str) -> bool:
        return self._lookup(name) is not None

    def audit(self, model: torch.nn.Module, created: set[str]) -> LoadReport:
        """Check that every parameter comes from the checkpoint or is one the recipe creates (`created`,
        canonical names); raise WeightsError naming the others. Call after `bind`."""
        loaded, made, missing, used = [], [], [], set()
        for name, _ in model.named_parameters():
            c = canonical_name(name)
            key = self._lookup(name)
            if key is not None:
                loaded.append(c)
                used.add(key)
            elif c in created or "lora_magnitude_vector" in c:
                made.append(c)
            else:
                missing.append(c)
        if missing:
            raise WeightsError(
                f"{self.folder}: {len(missing)} parameter(s) of {type(model).__name__} are not in the checkpoint and "
                f"are not created by the recipe: {_names(missing, 8)}. Training would start them from random "
                f"values. The folder's weights do not fit its config.json (checkpoint tensors look like "
                f"{_names(sorted(self.files), 3)}); use the folder the model was saved to, or fix config.json")
        # Buffers a folder may also hold (BERT's position_ids) are rebuilt by the model, not loaded: not counted.
        buffers = {self._lookup(n) for n, _ in model.named_buffers()} - {None}
        tensors = set(self.files) - buffers
        return LoadReport(loaded=loaded, created=made, unused=sorted(tensors - used), total=len(tensors))

    def rows(self, name: str, shape: torch.Size, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of parameter `name` (all of it for a 0-d tensor)."""
        key = self._lookup(name)
        if key is None:
            full = self.new_value(name, shape)
            return (full[start:stop] if full.dim() else full).to(dtype)
        path = self.files[key]
        # One mapping per read, closed straight after: pages of a mapped file count as this process's resident
        # memory for as long as the mapping lives, so a handle kept open for the whole load made every rank
        # hold the pages of all the rows it read on top of its shards (2.2 GB per rank for a 1.1B model on 2 ranks).
        with safe_open(path, framework="pt") as fh:
            sl = fh.get_slice(key)
            if list(sl.get_shape()) != list(shape):
                raise ValueError(f"{path.name}: tensor {key} has shape {sl.get_shape()} but the model expects "
                                 f"{list(shape)}; the model folder does not match its config")
            t = sl[start:stop] if len(shape) else fh.get_tensor(key)  # (a 0-d slice cannot be taken)
            out = t.to(dtype, copy=True)  # owns its memory once the mapping is gone
        self.trimmer.read(t.numel() * t.element_size())
        return out

    def new_value(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The initial value of a parameter the checkpoint lacks, the same on every rank and in every run."""
        c = canonical_name(name)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(c.encode())) % 2**63)
        if "lora_magnitude_vector" in c:
            raise NotImplementedError(f"{name}: DoRA magnitudes are derived from the full weight and cannot be "
                                      "initialised shard by shard; use DoRA with ddp or zero1/zero2")
        if ".lora_B." in c or ".lora_embedding_B." in c or c.endswith(".bias"):
            return torch.zeros(shape)
        if ".lora_A." in c or ".lora_embedding_A." in c:
            # PEFT's default: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in as torch
            # counts it: in_features for a Linear's A, in_channels x kernel area for a convolution's (ResNet).
            bound = 1 / math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else shape[0])
            return (torch.rand(shape, generator=g) * 2 - 1) * bound
        if len(shape) == 1 and "norm" in c.lower():
            return torch.ones(shape)
        if len(shape) < 2:
            return torch.zeros(shape)
        return torch.randn(shape, generator=g) * self.init_std

    def reinit_missing(self, model: torch.nn.Module) -> list[str]:
        """Give every parameter the checkpoint lacks its seeded value (whole-model path); return their names."""
        names = []
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:  # DoRA's magnitude is derived from the loaded weights
                    continue
                if not self.has(name):
                    p.copy_(self.new_value(name, p.shape).to(p.dtype))
                    names.append(name)
        return names
