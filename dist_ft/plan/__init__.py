"""`dist-ft plan`: memory per rank and speed of a recipe on a given cluster, computed on a laptop before any run.

    dist-ft plan RECIPE.yaml --nodes N --gpus-per-node G [--gpu H100] [--all-strategies] [--json] [overrides]
    python -m dist_ft.plan RECIPE.yaml ...               (the same)

The model is never loaded: it is built on the meta device and its parameters counted exactly. Everything is per
rank, in bytes; every formula lives in one function, named in the docstring of its module, so that it can be
calibrated against measurements. What a backend does (what it shards, casts, buffers, offloads, how it steps and
communicates) is read from its spec, `distributed.spec.spec_for(strategy)` (shards, MemoryRules); nothing here
compares strategy names. The modules, each importing only from those above it:

    constants.py    every number a measurement should calibrate; bytes of each precision
    cluster.py      the cluster: ranks, device and host memory, the GPUs --gpu knows
    model.py        the model's config, built on the meta device: every parameter, its block, unit and Linear
    counting.py     parameters by role once the method is applied (trainable, frozen, quantised)
    activations.py  saved activations and logits per micro-batch
    memory.py       bytes per parameter of each piece of state, sharding, offload, transient buffers, runtime
    speed.py        FLOPs, communication, offload time, step time
    verdict.py      the plan: rows, totals, fits or not, the largest micro-batch that fits
    compare.py      --all-strategies: every backend x offload x method its spec accepts, the fastest that fits
    simulate.py     --simulate: the real model sharded on meta under a fake process group, rank 0's bytes vs the plan
    render.py       text tables and the JSON dict
    command.py      the command line (`main`, `add_parser`, `cmd_plan`)
"""

from __future__ import annotations

from .activations import activation_bytes, fused_loss_bytes, logits_bytes
from .cluster import GPU_CHOICES, GPU_MEMORY_GIB, NO_BF16, Cluster, make_cluster
from .command import add_parser, cmd_plan, main
from .compare import compare, recommend, variants
from .constants import (ADAM_8BIT_BYTES, ADAM_8BIT_MIN_SIZE, CPU_ADAM_PARAMS_PER_S, CPU_COMM_CONTENTION,
                        CPU_GLOO_GBPS, CPU_PROCESS_RSS_GIB, CPU_UNSHARD_GBPS, CUDA_CONTEXT_GIB, CUDA_HOST_RSS_GIB,
                        DDP_BUCKET_MIB, DEFAULT_MFU, DS_DEFAULTS, GIB,
                        INTER_NODE_GBPS, INTRA_NODE_GBPS, LOGITS_LOSS_BYTES, MAX_MICRO_BATCH, NCCL_BUFFERS_GIB,
                        PCIE_GBPS, PRECISION_BYTES, QLORA_COMPUTE_FACTOR, QUANT_CONSTANT_BYTES, PlanError)
from .counting import MethodCounts, lora_param_count, lora_targets, method_counts
from .memory import ByteRules, Row, buffer_bytes, byte_rules, deepspeed_buckets, runtime_row, state_bytes
from .model import (_FACTS_CACHE, BUILTIN_ALIASES, BUILTIN_MODELS, LLAMA_LIKE, ModelFacts, ParamInfo, analyze_model,
                    resolve_config)
from .render import plan_to_dict, render, render_comparison
from .speed import comm_bytes, comm_parts, offload_cost, speed_estimate, training_flops_per_token
from .verdict import Plan, _plan, largest_micro_batch, make_plan

__all__ = [
    # constants.py
    "GIB", "CUDA_CONTEXT_GIB", "NCCL_BUFFERS_GIB", "CPU_PROCESS_RSS_GIB", "CUDA_HOST_RSS_GIB", "DEFAULT_MFU",
    "INTRA_NODE_GBPS", "INTER_NODE_GBPS", "CPU_GLOO_GBPS", "CPU_UNSHARD_GBPS",
    "CPU_COMM_CONTENTION", "PCIE_GBPS", "CPU_ADAM_PARAMS_PER_S", "QLORA_COMPUTE_FACTOR",
    "LOGITS_LOSS_BYTES", "ADAM_8BIT_BYTES", "ADAM_8BIT_MIN_SIZE", "DDP_BUCKET_MIB", "DS_DEFAULTS",
    "QUANT_CONSTANT_BYTES", "MAX_MICRO_BATCH", "PRECISION_BYTES", "PlanError",
    # cluster.py
    "GPU_MEMORY_GIB", "NO_BF16", "GPU_CHOICES", "Cluster", "make_cluster",
    # model.py (_FACTS_CACHE: tests clear it)
    "BUILTIN_MODELS", "BUILTIN_ALIASES", "LLAMA_LIKE", "ParamInfo", "ModelFacts", "resolve_config", "analyze_model",
    "_FACTS_CACHE",
    # counting.py
    "MethodCounts", "lora_targets", "lora_param_count", "method_counts",
    # activations.py, memory.py, speed.py
    "activation_bytes", "logits_bytes", "fused_loss_bytes", "ByteRules", "byte_rules", "Row", "state_bytes", "deepspeed_buckets",
    "buffer_bytes", "runtime_row", "training_flops_per_token", "comm_bytes", "comm_parts", "offload_cost", "speed_estimate",
    # verdict.py (_plan: one plan without the micro-batch search, for tests)
    "Plan", "make_plan", "_plan", "largest_micro_batch",
    # compare.py, render.py, command.py
    "variants", "compare", "recommend", "render", "render_comparison", "plan_to_dict",
    "add_parser", "cmd_plan", "main",
]
