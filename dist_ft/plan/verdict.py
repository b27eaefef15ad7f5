"""The plan of one recipe on one cluster: every row of memory per rank, the totals, whether it fits (device and host
memory), the speed, and the largest micro-batch that fits.

Total per rank = resident state + max(forward/backward transients, optimizer-step transients, the final save, QLoRA's
quantiser while loading) +
runtime (see memory.py); on a CPU "cluster" the offloaded state lives in the same memory and is added to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..distributed.spec import BackendSpec, spec_for
from .activations import activation_bytes, fused_loss_bytes, logits_bytes
from .cluster import NO_BF16, Cluster
from .constants import GIB, MAX_MICRO_BATCH, PRECISION_BYTES
from .counting import MethodCounts, method_counts
from .memory import (ByteRules, Row, buffer_bytes, byte_rules, per_rank, quantise_row, runtime_row, save_row,
                     state_bytes)
from .model import LM_TASKS, ModelFacts, analyze_model
from .speed import speed_estimate


@dataclass
class Plan:
    recipe: Any
    cluster: Cluster
    facts: ModelFacts
    counts: MethodCounts
    micro_batch: int
    seq: int
    rows: list[Row]
    activations: dict
    device_total: float
    fwd_bwd: float
    step: float
    resident: float
    cpu_per_rank: float
    cpu_load_peak: float
    fits: bool
    cpu_fits: Optional[bool]
    speed: dict
    notes: list[str] = field(default_factory=list)
    max_micro_batch: Optional[int] = None
    save: float = 0.0   # the final save's transient on the device (rank 0; memory.save_row)
    load: float = 0.0   # QLoRA's quantiser at load time (memory.quantise_row)

    @property
    def margin_gib(self) -> float:
        return self.cluster.device_memory_gib - self.device_total / GIB

    @property
    def verdict(self) -> str:
        if not self.fits:
            return "does not fit"
        return "fits" if self.cpu_fits is not False else "does not fit (host memory)"

    @property
    def label(self) -> str:
        d = self.recipe.distributed
        return f"{d.strategy}{'' if d.offload == 'none' else '+offload:' + d.offload} / {self.recipe.method.kind}"


def make_plan(recipe, cluster: Cluster, *, facts: Optional[ModelFacts] = None,
              micro_batch: Optional[int] = None, find_max: bool = True, timed: bool = True) -> Plan:
    """Memory per rank and speed for `recipe` on `cluster`. `timed=False`: on a CPU cluster, the step time from
    FLOPs at the MFU instead of timing one block here (cpu_timing.py; for callers that want the memory only)."""
    facts = facts or analyze_model(recipe)
    mc = method_counts(facts, recipe)
    mb = micro_batch or recipe.training.micro_batch_size
    plan = _plan(recipe, cluster, facts, mc, mb, timed=timed)
    if find_max:
        plan.max_micro_batch = largest_micro_batch(recipe, cluster, facts, mc)
    return plan


def _attention_is_eager(recipe) -> bool:
    return recipe.model.attn_implementation == "eager"


def _plan(recipe, cluster: Cluster, facts: ModelFacts, mc: MethodCounts, mb: int, *, timed: bool = True) -> Plan:
    d, t = recipe.distributed, recipe.training
    spec = spec_for(d.strategy)
    rules = byte_rules(d.strategy, d.precision, t.optimizer)
    seq = recipe.data.max_length + mc.extra_seq
    # A preference objective runs both sequences of each pair through the forward: twice the rows of a micro-batch.
    # KTO's second sequence (the mismatched one) runs without gradients: no stored activations.
    seq_rows = mb * (1 if recipe.objective.kind in ("sft", "kto") else 2)
    rows, acts = _rows(recipe, cluster, facts, mc, rules, spec, seq, seq_rows)
    resident = sum(r.device for r in rows if r.phase == "resident")
    fwd_bwd = sum(r.device for r in rows if r.phase == "fwd_bwd")
    step = sum(r.device for r in rows if r.phase == "step")
    runtime = sum(r.device for r in rows if r.phase == "runtime")
    save = sum(r.device for r in rows if r.phase == "save")
    load = sum(r.device for r in rows if r.phase == "load")
    cpu_state = sum(r.cpu for r in rows if r.phase in ("resident", "step"))
    cpu_save = sum(r.cpu for r in rows if r.phase == "save")
    host_rss = sum(r.cpu for r in rows if r.phase == "runtime")
    # Backends that build the whole model on the host before moving it (MemoryRules.builds_whole_model_on_host).
    load_peak = 0.0
    if spec.memory.builds_whole_model_on_host and mc.kind != "qlora" and not cluster.is_cpu:
        load_peak = facts.total * PRECISION_BYTES[d.precision][0]
    device_total = resident + max(fwd_bwd, step, save, load) + runtime
    if cluster.is_cpu:  # offloaded state lives in the same memory
        device_total += cpu_state
        cpu_per_rank = device_total
    else:
        cpu_per_rank = max(cpu_state + cpu_save, load_peak) + host_rss
    fits = device_total <= cluster.device_memory_gib * GIB
    cpu_fits = None
    if cluster.cpu_memory_gib is not None and not cluster.is_cpu:
        cpu_fits = cpu_per_rank * cluster.gpus_per_node <= cluster.cpu_memory_gib * GIB
    speed = speed_estimate(recipe, cluster, facts, mc, rules, seq, seq_rows, timed=timed)
    return Plan(recipe, cluster, facts, mc, mb, seq, rows, acts, device_total, fwd_bwd, step, resident,
                cpu_per_rank, load_peak, fits, cpu_fits, speed, _notes(recipe, cluster, mc, spec), save=save,
                load=load)


def projections_cast_once(spec: BackendSpec, facts: ModelFacts, rules: ByteRules) -> bool:
    """Whether the backend hands the projections one compute-dtype copy of each norm's output
    (MemoryRules.projection_inputs_cast_once): under autocast (a residual stream in the parameters' dtype), on the
    architectures precision.autocast_inputs_cast_once knows."""
    from ..distributed.precision import NORMS_FEEDING_LINEARS
    return (spec.memory.projection_inputs_cast_once and rules.residual != rules.compute
            and getattr(facts.config, "model_type", None) in NORMS_FEEDING_LINEARS)


def _rows(recipe, cluster: Cluster, facts: ModelFacts, mc: MethodCounts, rules: ByteRules, spec: BackendSpec,
          seq: int, mb: int) -> tuple[list[Row], dict]:
    """Every row of the memory table, and the activations with and without checkpointing."""
    d, t = recipe.distributed, recipe.training
    group = d.shard_group_size if d.shard_group_size and d.shard_group_size < cluster.world else None
    hybrid = spec.memory.hybrid if group else ""
    # Hybrid sharding: HSDP holds what FSDP2 on `group` ranks holds; hpZ adds its in-node copy of the weights.
    rows = state_bytes(mc, rules, d.strategy, d.offload, group if hybrid == "mesh" else cluster.world, t.optimizer)
    if hybrid == "secondary_weights":
        weights = mc.trainable + mc.frozen
        rows.append(Row("hpz", "hpZ weights", f"a second weight partition in {rules.compute:g}-byte compute dtype, "
                        f"1/{group} (shard_group_size)", per_rank(weights, group, spec.memory.split) * rules.compute))
    o = recipe.objective
    if o.reference == "copy" and o.kind in ("dpo", "ipo", "kto"):  # a second set of weights, held like the first
        rows.append(Row("reference", "reference copy", "frozen copy of the weights, held as the policy's",
                        rows[0].device, rows[0].cpu))
    # Gradients that exist only from the backward to the step grow as the backward frees activations, so they are
    # counted with the step rather than on top of the activations (MemoryRules.grads_with_step).
    if spec.memory.grads_with_step == "always" or (spec.memory.grads_with_step == "cpu" and cluster.is_cpu):
        for row in rows:
            if row.key == "gradients" and row.device:
                row.phase = "step"
    acts = activation_bytes(facts, seq=seq, micro_batch=mb, e=rules.compute, r=rules.residual,
                            eager=_attention_is_eager(recipe), layers_with_grad=mc.layers_with_grad,
                            lora_dropped=mc.lora_dropped, lora_rank=mc.lora_rank,
                            proj_in=rules.compute if projections_cast_once(spec, facts, rules) else None)
    use = acts["ac"] if d.activation_checkpointing else acts["no_ac"]
    other = acts["no_ac"] if d.activation_checkpointing else acts["ac"]
    ac_detail = (f"{acts['per_token_layer_h']:.1f}h B/token/block; "
                 + (f"AC: {acts['layers']} block inputs + 1 block (no AC: {other / GIB:.2f})"
                    if d.activation_checkpointing else f"{acts['layers']} blocks (with AC: {other / GIB:.2f})"))
    rows.append(Row("activations", "activations", ac_detail, use, phase="fwd_bwd"))
    if recipe.training.fused_loss and facts.task == "causal_lm":
        lg = fused_loss_bytes(facts, seq=seq, micro_batch=mb, e=rules.compute,
                              device_type="cpu" if cluster.is_cpu else "cuda")
        rows.append(Row("logits", "logits + loss", "fused: one chunk of logits + the head input's gradient "
                        f"(no {mb}x{seq}x{facts.vocab})", lg, phase="fwd_bwd"))
    else:
        lg = logits_bytes(facts, seq=seq, micro_batch=mb, e=rules.compute)
        width = facts.vocab if facts.task in LM_TASKS else max(facts.num_labels, 1)
        per_logit = lg / max(mb * seq * width, 1)
        held = "the loss gradient, written over the output" if facts.task in LM_TASKS else "output + loss"
        rows.append(Row("logits", "logits + loss", f"{mb}x{seq}x{width} x {per_logit:g} B ({held})", lg,
                        phase="fwd_bwd"))
    rows += buffer_bytes(facts, mc, rules, recipe, cluster)
    rows.append(save_row(mc, rules, cluster, spec))
    quantise = quantise_row(mc, cluster)
    if quantise is not None:
        rows.append(quantise)
    rows.append(runtime_row(cluster))
    return rows, acts


def _notes(recipe, cluster: Cluster, mc: MethodCounts, spec: BackendSpec) -> list[str]:
    d, t = recipe.distributed, recipe.training
    notes: list[str] = []
    if d.precision.startswith("bf16") and cluster.gpu in NO_BF16:
        notes.append(f"{cluster.gpu} has no bfloat16: use fp16-mixed (same memory)")
    if mc.note:
        notes.append(mc.note)
    if mc.quant_note:
        notes.append("qlora base: " + mc.quant_note)
    o = recipe.objective
    if o.kind == "kto":
        notes.append("objective kto: each example's own sequence trains (micro-batch rows); its mismatched sequence "
                     "(the KL estimate) runs once without gradients, and the reference policy on both: 3 more "
                     "forwards per example, no stored activations")
    elif o.kind != "sft":
        notes.append(f"objective {o.kind}: each pair's chosen and rejected sequences run in one forward (2 x "
                     f"micro-batch rows)" + ("; the reference policy (the model with its adapters off) adds one "
                                            "forward without gradients or stored activations"
                                            if o.kind in ("dpo", "ipo", "kto") else "; no reference policy"))
    # A backend that shards gradients but reduces them once per step keeps them whole between micro-steps.
    if t.gradient_accumulation_steps > 1 and "grads" in spec.shards and not spec.memory.reduce_every_microstep:
        notes.append(f"{spec.name} with accumulation: unsharded gradients stay between micro-steps (no sync): + one "
                     "unsharded gradient copy not counted")
    return notes


def largest_micro_batch(recipe, cluster: Cluster, facts: ModelFacts, mc: Optional[MethodCounts] = None,
                        limit: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch in 1..limit that fits (0: not even 1). Memory grows with the micro-batch, so a
    binary search is exact."""
    mc = mc or method_counts(facts, recipe)

    def fits(mb: int) -> bool:
        p = _plan(recipe, cluster, facts, mc, mb, timed=False)  # (memory only: no block timed per candidate)
        return p.fits and p.cpu_fits is not False

    if not fits(1):
        return 0
    lo, hi = 1, limit
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
