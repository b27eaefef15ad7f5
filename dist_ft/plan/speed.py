"""Speed: FLOPs, communication and offload per optimizer step, and the step time they add up to. What each backend
communicates and offloads is read from its spec (`shards`, MemoryRules.reduce_every_microstep, offload_moves,
cpu_optimizer).

Speed (`speed_estimate`): forward FLOPs per token = flops.flops_per_token / 3 (PaLM's 6 N + 12 L d T counts
forward + backward). Training FLOPs per token = telemetry.flops.step_flops_per_token (what MFU counts at run time):
the backward's gradient with respect to the inputs costs one forward over the g fraction of blocks that need
gradients (attention twice), the weight gradients one forward over the f fraction of trainable parameters, the
adapters their own matmuls, activation checkpointing recomputes the forward of those blocks. Full: 3x forward (~4x
with checkpointing); LoRA: ~2x (no weight-gradient GEMMs for frozen weights: ~2/3 of full). Compute time = tokens x FLOPs / (peak x MFU). Communication per rank per step (ring, (n-1)/n of the bytes):
DDP all-reduce 2 G; ZeRO-1/2 reduce-scatter of gradients + all-gather of the updated parameters; ZeRO-3 and FSDP
all-gather the parameters in forward and again in backward and reduce-scatter the gradients (FSDP here reduces in
fp32: 2+2+4 B per parameter in bf16-mixed), at --intra-gbps within a node and --inter-gbps across nodes. Offload
adds PCIe transfers and a CPU optimizer step. QLoRA's compute is multiplied by QLORA_COMPUTE_FACTOR
(dequantisation). Step time = max(compute, communication) + offload (overlap assumed); on a CPU the parameter
all-gathers run at CPU_UNSHARD_GBPS and CPU_COMM_CONTENTION of the shorter of compute and communication is added
(the same cores run both).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..distributed.spec import spec_for
from .cluster import Cluster
from .constants import (CPU_ADAM_PARAMS_PER_S, CPU_COMM_CONTENTION, CPU_UNSHARD_GBPS, PCIE_GBPS,
                        QLORA_COMPUTE_FACTOR)
from .counting import MethodCounts
from .memory import ByteRules
from .model import ModelFacts


def training_flops_per_token(facts: ModelFacts, mc: MethodCounts, seq: int, checkpointing: bool) -> tuple[float, float]:
    """(forward FLOPs per token, training FLOPs per token the hardware runs): the count MFU uses at run time
    (telemetry.flops.step_flops_per_token) for the g fraction of blocks that need input gradients, the f fraction of
    trainable base weights and the adapters' parameters, plus activation checkpointing's recompute."""
    from ..telemetry.flops import MethodFlops, flops_per_token, step_flops_per_token

    fwd = flops_per_token(facts.config, seq) / 3.0
    L = max(facts.layers, 1)
    g = mc.layers_with_grad / L
    f = mc.n_trainable / max(mc.n_total, 1) if mc.kind in ("full", "partial") else 0.0
    if mc.kind == "full":
        g, f = 1.0, 1.0
    adapters = mc.n_trainable if mc.kind not in ("full", "partial") else 0
    _, hardware = step_flops_per_token(facts.config, seq, MethodFlops(g, f, adapters, checkpointing))
    return fwd, hardware


def comm_bytes(recipe, facts: ModelFacts, mc: MethodCounts, rules: ByteRules, world: int) -> tuple[float, str]:
    """Bytes each rank sends per optimizer step (ring collectives: (n-1)/n of the payload each)."""
    gather, reduce, what = comm_parts(recipe, facts, mc, rules, world)
    return gather + reduce, what


def comm_parts(recipe, facts: ModelFacts, mc: MethodCounts, rules: ByteRules,
               world: int) -> tuple[float, float, str]:
    """(parameter all-gather bytes, gradient reduction bytes, what) per rank per optimizer step. Kept apart because
    on a CPU the all-gathers run slower than the reductions (CPU_UNSHARD_GBPS says why)."""
    if world <= 1:
        return 0.0, 0.0, "one rank: no collectives"
    spec = spec_for(recipe.distributed.strategy)
    gas = recipe.training.gradient_accumulation_steps
    f = (world - 1) / world
    T = mc.n_trainable
    every = spec.memory.reduce_every_microstep
    if not spec.shards:
        return 0.0, 2 * f * T * rules.grads, "all-reduce of the gradients (2x)"
    if "params" not in spec.shards:  # whole parameters on every rank: the updated ones are gathered after the step
        rs = f * T * rules.grads * (gas if every else 1)
        return f * T * rules.weights, rs, "reduce-scatter grads" + (" every micro-step" if every else "") \
            + " + all-gather params"
    # QLoRA's sharded base is gathered as stored: 4-bit codes (quantized.py), not compute-dtype weights.
    gathered = (mc.n_trainable + mc.n_frozen) * rules.compute \
        + mc.n_quantized * (mc.quant_bytes - mc.quant_constant_bytes)
    if every:
        return gas * f * 2 * gathered, gas * f * T * rules.grads, "per micro-step: all-gather fwd + bwd, " \
                                                                    "reduce-scatter grads"
    return gas * f * 2 * gathered, f * T * rules.reduce, "per micro-step all-gather fwd + bwd (bf16); " \
                                                         "reduce-scatter grads (fp32) once"


def offload_cost(recipe, mc: MethodCounts, rules: ByteRules, cluster: Cluster) -> tuple[float, str]:
    """Seconds per step spent on PCIe transfers and the CPU optimizer step."""
    d = recipe.distributed
    if d.offload == "none" or cluster.is_cpu:
        return 0.0, ""
    spec = spec_for(d.strategy)
    moves = spec.memory.offload_moves.get(d.offload, frozenset())
    n, gas = cluster.world, recipe.training.gradient_accumulation_steps
    T = mc.n_trainable / n
    W = (mc.n_trainable + mc.n_frozen + mc.n_quantized) / n
    pcie = 0.0
    if "params" in moves:       # the weights live on the host: copied in for every forward and backward
        pcie += gas * 2 * W * rules.weights
    if "grads" in moves:        # the step runs on the host, where the state is: only the gradients go there
        pcie += T * rules.grads
    elif "optimizer" in moves:  # gradients to the host optimizer, the updated weights back
        pcie += T * rules.grads + T * rules.weights
    cpu_params = T if "optimizer" in moves else 0.0
    seconds = (pcie / (PCIE_GBPS * 1e9)
               + cpu_params * cluster.gpus_per_node / CPU_ADAM_PARAMS_PER_S[spec.memory.cpu_optimizer])
    return seconds, f"PCIe {pcie / 1e9:.2f} GB + CPU AdamW over {cpu_params:,.0f} params/rank"


def _peak(cluster: Cluster, precision: str) -> tuple[Optional[float], str]:
    from ..telemetry.flops import gpu_peak

    if cluster.peak_flops:
        return cluster.peak_flops, "--peak-tflops"
    dtype = {"fp32": "fp32", "fp16-mixed": "fp16"}.get(precision, "bf16")
    if cluster.is_cpu:
        from ..telemetry.flops import measured_cpu_peak
        measured = measured_cpu_peak(dtype=dtype)
        return measured / cluster.gpus_per_node, f"measured {dtype} matmul on this machine, shared by the processes"
    peak = gpu_peak(cluster.gpu, dtype)
    return peak, f"{cluster.gpu} {dtype} datasheet"


def _cpu_block_timing(recipe, cluster: Cluster, facts: ModelFacts, mc: MethodCounts, seq: int, mb: int):
    """On a CPU cluster without --peak-tflops: one block of the model timed here (cpu_timing.py), else None."""
    if not cluster.is_cpu or cluster.peak_flops or facts.layers < 1 or mc.extra_seq:
        return None
    from ..distributed.precision import precision_plan
    from .cpu_timing import rank_threads, time_block

    return time_block(facts, recipe, kind=mc.kind, seq=seq, micro_batch=mb,
                      dtype=precision_plan(recipe.distributed.precision).compute_dtype,
                      threads=rank_threads(recipe, cluster.gpus_per_node))


def speed_estimate(recipe, cluster: Cluster, facts: ModelFacts, mc: MethodCounts, rules: ByteRules, seq: int,
                   mb: int, *, timed: bool = True) -> dict:
    d, t = recipe.distributed, recipe.training
    fwd, train = training_flops_per_token(facts, mc, seq, d.activation_checkpointing)
    if recipe.objective.kind in ("dpo", "ipo"):
        train += fwd  # the reference policy's forward (adapters off, no gradients) over the same rows
    elif recipe.objective.kind == "kto":  # per example: the policy on its mismatched sequence (KL estimate, no
        train += 3 * fwd  # gradients), and the reference on both sequences
    peak, peak_source = _peak(cluster, d.precision)
    tokens_rank = mb * seq * t.gradient_accumulation_steps
    gather, reduce, comm_what = comm_parts(recipe, facts, mc, rules, cluster.world)
    comm = gather + reduce
    gbps = cluster.inter_gbps if cluster.nodes > 1 else cluster.intra_gbps
    comm_s = comm / (gbps * 1e9) if comm else 0.0
    if cluster.is_cpu and cluster.nodes == 1 and gather:
        # Gathered parameters land in freshly allocated memory and are copied out into the parameters: on a CPU
        # that costs more than the transfer itself (CPU_UNSHARD_GBPS).
        comm_s = gather / (min(gbps, CPU_UNSHARD_GBPS) * 1e9) + reduce / (gbps * 1e9)
        comm_what += f"; the all-gathers at {min(gbps, CPU_UNSHARD_GBPS):g} GB/s (unsharding on a CPU), the rest"
    group = d.shard_group_size
    if group and group < cluster.world and spec_for(d.strategy).memory.hybrid == "mesh" and cluster.nodes > 1:
        # HSDP: the shard group's collectives at the in-node bandwidth; across nodes only the all-reduce of each
        # rank's gradient shard with its R - 1 replicas.
        inside, inside_what = comm_bytes(recipe, facts, mc, rules, group)
        replicas = cluster.world // group
        across = 2 * (replicas - 1) / replicas * mc.n_trainable * rules.reduce / group
        comm = inside + across
        comm_what = f"{inside_what} within groups of {group}; all-reduce of gradient shards across {replicas} groups"
        comm_s = inside / (cluster.intra_gbps * 1e9) + across / (cluster.inter_gbps * 1e9)
    off_s, off_what = offload_cost(recipe, mc, rules, cluster)
    out = {"forward_flops_per_token": fwd, "train_flops_per_token": train, "flops_multiple": train / fwd,
           "peak_flops": peak, "peak_source": peak_source, "mfu": cluster.mfu, "tokens_per_rank_per_step": tokens_rank,
           "comm_bytes_per_rank": comm, "comm_what": comm_what, "bandwidth_gbps": gbps,
           "link": "inter-node" if cluster.nodes > 1 else "intra-node", "comm_s": comm_s, "offload_s": off_s,
           "offload_what": off_what}
    timing = _cpu_block_timing(recipe, cluster, facts, mc, seq, mb) if timed else None
    if timing is not None or peak:
        if timing is not None:
            compute_s = timing.step_compute_s(layers=facts.layers, layers_with_grad=mc.layers_with_grad,
                                              checkpointing=d.activation_checkpointing,
                                              accumulation=t.gradient_accumulation_steps)
            out.update(compute_source=f"timed one {facts.cls_name} block on this CPU ({timing.threads} thread(s) "
                                      f"per rank): forward {timing.forward_s:.3g} s, forward + backward "
                                      f"{timing.train_s:.3g} s, head + loss {timing.head_s:.3g} s"
                                      + (f", nf4 dequantisation {timing.dequant_s:.3g} s" if timing.dequant_s else ""),
                       block_timing=dataclasses.asdict(timing))
        else:
            compute_s = tokens_rank * train / (peak * cluster.mfu)
            if mc.kind == "qlora":
                compute_s *= QLORA_COMPUTE_FACTOR
        # On a CPU, gloo's transport threads run beside the compute (FSDP2 issues the next block's all-gather
        # before it is needed) but on the same cores: a share of the shorter of the two adds to the longer.
        overlap = max(compute_s, comm_s) + (CPU_COMM_CONTENTION * min(compute_s, comm_s) if cluster.is_cpu else 0.0)
        step_s = overlap + off_s
        out.update(compute_s=compute_s, step_s=step_s, tokens_per_s=cluster.world * tokens_rank / step_s,
                   tokens_per_s_per_rank=tokens_rank / step_s)
    else:
        out.update(compute_s=None, step_s=None, tokens_per_s=None, tokens_per_s_per_rank=None)
    return out
