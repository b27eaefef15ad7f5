"""Parameters by role once the method is applied: trainable (gradients and optimizer state), frozen (weights only),
quantised (QLoRA's base). Adapters are counted from module shapes, with peft's rules for which modules they adapt.

  QLoRA: every nn.Linear weight except the output head in 4 bits = 0.5 B/param, plus quantisation constants
  (blocks of 64 with an fp32 absmax: +0.5 bit/param = 0.0625 B; with double quantisation the absmaxes are 8-bit
  with an fp32 constant per 256 blocks: +0.127 bit/param = 0.0159 B, as in the QLoRA paper); 8-bit: 1 B/param plus
  an fp32 scale per output row. Other parameters (embeddings, norms, head) in fp32, as
  peft.prepare_model_for_kbit_training leaves them.
Approximations: method `partial` counts exactly which parameters train, but treats blocks below the lowest
trainable one as free of activations and gradient flow only when embeddings and biases are frozen; gradual
unfreezing is planned as full fine-tuning (its state at the end of the schedule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .constants import QUANT_CONSTANT_BYTES
from .model import ModelFacts, ParamInfo


@dataclass
class MethodCounts:
    """Parameters by role, once the method is applied: trainable ones get gradients and optimizer state."""
    kind: str
    trainable: list[ParamInfo]
    frozen: list[ParamInfo]             # stored in the weights' dtype
    quantized: list[ParamInfo]          # qlora base
    quant_bytes: float                  # per quantised parameter, constants included
    quant_note: str
    layers_with_grad: int               # blocks whose activations are saved for backward
    lora_targets: list[str]
    lora_dropped: float = 0.0           # per token per block: input elements LoRA dropout copies (+ 1-byte masks)
    lora_rank: float = 0.0              # per token per block: rank-r intermediate elements
    extra_seq: int = 0                  # virtual tokens added to every row (prompt tuning)
    note: str = ""
    # Of quant_bytes, the quantisation constants: under FSDP2 they stay whole on every rank beside the sharded
    # packed weights (quantized.py), so they are not divided by the world size.
    quant_constant_bytes: float = 0.0
    use_dora: bool = False              # DoRA reads its frozen base weights whole (they stay in the weights' dtype)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel for p in self.trainable)

    @property
    def n_frozen(self) -> int:
        return sum(p.numel for p in self.frozen)

    @property
    def n_quantized(self) -> int:
        return sum(p.numel for p in self.quantized)

    @property
    def n_total(self) -> int:
        return self.n_trainable + self.n_frozen + self.n_quantized


def lora_targets(facts: ModelFacts, target_modules, modules_to_save=()) -> list[str]:
    """Linear modules LoRA adapts, with peft's rules: a list matches a module name or its dotted suffix; another
    string is a full-match regex; all-linear is every nn.Linear except the output head (or classifier). Modules
    in modules_to_save are never adapted."""
    import re

    names = list(facts.linears)
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        chosen = [n for n in names if n not in set(facts.head_modules)]
    elif isinstance(target_modules, str):
        chosen = [n for n in names if re.fullmatch(target_modules, n)]
    else:
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)]
    return [n for n in chosen if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in modules_to_save)]


def lora_param_count(facts: ModelFacts, r: int, target_modules, use_dora: bool = False) -> int:
    """r x (in + out) per targeted Linear (A: r x in, B: out x r), plus the out-sized magnitude with DoRA."""
    total = 0
    for name in lora_targets(facts, target_modules):
        i, o, _ = facts.linears[name]
        total += r * (i + o) + (o if use_dora else 0)
    return total


def method_counts(facts: ModelFacts, recipe) -> MethodCounts:
    m = recipe.method
    kind = m.kind
    params = facts.params
    L = facts.layers
    if kind == "full" or (kind == "partial" and (m.partial.unfreeze_every_steps or m.partial.unfreeze_every_epochs)):
        note = "" if kind == "full" else "gradual unfreezing planned as full fine-tuning (the end of its schedule)"
        return MethodCounts(kind, list(params), [], [], 0.0, "", L, [], note=note)
    if kind == "partial":
        return _partial_counts(facts, recipe)
    saved_modules = list(m.modules_to_save)
    if recipe.model.task == "sequence_classification":
        saved_modules += [h.rsplit(".", 1)[-1] for h in facts.head_modules]
    adapters, targets, dropped, rank, extra_seq = _adapters(facts, m, saved_modules)
    # modules_to_save: peft keeps the original frozen and trains a copy
    copies = []
    for mod in saved_modules:
        for p in params:
            owner = p.name.rsplit(".", 1)[0]
            if owner == mod or owner.endswith("." + mod):
                copies.append(dataclasses.replace(p, name=p.name + ".modules_to_save", head=False, embed=False))
    quantized: list[ParamInfo] = []
    frozen = list(params)
    quant_bytes, quant_note = 0.0, ""
    if kind == "qlora":
        quantized, frozen, quant_bytes, quant_note = _qlora_base(facts, m.quant)
    constants = quant_bytes - (0.5 if m.quant.bits == 4 else 1.0) if kind == "qlora" else 0.0
    return MethodCounts(kind, adapters + copies, frozen, quantized, quant_bytes, quant_note, L, targets,
                        lora_dropped=dropped, lora_rank=rank, extra_seq=extra_seq, quant_constant_bytes=constants,
                        use_dora=kind in ("lora", "qlora") and m.lora.use_dora)


def _partial_counts(facts: ModelFacts, recipe) -> MethodCounts:
    from ..methods import partial_trainable_names

    params, L = facts.params, facts.layers
    names = partial_trainable_names(facts.model, recipe)
    trainable = [p for p in params if p.name in names]
    frozen = [p for p in params if p.name not in names]
    pc = recipe.method.partial
    all_layers = pc.embeddings or pc.bias_only
    return MethodCounts("partial", trainable, frozen, [], 0.0, "", L if all_layers else min(pc.last_blocks, L), [],
                        note="partial: exact trainable set; blocks below the lowest trainable one keep no "
                        "activations" if not all_layers else "partial: exact trainable set")


def _adapters(facts: ModelFacts, m, saved_modules: list[str]) -> tuple[list[ParamInfo], list[str], float, float,
                                                                          int]:
    """(adapter parameters, LoRA's target modules, LoRA's dropped and rank-r elements per token per block, virtual
    tokens added to every row) of an adapter method."""
    kind, L = m.kind, facts.layers
    adapters: list[ParamInfo] = []
    extra_seq = 0
    dropped = rank = 0.0
    targets: list[str] = []
    if kind in ("lora", "qlora"):
        lo = m.lora
        targets = lora_targets(facts, lo.target_modules, saved_modules)
        for name in targets:
            i, o, _ = facts.linears[name]
            blk = _block_of_module(facts, name)
            unit = f"block:{blk}" if blk is not None else "root"
            adapters.append(ParamInfo(f"{name}.lora_A", lo.r * i, 2, blk, unit, None, rows=lo.r))  # r x in
            adapters.append(ParamInfo(f"{name}.lora_B", lo.r * o, 2, blk, unit, None, rows=o))     # out x r
            if lo.use_dora:
                adapters.append(ParamInfo(f"{name}.lora_magnitude", o, 1, blk, unit, None, rows=o))
        # Activation elements per token per block, averaged over the blocks: the input copy LoRA's dropout makes
        # for each targeted Linear (none with dropout 0: peft uses Identity) and the rank-r intermediate.
        in_blocks = [t for t in targets if _block_of_module(facts, t) is not None]
        dropped = sum(facts.linears[t][0] for t in in_blocks) / max(L, 1) if lo.dropout > 0 else 0.0
        rank = len(in_blocks) * lo.r / max(L, 1)
    elif kind == "ia3":
        adapters = _ia3_vectors(facts, m.ia3)
    elif kind == "prompt_tuning":
        adapters = [ParamInfo("prompt_embeddings", m.prompt.num_virtual_tokens * facts.hidden, 2, None, "root", None,
                              rows=m.prompt.num_virtual_tokens)]
        extra_seq = m.prompt.num_virtual_tokens
    elif kind == "prefix_tuning":
        adapters = [ParamInfo("prefix_embeddings", m.prompt.num_virtual_tokens * L * 2 * facts.kv_dim, 2, None,
                              "root", None, rows=m.prompt.num_virtual_tokens)]
        extra_seq = m.prompt.num_virtual_tokens
    return adapters, targets, dropped, rank, extra_seq


def _qlora_base(facts: ModelFacts, q) -> tuple[list[ParamInfo], list[ParamInfo], float, str]:
    """(quantised parameters, the rest (frozen), bytes per quantised parameter, a note) of QLoRA's base."""
    params = facts.params
    head = set(facts.head_modules)
    quantized = [p for p in params if p.linear is not None and p.linear not in head]
    qids = {id(p) for p in quantized}
    frozen = [p for p in params if id(p) not in qids]
    if q.bits == 4:
        quant_bytes = 0.5 + QUANT_CONSTANT_BYTES[(4, q.double_quant)]
        quant_note = (f"{q.quant_type} 4-bit: 0.5 B + constants {QUANT_CONSTANT_BYTES[(4, q.double_quant)]:.4f} B "
                      f"({'double quant, 0.127' if q.double_quant else 'fp32 absmax per 64, 0.5'} bit) per param")
    else:
        rows = sum(p.out_features for p in quantized)
        quant_bytes = 1.0 + 4.0 * rows / max(sum(p.numel for p in quantized), 1)
        quant_note = "LLM.int8: 1 B per param + an fp32 scale per output row"
    return quantized, frozen, quant_bytes, quant_note


def _block_of_module(facts: ModelFacts, module_name: str) -> Optional[int]:
    for p in facts.params:
        if p.linear == module_name:
            return p.block
    return None


def _ia3_vectors(facts: ModelFacts, ia3) -> list[ParamInfo]:
    targets, ff = ia3.target_modules, ia3.feedforward_modules
    if targets is None:
        try:
            from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                                              TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TM)
            mt = facts.config.model_type
            targets, ff = TM.get(mt, ["k_proj", "v_proj", "down_proj"]), FF.get(mt, ["down_proj"])
        except ImportError:
            targets, ff = ["k_proj", "v_proj", "down_proj"], ["down_proj"]
    ff = ff or []
    out = []
    for name in lora_targets(facts, targets):
        i, o, _ = facts.linears[name]
        is_ff = any(name == f or name.endswith("." + f) for f in ff)
        blk = _block_of_module(facts, name)
        out.append(ParamInfo(f"{name}.ia3_l", i if is_ff else o, 1, blk, f"block:{blk}" if blk is not None else "root",
                             None, rows=1 if is_ff else o))  # peft: (1, in) or (out, 1)
    return out
