"""Bytes per rank: training state by the byte rules, the backend's transient buffers, and the runtime. What each
backend does is read from its spec (distributed/<backend>/__init__.py: `shards`, `memory: MemoryRules`); nothing
here compares strategy names.

Bytes per parameter (`state_bytes`), following what dist_ft's strategies do (distributed/precision.py and the
backends' strategy.py), with AdamW (two moments m, v in the dtype of the weights it updates):

    strategy       precision   weights  grads  master  m,v   = per parameter before sharding
    ddp, fsdp      fp32           4       4      -      8    16
    ddp, fsdp      bf16-mixed     4       4      -      8    16  fp32 parameters ARE the master copy: DDP runs
                                                                 under autocast; FSDP2 all-gathers bf16 copies
                                                                 (MixedPrecisionPolicy) and reduces grads in fp32
    ddp, fsdp      bf16-true      2       2      -      4     8
    zero1/2/3      bf16-mixed     2       2      4      8    16  DeepSpeed casts the module to bf16 and keeps an
    zero1/2        fp32           4       4      4      8    20    fp32 master partition (a clone even in fp32;
    zero3          fp32           4       4      -      8    16    ZeRO-3's _share_fp32_master removes it)
    zero1/2        bf16-true      2       2      2      4    10  bf16_master_weights_and_grads, bf16 m,v
    zero3          bf16-true      2       2      -      4     8

  (MemoryRules: casts_module_to_compute_dtype picks the DeepSpeed rows, separate_master the clone.)
  So a 7B model with AdamW in mixed precision needs 16 bytes per parameter before sharding (112 GB).
  adamw_8bit (bitsandbytes): m, v in 8 bits plus one fp32 absmax per 256 values each: 2 + 8/256 B; tensors under
  4096 elements keep 32-bit states (8 B) on ddp; DeepSpeed's flat partition is one tensor (always 8-bit).
  Sharding over world size N (the spec's `shards`): ZeRO-1 divides master and m,v by N; ZeRO-2 also gradients;
  ZeRO-3 and FSDP also weights; DDP divides nothing. DeepSpeed's partitions are flat (numel / N); FSDP2 splits
  each tensor's dim 0 (`per_rank`, MemoryRules.split): rank 0 holds ceil(rows / N) rows of each, so a LoRA A of
  r rows costs it a whole row (in_features) once N > r, not r x in / N (checked by `plan --simulate`). Frozen
  parameters (LoRA's base, partial's frozen blocks) cost their weights only. QLoRA's base: see counting.py.
  Offload (`distributed.offload`, the spec's MemoryRules.offload_moves) moves: fsdp params/all -> weights, grads
  and m,v shards to CPU (the step runs there); zero1/zero2/zero3 optimizer -> master, m,v and an fp32 gradient
  partition to CPU; zero3 params -> the weight partitions; zero3 all -> both. Reported in the CPU column.

Transient buffers (`buffer_bytes`, by MemoryRules.buffers):
  ddp    gradient buckets: DDP copies every gradient into its 25 MiB buckets (gradient_as_bucket_view is off),
         so the buckets together are one more copy of the gradients; under autocast also the bf16 copies of the
         weights that autocast caches in forward and that matmuls save for backward.
  fsdp   the largest unit and the largest block gathered in the compute dtype (current + prefetched), the root
         unit gathered all step, the flat all-gather output of the largest unit (copied out into its parameters),
         and the unsharded gradients of the largest unit (compute dtype) plus their reduce-scatter input (a copy
         in the reduce dtype) and output.
  zero1/2  reduce buckets: reduce_bucket_size elements in the compute dtype, twice with overlap_comm.
  zero3  the gathered working set: max(stage3_max_live_parameters, largest parameter) + stage3_prefetch_bucket_size
         elements, plus the reduce buckets as above. Bucket sizes come from the resolved DeepSpeed JSON
         (distributed/deepspeed/config.py fills "auto" from the hidden size), else DeepSpeed's defaults.
  step   dist_ft's AdamW is fused (no temporary); ZeRO-1/2 flatten the gradient partition into a new fp32
         tensor for the step (ZeRO-3 steps on it in place). (MemoryRules.optimizer_step)
  grads  DDP's and FSDP2's gradients are set to None after each step: they grow as the backward frees
         activations and are counted with the step. So are ZeRO-3's released partitions on CPU, where a page counts
         once written (_GradientRelease in distributed/deepspeed/strategy.py); on GPUs that buffer is allocated
         whole at the start of the backward and counts there. (MemoryRules.grads_with_step)
Final save (`save_row`): rank 0 holds one gathered unit at a time (the largest: a block or the embeddings) for a
full model, the trainable tensors for an adapter; in host memory on GPUs (and, under FSDP2/ZeRO-3, on the device
while it is gathered). It comes after training, when the activations and gradients are gone.
Total per rank = resident state + max(forward/backward transients, optimizer-step transients, the final save) +
runtime overhead (CUDA context and workspaces, NCCL buffers; on CPU the resident size of an idle python + torch +
transformers process). Transients that never coexist are not added; the rest is summed as if every term peaked at
once, so the total is an upper estimate of what the caching allocator must hold (fragmentation not included).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..distributed.spec import BackendSpec, spec_for
from .cluster import Cluster
from .constants import (ADAM_8BIT_BYTES, ADAM_8BIT_MIN_SIZE, CPU_PROCESS_RSS_GIB, CUDA_CONTEXT_GIB, CUDA_HOST_RSS_GIB,
                        DDP_BUCKET_MIB, DS_DEFAULTS, GIB, NCCL_BUFFERS_GIB, PRECISION_BYTES, QUANTISE_CPU_WORK_BYTES,
                        QUANTISE_GPU_WORK_BYTES)
from .counting import MethodCounts
from .model import ModelFacts


@dataclass
class ByteRules:
    """Bytes per parameter of each piece of training state, before sharding (see the module docstring)."""
    weights: float          # the module's stored weights
    grads: float
    master: float           # a separate fp32 master copy (DeepSpeed); 0 where the weights are the master
    optimizer: float        # AdamW m + v
    compute: float          # bytes of the compute dtype (activations, gathered weights)
    residual: float         # bytes of the residual stream between blocks
    reduce: float           # bytes gradients are reduced in
    weights_note: str
    grads_note: str
    master_note: str
    optimizer_note: str


def byte_rules(strategy: str, precision: str, optimizer: str) -> ByteRules:
    """The one table of bytes per parameter: what dist_ft's strategies and precisions store."""
    rules = spec_for(strategy).memory
    pb, cb = PRECISION_BYTES[precision]
    dtype = {4: "fp32", 2: "bf16" if "bf16" in precision else "fp16"}
    if rules.casts_module_to_compute_dtype:
        w = cb if precision != "fp32" else 4   # DeepSpeed casts the module to bf16/fp16
        true16 = precision == "bf16-true"  # bf16_master_weights_and_grads + bf16_optimizer_states: no fp32 at all
        # the partitions of the master's dtype are the master (_share_fp32_master)
        shared = not rules.separate_master and (w == 4 or true16)
        return ByteRules(weights=w, grads=w, master=0 if shared else (2 if true16 else 4),
                         optimizer=ADAM_8BIT_BYTES if optimizer == "adamw_8bit" else (4 if true16 else 8),
                         compute=cb, residual=cb, reduce=w,
                         weights_note=f"{dtype[w]} module (DeepSpeed casts it)", grads_note=dtype[w],
                         master_note=f"none: ZeRO-3 updates the {dtype[w]} partitions in place" if shared
                         else f"{'bf16' if true16 else 'fp32'} partition (DeepSpeed)",
                         optimizer_note="8-bit m,v" if optimizer == "adamw_8bit" else
                         f"{'bf16' if true16 else 'fp32'} m,v")
    mixed = pb != cb
    state = pb  # torch AdamW keeps m, v in the parameters' dtype
    opt = ADAM_8BIT_BYTES if optimizer == "adamw_8bit" else 2 * state
    # Gradients are reduced in the parameters' dtype: fp32 under mixed precision (DDP's fp32 gradients, FSDP2's
    # reduce_dtype), else the one dtype there is.
    return ByteRules(weights=pb, grads=pb, master=0, optimizer=opt, compute=cb,
                     residual=(pb if rules.residual_in_param_dtype and mixed else cb), reduce=pb,
                     weights_note=dtype[pb] + (f" (compute in {dtype[cb]})" if mixed else ""),
                     grads_note=dtype[pb],
                     master_note=("none: the fp32 parameters are the master" if pb == 4 else
                                  "none (bf16-true: no fp32 copy)"),
                     optimizer_note="8-bit m,v" if optimizer == "adamw_8bit" else f"{dtype[state]} m,v")


