"""QLoRA's 4-bit base for strategies that shard it (FSDP2, ZeRO-3): built on the meta device, quantised tensor by
tensor as the weights are read, so no process ever holds the 16-bit model.

The recipe Answer.AI's fsdp_qlora and transformers' `bnb_4bit_quant_storage` use: bitsandbytes packs the 4-bit
values of a weight into a [n / 2 / itemsize, 1] tensor of the *storage* dtype; stored as the dtype the sharding
gathers parameters in (the compute dtype: fp32, or bf16 under FSDP2's bf16 mixed-precision policy, which then casts
nothing), the packed bytes are an ordinary floating-point parameter that `fully_shard` splits on dim 0 and gathers
back bit for bit. Its quantisation constants (the absmax of every block of 64 values, `QuantState`) stay whole on
every rank on the module (`Linear4bit.quant_state`): 0.5 bit per parameter (0.127 with double quantisation), and
bitsandbytes' `Linear4bit.forward` re-attaches them to the gathered weight (`fix_4bit_weight_quant_state_from_module`,
written for FSDP) before it dequantises. ZeRO-3 partitions the same packed tensor flat and keeps the parameter object,
which then carries them itself (distributed/deepspeed/strategy.py `_materialise`).

Loading: each rank reads one whole weight at a time (one tensor in the model's dtype, never the model), quantises it
exactly as `from_pretrained(quantization_config=...)` does for DDP (same blocks, same constants, so the two bases
are bit-identical), keeps the constants and copies only its rows of the packed tensor into its shard.

Single-device code like model.py: the strategy maps its shards to row ranges and calls `rows`.
"""

from __future__ import annotations

import torch

from .config import Recipe
from .host_memory import release_freed


def quant_storage_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype the packed 4-bit weights are stored in: the one the sharding gathers parameters in, so that a
    mixed-precision policy casts nothing (a cast would change the packed bytes)."""
    from .distributed.precision import precision_plan
    return precision_plan(recipe.distributed.precision).compute_dtype


def replace_with_packed_4bit(model: torch.nn.Module, recipe: Recipe) -> list[str]:
    """Swap every nn.Linear that transformers' bitsandbytes quantiser converts (all but the output head and tied
    weights) for a `bnb.nn.Linear4bit` whose weight is an empty, already-packed Params4bit on the meta device.
    Call on a meta-device model before the method is applied (peft then wraps the 4-bit layers as for DDP).
    Returns the names of the replaced modules."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import get_keys_to_not_convert

    from .methods import quantization_config

    cfg = quantization_config(recipe)
    storage = quant_storage_dtype(recipe)
    cfg.bnb_4bit_quant_storage = storage
    replace_with_bnb_linear(model, modules_to_not_convert=get_keys_to_not_convert(model), quantization_config=cfg)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            n = module.in_features * module.out_features
            packed = torch.empty(((n + 1) // (storage.itemsize * 2), 1), dtype=storage, device="meta")
            module.weight = bnb.nn.Params4bit(
                packed, requires_grad=False, blocksize=module.weight.blocksize,
                compress_statistics=cfg.bnb_4bit_use_double_quant, quant_type=cfg.bnb_4bit_quant_type,
                quant_storage=storage, module=module, bnb_quantized=True)
            # Kept on the module: once sharded, its weight is a DTensor without Params4bit's attributes.
            module.packed_4bit = dict(blocksize=module.weight.blocksize,
                                      compress_statistics=cfg.bnb_4bit_use_double_quant,
                                      quant_type=cfg.bnb_4bit_quant_type, quant_storage=storage)
            names.append(name)
    model.is_loaded_in_4bit = True
    model.dist_ft_packed_4bit = True  # what `is_packed_4bit` looks for (from_pretrained's 4-bit models lack it)
    return names


class QuantizingWeights:
    """`ModelWeights` for a model with packed 4-bit layers (from `replace_with_packed_4bit`): `rows` of a 4-bit
    weight are rows of its packed tensor, quantised from the whole weight read in `dtype` (one tensor at a time; the
    last one is kept for the next shard's read); its constants go onto the module, on `device`. Every other name is
    read as `ModelWeights` reads it."""

    def __init__(self, weights, model: torch.nn.Module, *, dtype: torch.dtype):
        import bitsandbytes as bnb
        self.inner, self.dtype = weights, dtype
        self.layers = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        self._last: tuple[str, torch.Tensor] | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _packed(self, name: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        import bitsandbytes.functional as bf

        module = self.layers[name]
        local = module.weight.to_local() if hasattr(module.weight, "to_local") else module.weight
        device = local.device if local.device.type != "meta" else torch.device("cpu")
        w = self.inner.rows(name, torch.Size([module.out_features, module.in_features]), 0, module.out_features,
                            self.dtype)
        # On the rank's device, where from_pretrained's quantiser runs too (Params4bit.to(device)).
        packed, state = bf.quantize_4bit(w.to(device), **module.packed_4bit)
        del w
        # The whole weight and the quantiser's working memory (~7x the weight on a CPU) are freed: handed back
        # before the next weight is read, or the heaps keep them between the shards (host_memory.py).
        release_freed()
        module.quant_state = state
        self._last = (name, packed)
        return packed

    def rows(self, name: str, shape: torch.Size, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.layers:
            return self.inner.rows(name, shape, start, stop, dtype)
        packed = self._packed(name)
        assert tuple(packed.shape) == tuple(shape) and packed.dtype == dtype, (name, packed.shape, shape, dtype)
        return packed[start:stop].clone()


def is_packed_4bit(model: torch.nn.Module) -> bool:
    """Built by `replace_with_packed_4bit` (a meta-built 4-bit base), not by from_pretrained's quantiser."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "dist_ft_packed_4bit", False))


def constant_bytes(module: torch.nn.Module) -> int:
    """Bytes of the quantisation constants a packed 4-bit layer holds whole on every rank, as bitsandbytes lays
    them out: an absmax per block (fp32, or uint8 with double quantisation plus an fp32 absmax per 256 blocks, its
    256-entry code and offset) and the 16-entry 4-bit code. For `dist-ft plan --simulate`, which never loads them."""
    q = module.packed_4bit
    blocks = -(-module.in_features * module.out_features // q["blocksize"])
    if not q["compress_statistics"]:
        return blocks * 4 + 16 * 4
    return blocks + -(-blocks // 256) * 4 + 256 * 4 + 4 + 16 * 4