@dataclass
class Row:
    key: str
    component: str
    detail: str
    device: float       # bytes on each device
    cpu: float = 0.0    # bytes in host memory for this rank
    phase: str = "resident"   # resident | fwd_bwd | step | runtime | info


def per_rank(params, world: int, split: str) -> float:
    """Elements of `params` on the most loaded of `world` ranks, each tensor split as the backend splits it
    (MemoryRules.split): "flat" numel / N; "rows" ceil(rows / N) rows of every tensor, rank 0's chunk (the largest,
    and the size FSDP2 pads every rank's storage to). `dist-ft plan --simulate` checks this against the shards."""
    if world == 1 or split == "flat":
        return sum(p.numel for p in params) / world
    return sum(-(-p.rows // world) * (p.numel // p.rows) if p.rows else p.numel / world for p in params)


def frozen_in_compute_dtype(mc: MethodCounts, rules: ByteRules, strategy: str) -> list:
    """The frozen Linear weights a backend stores in the compute dtype under autocast (DDP, adapter methods:
    distributed/precision.frozen_linears_in_compute_dtype); an embedding tied to the head stays in fp32."""
    if rules.weights == rules.compute or not spec_for(strategy).memory.frozen_linears_in_compute_dtype \
            or mc.kind in ("full", "partial") or mc.use_dora:
        return []
    return [p for p in mc.frozen if p.linear and not p.embed]


def state_bytes(mc: MethodCounts, rules: ByteRules, strategy: str, offload: str, world: int,
                optimizer: str) -> list[Row]:
    """Parameters, gradients, optimizer state and master weights per rank: (device bytes, CPU bytes)."""
    n = world
    spec = spec_for(strategy)
    shard_w = 1 / n if "params" in spec.shards else 1.0
    shard_g = 1 / n if "grads" in spec.shards else 1.0
    shard_o = 1 / n if "optimizer" in spec.shards else 1.0
    T, F, Q = mc.n_trainable, mc.n_frozen, mc.n_quantized

    def local(params, what: str) -> float:  # elements of `params` on the most loaded rank
        return per_rank(params, n if what in spec.shards else 1, spec.memory.split)

    T_o = local(mc.trainable, "optimizer")
    cast = frozen_in_compute_dtype(mc, rules, strategy)
    w_dev = (local(mc.trainable, "params") + local(mc.frozen, "params")) * rules.weights \
        - local(cast, "params") * (rules.weights - rules.compute) \
        + local(mc.quantized, "params") * (mc.quant_bytes - mc.quant_constant_bytes) \
        + Q * mc.quant_constant_bytes  # the constants stay whole on every rank (quantized.py)
    g_dev = local(mc.trainable, "grads") * rules.grads
    master = T * rules.master
    m_dev = T_o * rules.master
    if optimizer == "adamw_8bit" and spec.memory.optimizer_step == "per_tensor":
        small = sum(p.numel for p in mc.trainable if p.numel < ADAM_8BIT_MIN_SIZE)
        o_dev = ((T - small) * ADAM_8BIT_BYTES + small * 2 * rules.weights) * (T_o / T if T else 0.0)
    else:
        o_dev = T_o * rules.optimizer
    w_cpu = g_cpu = m_cpu = o_cpu = 0.0
    moves = spec.memory.offload_moves.get(offload, frozenset())
    if "params" in moves:
        w_cpu, w_dev = w_dev, 0.0
    if "grads" in moves:
        g_cpu, g_dev = g_dev, 0.0
    elif "optimizer" in moves:
        # ZeRO-Offload reduces gradients into an fp32 partition in host memory (stage 1 treated like stage 2)
        g_cpu, g_dev = T * 4 / n, 0.0
    if "optimizer" in moves:
        m_cpu, o_cpu = m_dev, o_dev
        m_dev = o_dev = 0.0
    share = lambda s: "" if s == 1 else f", 1/{n}"  # noqa: E731
    q = f" + {Q:,} quantised at {mc.quant_bytes:.3f} B" if Q else ""
    if Q and shard_w < 1:
        q += f" (4-bit codes 1/{n}, constants whole)"
    frozen = f" ({F:,} frozen)" if F and T else ""
    if cast:
        frozen += f" ({sum(p.numel for p in cast):,} frozen Linear weights in {rules.compute:g} B, autocast's copy)"
    return [
        Row("parameters", "parameters", f"{rules.weights_note}{share(shard_w)}{frozen}{q}"
            + (" -> CPU" if w_cpu else ""), w_dev, w_cpu),
        Row("gradients", "gradients", f"{rules.grads_note}, trainable only{share(shard_g)}"
            + (" -> CPU fp32" if g_cpu else ""), g_dev, g_cpu),
        Row("optimizer", "optimizer state", f"AdamW {rules.optimizer_note}{share(shard_o)}"
            + (" -> CPU" if o_cpu else ""), o_dev, o_cpu),
        Row("master", "master weights", rules.master_note + (share(shard_o) if master else "")
            + (" -> CPU" if m_cpu else ""), m_dev, m_cpu),
    ]


# ------------------------------------------------------------------------------------------ transient buffers

def deepspeed_buckets(recipe, world: int, hidden: int, gpu: bool) -> dict:
    """Bucket sizes (elements) of the resolved DeepSpeed JSON; DeepSpeed's defaults for keys it leaves out."""
    from ..distributed.deepspeed.config import AUTO, load_template, resolve_deepspeed_config

    out = dict(DS_DEFAULTS)
    try:
        template, source = load_template(recipe)
        overlap_auto = template.get("zero_optimization", {}).get("overlap_comm") == AUTO
        cfg, _ = resolve_deepspeed_config(template, recipe, world_size=world, hidden_size=hidden, source=source)
        zero = cfg.get("zero_optimization", {})
    except (OSError, ValueError, KeyError) as exc:  # a user JSON that is missing or broken
        zero, overlap_auto, source = {}, True, f"DeepSpeed defaults ({exc})"
    for k in out:
        if isinstance(zero.get(k), (int, float)):
            out[k] = float(zero[k])
    out["overlap_comm"] = gpu if overlap_auto else bool(zero.get("overlap_comm", False))
    out["source"] = source
    return out


def buffer_bytes(facts: ModelFacts, mc: MethodCounts, rules: ByteRules, recipe, cluster: Cluster) -> list[Row]:
    """Temporary device buffers of the strategy during forward/backward, and of the optimizer step."""
    spec = spec_for(recipe.distributed.strategy)
    rows = _BUFFERS[spec.memory.buffers](facts, mc, rules, recipe, cluster, spec)
    rows.append(_step_row(mc, recipe, cluster.world, spec))
    return rows


def _ddp_buffers(facts, mc: MethodCounts, rules: ByteRules, recipe, cluster, spec) -> list[Row]:
    rows = [Row("buffers", "buffers", f"DDP buckets ({DDP_BUCKET_MIB} MiB each): a 2nd copy of the grads, "
                "kept from the first backward on", mc.n_trainable * rules.grads)]
    if rules.weights != rules.compute:  # autocast's bf16 copies of fp32 weights
        ac = recipe.distributed.activation_checkpointing
        train_lin = sum(p.numel for p in mc.trainable if p.linear)
        stored = {id(p) for p in frozen_in_compute_dtype(mc, rules, recipe.distributed.strategy)}
        frozen_lin = sum(p.numel for p in mc.frozen if p.linear and id(p) not in stored
                         and not (ac and p.block is not None))
        rows.append(Row("autocast", "autocast copies", "16-bit copies of Linear weights kept for backward",
                        (train_lin + frozen_lin) * rules.compute, phase="fwd_bwd"))
    return rows


def _fsdp_buffers(facts, mc: MethodCounts, rules: ByteRules, recipe, cluster, spec) -> list[Row]:
    trainable_ids, quantized_ids = {id(p) for p in mc.trainable}, {id(p) for p in mc.quantized}
    units: dict[str, list[float]] = {}
    for p in [*mc.trainable, *mc.frozen, *mc.quantized]:
        u = units.setdefault(p.unit, [0, 0])
        # QLoRA's packed weights are gathered as they are stored (4 bits each, in elements of the compute dtype)
        u[0] += p.numel * ((mc.quant_bytes - mc.quant_constant_bytes) / rules.compute if id(p) in quantized_ids
                           else 1)
        u[1] += p.numel if id(p) in trainable_ids else 0
    root = units.pop("root", [0, 0])
    blocks = [v for k, v in units.items() if k.startswith("block:")]
    largest = max(units.values(), key=lambda v: v[0]) if units else [0, 0]
    largest_block = max((v[0] for v in blocks), default=0)
    # ... and each is dequantised into a compute-dtype weight for its matmul, one Linear at a time.
    dequantised = max((p.numel for p in mc.quantized), default=0)
    # FSDP2 all-gathers a unit into one flat output buffer and copies it out into the unsharded parameters
    # (_fsdp_collectives.foreach_all_gather / _copy_out): for a moment the largest unit is there twice.
    staging = max((v[0] for v in [*units.values(), root]), default=0)
    gathered = (largest[0] + largest_block + root[0] + staging + dequantised) * rules.compute
    # Gradients come out of backward in the compute dtype and are copied into a flat reduce-scatter input in the
    # reduce dtype (always a copy: foreach_reduce), plus its 1/N output.
    per_grad = rules.compute + rules.reduce * (1 + 1 / max(cluster.world, 1))
    unsharded_grads = max((v[1] for v in [*units.values(), root]), default=0) * per_grad
    return [Row("buffers", "buffers", f"FSDP2: 2 units gathered ({_dt(rules.compute)}) + the largest unit's "
                f"all-gather output + 1 unit's grads ({_dt(rules.compute)} + {_dt(rules.reduce)} reduce-scatter "
                f"input)", gathered + unsharded_grads, phase="fwd_bwd")]


def _zero_buffers(facts: ModelFacts, mc: MethodCounts, rules: ByteRules, recipe, cluster: Cluster,
                  spec: BackendSpec) -> list[Row]:
    T = mc.n_trainable
    b = deepspeed_buckets(recipe, cluster.world, facts.hidden, not cluster.is_cpu)
    reduce = b["reduce_bucket_size"] * rules.compute * (2 if b["overlap_comm"] else 1)
    reduce = min(reduce, T * rules.compute * (2 if b["overlap_comm"] else 1))
    detail = f"reduce buckets {b['reduce_bucket_size']:.3g} el" + (" x2 (overlap)" if b["overlap_comm"] else "")
    total = reduce
    if spec.memory.buffers == "zero3_live":
        everything = [*mc.trainable, *mc.frozen, *mc.quantized]
        largest = max((p.numel for p in everything), default=0)
        persistent = sum(p.numel for p in everything if p.numel <= b["stage3_param_persistence_threshold"])
        live = min(sum(p.numel for p in everything), max(b["stage3_max_live_parameters"], largest)
                   + b["stage3_prefetch_bucket_size"])
        total += (live + persistent) * rules.compute
        detail += (f"; gathered: live {b['stage3_max_live_parameters']:.3g} + prefetch "
                   f"{b['stage3_prefetch_bucket_size']:.3g} el")
    return [Row("buffers", "buffers", detail, total, phase="fwd_bwd")]


_BUFFERS = {"ddp_buckets": _ddp_buffers, "fsdp_units": _fsdp_buffers, "zero_buckets": _zero_buffers,
            "zero3_live": _zero_buffers}


def _step_row(mc: MethodCounts, recipe, world: int, spec: BackendSpec) -> Row:
    """What the optimizer step allocates beyond the state (MemoryRules.optimizer_step, cpu_optimizer)."""
    local_t = mc.n_trainable / (world if "optimizer" in spec.shards else 1)
    offloaded_step = "optimizer" in spec.memory.offload_moves.get(recipe.distributed.offload, frozenset())
    step, what = 0.0, "fused AdamW: in place"
    if recipe.training.optimizer == "adamw_8bit":
        what = "8-bit AdamW updates in place"
    elif offloaded_step and spec.memory.cpu_optimizer == "deepspeed":
        what = "DeepSpeed CPU Adam"
    elif spec.memory.optimizer_step == "flat_in_place":
        what = "fused AdamW on the gradient partitions in place (_step_on_gradients_in_place)"
    elif spec.memory.optimizer_step == "flat_copy":
        step, what = local_t * 4, "flattened fp32 grad partition (fused AdamW)"
    if offloaded_step and step:
        return Row("step", "optimizer step", what + " (on CPU)", 0.0, step, phase="step")
    return Row("step", "optimizer step", what, step, phase="step")


def quantise_row(mc: MethodCounts, cluster: Cluster) -> Row | None:
    """QLoRA's load: each weight is read whole in 16 bits and quantised on the rank's device (quantized.py, and
    from_pretrained's quantiser alike), one weight at a time, on top of the shards already loaded. bitsandbytes'
    working memory for it: measured 14.3 B per parameter on a CPU (a 5120 x 13824 weight: 968 MiB for its 135 MiB),
    its CUDA kernel writes only the packed codes and constants."""
    if not mc.quantized:
        return None
    largest = max(p.numel for p in mc.quantized)
    work = QUANTISE_CPU_WORK_BYTES if cluster.is_cpu else QUANTISE_GPU_WORK_BYTES
    return Row("quantise", "load: quantising", f"the largest 4-bit weight ({largest:,}) read whole in 16 bits and "
               f"quantised ({work:g} B/param of bitsandbytes working memory{' on a CPU' if cluster.is_cpu else ''})",
               largest * (2 + work), phase="load")


def save_row(mc: MethodCounts, rules: ByteRules, cluster: Cluster, spec: BackendSpec) -> Row:
    """The final save's transient on rank 0 (checkpoint/hf_folder.py): an adapter method gathers its trainable
    tensors, all at once; a full model is gathered and written one unit at a time (a block, the input embeddings,
    the output head, the rest: FSDP2's units), so the largest unit is the most held. On GPUs a sharding backend
    gathers the unit on the device, rank 0 copies it to host memory; on a CPU both are the same memory."""
    if mc.kind in ("full", "partial"):
        units: dict[str, float] = {}
        for p in [*mc.trainable, *mc.frozen, *mc.quantized]:
            units[p.unit] = units.get(p.unit, 0.0) + p.numel
        name, numel = max(units.items(), key=lambda kv: kv[1], default=("none", 0.0))
        detail = f"final/ written one unit at a time: the largest ({name}) gathered on rank 0"
    else:
        numel = mc.n_trainable
        detail = "final/ holds the adapter: its trainable tensors gathered on rank 0"
    size = numel * rules.weights
    if cluster.is_cpu:
        return Row("final_save", "final save", detail, size, phase="save")
    return Row("final_save", "final save", detail, size if "params" in spec.shards else 0.0, size, phase="save")


def _dt(nbytes: float) -> str:
    return {4: "fp32", 2: "bf16"}.get(int(nbytes), f"{nbytes:g} B")


def runtime_row(cluster: Cluster) -> Row:
    if cluster.is_cpu:
        return Row("runtime", "runtime", "python + torch + transformers process",
                   CPU_PROCESS_RSS_GIB * GIB, phase="runtime")
    nccl = NCCL_BUFFERS_GIB if cluster.world > 1 else 0.0
    return Row("runtime", "runtime", "CUDA context + workspaces" + (" + NCCL buffers" if nccl else ""),
               (CUDA_CONTEXT_GIB + nccl) * GIB, CUDA_HOST_RSS_GIB * GIB, phase="runtime")
