"""`dist-ft plan`: memory per rank and speed of a recipe on a given cluster, computed on a laptop before any run.

    dist-ft plan RECIPE.yaml --nodes N --gpus-per-node G [--gpu H100] [--gpu-memory-gib M] [--cpu-memory-gib C]
                 [--all-strategies] [--mfu 0.4] [--intra-gbps 300] [--inter-gbps 25] [--json] [overrides]
    python -m dist_ft.plan RECIPE.yaml ...               (the same)

The model is never loaded: its config (a local folder, a config.json, a project alias, or `builtin:NAME` for the
configs in BUILTIN_MODELS) is built under `torch.device("meta")` and its parameters are counted exactly from that
meta model (tied embeddings once). Adapters are counted from module shapes. Everything below is per rank, in
bytes; every formula lives in one function, named here, so that it can be calibrated against measurements.

Bytes per parameter (`state_bytes`), following what dist_ft's strategies do (distributed/precision.py, fsdp.py,
ddp.py, deepspeed_zero.py), with AdamW (two moments m, v in the dtype of the weights it updates):

    strategy       precision   weights  grads  master  m,v   = per parameter before sharding
    ddp, fsdp      fp32           4       4      -      8    16
    ddp, fsdp      bf16-mixed     4       4      -      8    16  fp32 parameters ARE the master copy: DDP runs
                                                                 under autocast; FSDP2 all-gathers bf16 copies
                                                                 (MixedPrecisionPolicy) and reduces grads in fp32
    ddp, fsdp      bf16-true      2       2      -      4     8
    zero1/2/3      bf16-mixed     2       2      4      8    16  DeepSpeed casts the module to bf16 and keeps an
    zero1/2        fp32           4       4      4      8    20    fp32 master partition (a clone even in fp32;
    zero3          fp32           4       4      -      8    16    deepspeed_zero._share_fp32_master removes it)
    zero1/2        bf16-true      2       2      2      4    10  bf16_master_weights_and_grads, bf16 m,v
    zero3          bf16-true      2       2      -      4     8

  So a 7B model with AdamW in mixed precision needs 16 bytes per parameter before sharding (112 GB).
  adamw_8bit (bitsandbytes): m, v in 8 bits plus one fp32 absmax per 256 values each: 2 + 8/256 B; tensors under
  4096 elements keep 32-bit states (8 B) on ddp; DeepSpeed's flat partition is one tensor (always 8-bit).
  Sharding over world size N: ZeRO-1 divides master and m,v by N; ZeRO-2 also gradients; ZeRO-3 and FSDP also
  weights; DDP divides nothing. Frozen parameters (LoRA's base, partial's frozen blocks) cost their weights only.
  QLoRA: every nn.Linear weight except the output head in 4 bits = 0.5 B/param, plus quantisation constants
  (blocks of 64 with an fp32 absmax: +0.5 bit/param = 0.0625 B; with double quantisation the absmaxes are 8-bit
  with an fp32 constant per 256 blocks: +0.127 bit/param = 0.0159 B, as in the QLoRA paper); 8-bit: 1 B/param plus
  an fp32 scale per output row. Other parameters (embeddings, norms, head) in fp32, as
  peft.prepare_model_for_kbit_training leaves them.
  Offload (`distributed.offload`) moves: fsdp params/all -> weights, grads and m,v shards to CPU (the step runs
  there); zero1/zero2/zero3 optimizer -> master, m,v and an fp32 gradient partition to CPU; zero3 params -> the
  weight partitions; zero3 all -> both. Reported in the CPU column.

Activations (`activation_bytes`), per token and per transformer block, for a Llama-style decoder: the Korthikanti
et al. (2022) count (34 h bytes per token per layer for GPT in 16-bit, plus 5 a s for the attention scores),
redone for what HF Llama saves: e = bytes of the compute dtype (2 in bf16, 4 in fp32), r = bytes of the residual
stream (fp32 under DDP autocast, whose embedding output stays fp32; the compute dtype elsewhere):
    norms  2 x (4 h)                   RMSNorm upcasts its input to fp32 and saves it (LayerNorm: e h)
    attn   r h + e (h + 2 kv) + e h + 4 a    q/k/v input; q, k, v for SDPA; its output (o_proj input); logsumexp
    mlp    r h + 4 e i   (gated)        gate/up input; gate, SiLU(gate), up, their product (down_proj input)
           r h + 2 e i   (not gated)    fc1 input, GELU input and output
    dropout masks 1 B per element where the config has dropout (BERT); eager attention adds (4 + e) a s (fp32
    softmax output and its cast); SDPA / flash attention do not store the s x s scores.
  Llama-3-8B in bf16 (FSDP): 45 h bytes per token per block. LoRA adds per targeted Linear its dropped input and mask
  ((e + 1) x in_features, when lora dropout > 0) and the rank-r intermediate (e r).
  With activation checkpointing (every block recomputed, as HF's gradient_checkpointing does): each block's input
  (r h per token) plus one block's full activations (the block being recomputed).
  Logits (`logits_bytes`): causal LM B T V x e: the loss writes its gradient over the head's output
  (losses._CrossEntropySum, reuse_logits), an upper bound since the head runs only at target positions.
  Classification B C x (e + 12): the head's output, torch's fp32 log-softmax (4) and its backward (4 + 4).

Transient buffers (`buffer_bytes`):
  ddp    gradient buckets: DDP copies every gradient into its 25 MiB buckets (gradient_as_bucket_view is off),
         so the buckets together are one more copy of the gradients; under autocast also the bf16 copies of the
         weights that autocast caches in forward and that matmuls save for backward.
  fsdp   the largest unit and the largest block gathered in the compute dtype (current + prefetched), the root
         unit gathered all step, and the unsharded gradients of the largest unit (compute dtype) plus their fp32
         reduce-scatter input.
  zero1/2  reduce buckets: reduce_bucket_size elements in the compute dtype, twice with overlap_comm.
  zero3  the gathered working set: max(stage3_max_live_parameters, largest parameter) + stage3_prefetch_bucket_size
         elements, plus the reduce buckets as above. Bucket sizes come from the resolved DeepSpeed JSON
         (distributed/deepspeed_config.py fills "auto" from the hidden size), else DeepSpeed's defaults.
  step   dist_ft's AdamW is fused (no temporary); ZeRO-1/2 flatten the gradient partition into a new fp32
         tensor for the step (ZeRO-3 steps on it in place).
  grads  DDP's and FSDP2's gradients are set to None after each step: they grow as the backward frees
         activations and are counted with the step. So are ZeRO-3's released partitions on CPU, where a page counts
         once written (deepspeed_zero._GradientRelease); on GPUs that buffer is allocated whole at the start of the
         backward and counts there.
Total per rank = resident state + max(forward/backward transients, optimizer-step transients) + runtime overhead
(CUDA context and workspaces, NCCL buffers; on CPU the resident size of an idle python + torch + transformers
process). Transients that never coexist are not added; the rest is summed as if every term peaked at once, so the
total is an upper estimate of what the caching allocator must hold (fragmentation not included).

Speed (`speed`): forward FLOPs per token = flops.flops_per_token / 3 (PaLM's 6 N + 12 L d T counts forward +
backward). Training FLOPs per token = forward x (1 + recompute + g + f): the backward's gradient with respect to
the inputs costs one forward over the g fraction of blocks that need gradients, the weight gradients one forward
over the f fraction of trainable parameters, activation checkpointing recomputes the forward of those blocks. Full:
3x forward (4x with checkpointing); LoRA: ~2x (no weight-gradient GEMMs for frozen weights: ~2/3 of full). Compute
time = tokens x FLOPs / (peak x MFU). Communication per rank per step (ring, (n-1)/n of the bytes): DDP all-reduce
2 G; ZeRO-1/2 reduce-scatter of gradients + all-gather of the updated parameters; ZeRO-3 and FSDP all-gather the
parameters in forward and again in backward and reduce-scatter the gradients (FSDP here reduces in fp32: 2+2+4 B
per parameter in bf16-mixed), at --intra-gbps within a node and --inter-gbps across nodes. Offload adds PCIe
transfers and a CPU optimizer step. QLoRA's compute is multiplied by QLORA_COMPUTE_FACTOR (dequantisation). Step
time = max(compute, communication) + offload (overlap assumed).
Approximations: method `partial` counts exactly which parameters train, but treats blocks below the lowest
trainable one as free of activations and gradient flow only when embeddings and biases are frozen; gradual
unfreezing is planned as full fine-tuning (its state at the end of the schedule).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

GIB = 2 ** 30

# ------------------------------------------------------------------------------------------------ constants
# Every number a measurement should calibrate lives here.
CUDA_CONTEXT_GIB = 0.75      # CUDA context, cuBLAS/cuDNN workspaces, kernels of one process (0.5-1 GiB measured)
NCCL_BUFFERS_GIB = 0.25      # NCCL communicator buffers per process when there is more than one rank
CPU_PROCESS_RSS_GIB = 0.5    # idle python + torch + transformers + peft + dist_ft (0.39 GiB measured on a CPU
#                              torch 2.13 / transformers 5.2 / python 3.11 venv); calibrate on the target machine
CUDA_HOST_RSS_GIB = 2.0      # host memory of a CUDA rank process (CUDA libraries, pinned staging)
DEFAULT_MFU = 0.4
INTRA_NODE_GBPS = 300.0      # GB/s each rank moves within a node (NVLink, effective)
INTER_NODE_GBPS = 25.0       # GB/s each rank moves across nodes (200 Gb/s InfiniBand)
PCIE_GBPS = 25.0             # GB/s host <-> device per GPU (PCIe Gen4 x16, effective)
CPU_ADAM_PARAMS_PER_S = {"deepspeed": 1.0e9, "torch": 3.0e8}   # parameter updates per second per node
QLORA_COMPUTE_FACTOR = 1.3  # bitsandbytes dequantises every 4-bit weight in forward and backward (a guess)
LOGITS_LOSS_BYTES = 12       # classification: per logit beyond the head's output, fp32 log-softmax (4) + backward (8)
ADAM_8BIT_BYTES = 2 + 2 * 4 / 256   # two uint8 states + an fp32 absmax per 256 values for each
ADAM_8BIT_MIN_SIZE = 4096    # bitsandbytes keeps 32-bit states for smaller tensors
DDP_BUCKET_MIB = 25          # bucket_cap_mb (the buckets together hold every gradient once more)
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
               "stage3_max_live_parameters": 1e9, "stage3_param_persistence_threshold": 1e5}
QUANT_CONSTANT_BYTES = {(4, False): 0.5 / 8, (4, True): (8 / 64 + 32 / (64 * 256)) / 8}  # per quantised param
MAX_MICRO_BATCH = 1024

# (bytes of the stored weights, bytes of the compute dtype), as distributed/precision.py maps the recipe
PRECISION_BYTES = {"fp32": (4, 4), "bf16-mixed": (4, 2), "fp16-mixed": (4, 2), "bf16-true": (2, 2)}

# Usable device memory as CUDA reports it (approximate: pass --gpu-memory-gib for your card), GiB.
GPU_MEMORY_GIB = {"H100": 79.1, "H200": 139.8, "A100-80G": 79.2, "A100-40G": 39.4, "L40S": 44.4, "L4": 22.0,
                  "A10": 22.0, "4090": 23.6, "V100": 31.7, "T4": 14.6}
NO_BF16 = ("V100", "T4")
GPU_CHOICES = [*GPU_MEMORY_GIB, "cpu"]

# Published config.json values (the fields that shape the model).
BUILTIN_MODELS: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       hidden_act="silu", attention_bias=False, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001),
    "llama-3-70b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                        hidden_act="silu", attention_bias=False, tie_word_embeddings=False, bos_token_id=128000,
                        eos_token_id=128001),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       hidden_act="silu", sliding_window=131072, use_sliding_window=False, max_window_layers=28,
                       tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    "mistral-7b-v0.1": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                            rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=4096,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         hidden_act="silu", attention_bias=False, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=0),
    # sentence-transformers/all-MiniLM-L6-v2 (the project's minilm-l6-v2 alias)
    "minilm-l6-v2": dict(model_type="bert", architectures=["BertModel"], hidden_size=384, intermediate_size=1536,
                         num_hidden_layers=6, num_attention_heads=12, vocab_size=30522, max_position_embeddings=512,
                         type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, pad_token_id=0),
}
BUILTIN_ALIASES = {"meta-llama-3-8b": "llama-3-8b", "meta-llama-3-70b": "llama-3-70b", "qwen2.5-7b": "qwen2.5-7b",
                   "mistral-7b": "mistral-7b-v0.1", "smollm2-135m-instruct": "smollm2-135m"}
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo2", "granite")


class PlanError(ValueError):
    """The plan cannot be made (a model path that names nothing, a bad option)."""


# ================================================================================================ the model

@dataclass
class ParamInfo:
    name: str
    numel: int
    ndim: int
    block: Optional[int]        # index of the transformer block holding it (None: outside the blocks)
    unit: str                   # FSDP unit: "block:i", "embed", "head" or "root"
    linear: Optional[str]       # the nn.Linear whose weight this is
    in_features: int = 0
    out_features: int = 0
    head: bool = False
    embed: bool = False


@dataclass
class ModelFacts:
    """What the plan needs from the model, read from a meta-device build of its config."""
    path: str
    source: str                 # where the config came from
    cls_name: str
    config: Any
    task: str
    params: list[ParamInfo]
    linears: dict[str, tuple[int, int, bool]]   # linear module name -> (in, out, has bias)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    num_labels: int
    gated: bool
    rms_fp32: bool
    dropout_hidden: float
    dropout_attn: float
    tied: bool
    head_modules: list[str]     # names of the output head module(s)
    model: Any = None           # the meta model (for methods.partial_trainable_names)

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _builtin_key(name: str) -> Optional[str]:
    key = name.strip().lower()
    key = BUILTIN_ALIASES.get(key, key)
    return key if key in BUILTIN_MODELS else None


def resolve_config(recipe) -> tuple[Any, str]:
    """(transformers config, where it came from) for recipe.model.path, without loading weights or converting."""
    from transformers import AutoConfig

    from . import assets

    path = recipe.model.path
    trust = recipe.model.trust_remote_code

    def from_builtin(key: str, why: str):
        values = dict(BUILTIN_MODELS[key])
        return AutoConfig.for_model(values.pop("model_type"), **values), why

    if path.lower().startswith("builtin:"):
        key = _builtin_key(path.split(":", 1)[1])
        if key is None:
            raise PlanError(f"model.path: {path} is not a built-in config; known: "
                            + ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS))
        return from_builtin(key, f"built-in config {key}")
    if assets.is_alias(path):
        materialised = (assets.cache_root() / "models" / path / ".complete").exists() if path == \
            "smollm2-135m-instruct" else assets.alias_available(path) is None
        if materialised:
            folder = assets.resolve_model_path(path)  # already converted / installed: no work
            return AutoConfig.from_pretrained(folder, trust_remote_code=trust), f"{path} -> {folder}"
        key = _builtin_key(path)
        if key is None:
            raise PlanError(f"model.path: alias {path} is not materialised here and has no built-in config")
        return from_builtin(key, f"alias {path} not materialised here: built-in config {key}")
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PlanError(f"model.path: {p} has no config.json")
        return AutoConfig.from_pretrained(p, trust_remote_code=trust), str(p / "config.json")
    if p.is_file() and p.suffix == ".json":
        values = json.loads(p.read_text(encoding="utf-8"))
        if "model_type" not in values:
            raise PlanError(f"model.path: {p} has no model_type")
        return AutoConfig.for_model(values.pop("model_type"), **values), str(p)
    raise PlanError(f"model.path: {path} is neither a local model folder, a config.json, a built-in alias "
                    f"({', '.join(sorted(assets.ALIASES))}) nor builtin:NAME (" + ", ".join(BUILTIN_MODELS) + ")")


_FACTS_CACHE: dict[tuple, ModelFacts] = {}


def analyze_model(recipe) -> ModelFacts:
    """Build the recipe's model on the meta device and record every parameter (tied ones once)."""
    key = (recipe.model.path, recipe.model.task, recipe.model.num_labels, recipe.model.trust_remote_code)
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config, source = resolve_config(recipe)
    config.use_cache = False
    num_labels = 0
    if recipe.model.task == "sequence_classification":
        num_labels = recipe.model.num_labels or 2
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    auto = AutoModelForCausalLM if recipe.model.task == "causal_lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="eager",
                                 trust_remote_code=recipe.model.trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text, "tie_word_embeddings", False))
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings() if recipe.model.task == "causal_lm" else None
    if tied and inp is not None and out is not None and out.weight is not inp.weight:
        out.weight = inp.weight
    tied = bool(inp is not None and out is not None and out.weight is inp.weight)

    head_mods: list[torch.nn.Module] = [out] if out is not None else []
    if not head_mods:
        for attr in ("score", "classifier"):
            mod = getattr(model, attr, None)
            if isinstance(mod, torch.nn.Module):
                head_mods = [mod]
                break
    head_names = [n for n, m in model.named_modules() if any(m is h for h in head_mods)]
    head_ids = {id(p) for m in head_mods for p in m.parameters()}
    embed_ids = {id(p) for p in inp.parameters()} if inp is not None else set()

    blocks = _blocks(model)
    block_of: dict[int, int] = {}
    for i, b in enumerate(blocks):
        for p in b.parameters():
            block_of.setdefault(id(p), i)
    linears: dict[str, tuple[int, int, bool]] = {}
    linear_of: dict[int, tuple[str, int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears[name] = (m.in_features, m.out_features, m.bias is not None)
            linear_of[id(m.weight)] = (name, m.in_features, m.out_features)
    params, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        blk = block_of.get(id(p))
        is_embed, is_head = id(p) in embed_ids, id(p) in head_ids
        if blk is not None:
            unit = f"block:{blk}"
        elif is_embed and not tied:
            unit = "embed"
        elif is_head and not tied and recipe.model.task == "causal_lm":
            unit = "head"
        else:
            unit = "root"
        lin = linear_of.get(id(p))
        params.append(ParamInfo(name=name, numel=p.numel(), ndim=p.dim(), block=blk, unit=unit,
                                linear=lin[0] if lin else None, in_features=lin[1] if lin else 0,
                                out_features=lin[2] if lin else 0, head=is_head, embed=is_embed))
    heads = text.num_attention_heads
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    model_type = getattr(text, "model_type", "")
    act = str(getattr(text, "hidden_act", "") or getattr(text, "hidden_activation", "") or "")
    facts = ModelFacts(
        path=recipe.model.path, source=source, cls_name=type(model).__name__, config=config,
        task=recipe.model.task, params=params, linears=linears, hidden=hidden, layers=text.num_hidden_layers,
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden, vocab=text.vocab_size,
        num_labels=num_labels, gated=act in ("silu", "swiglu", "gelu_pytorch_tanh") or model_type in LLAMA_LIKE,
        rms_fp32=model_type in LLAMA_LIKE,
        dropout_hidden=float(getattr(text, "hidden_dropout_prob", 0.0) or getattr(text, "resid_pdrop", 0.0) or 0.0),
        dropout_attn=float(getattr(text, "attention_probs_dropout_prob", 0.0) or getattr(text, "attn_pdrop", 0.0)
                           or 0.0),
        tied=tied, head_modules=head_names, model=model)
    _FACTS_CACHE[key] = facts
    return facts


def _blocks(model) -> list:
    """FSDP's units (distributed/fsdp.py's rule), else the list of repeated blocks (methods.blocks_of)."""
    try:
        from .distributed.fsdp.strategy import transformer_blocks
        return transformer_blocks(model)
    except Exception:  # noqa: BLE001 - no torch.distributed here, or no _no_split_modules
        from .methods import blocks_of
        try:
            return [b for _, b in blocks_of(model)]
        except ValueError:
            return []


# ================================================================================================ the method

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
        from .methods import partial_trainable_names
        names = partial_trainable_names(facts.model, recipe)
        trainable = [p for p in params if p.name in names]
        frozen = [p for p in params if p.name not in names]
        pc = m.partial
        all_layers = pc.embeddings or pc.bias_only
        return MethodCounts(kind, trainable, frozen, [], 0.0, "", L if all_layers else min(pc.last_blocks, L), [],
                            note="partial: exact trainable set; blocks below the lowest trainable one keep no "
                            "activations" if not all_layers else "partial: exact trainable set")
    adapters: list[ParamInfo] = []
    extra_seq = 0
    dropped = rank = 0.0
    targets: list[str] = []
    saved_modules = list(m.modules_to_save)
    if recipe.model.task == "sequence_classification":
        saved_modules += [h.rsplit(".", 1)[-1] for h in facts.head_modules]
    if kind in ("lora", "qlora"):
        lo = m.lora
        targets = lora_targets(facts, lo.target_modules, saved_modules)
        for name in targets:
            i, o, _ = facts.linears[name]
            blk = _block_of_module(facts, name)
            unit = f"block:{blk}" if blk is not None else "root"
            adapters.append(ParamInfo(f"{name}.lora_A", lo.r * i, 2, blk, unit, None))
            adapters.append(ParamInfo(f"{name}.lora_B", lo.r * o, 2, blk, unit, None))
            if lo.use_dora:
                adapters.append(ParamInfo(f"{name}.lora_magnitude", o, 1, blk, unit, None))
        # Activation elements per token per block, averaged over the blocks: the input copy LoRA's dropout makes
        # for each targeted Linear (none with dropout 0: peft uses Identity) and the rank-r intermediate.
        in_blocks = [t for t in targets if _block_of_module(facts, t) is not None]
        dropped = sum(facts.linears[t][0] for t in in_blocks) / max(L, 1) if lo.dropout > 0 else 0.0
        rank = len(in_blocks) * lo.r / max(L, 1)
    elif kind == "ia3":
        adapters = _ia3_vectors(facts, m.ia3)
    elif kind == "prompt_tuning":
        adapters = [ParamInfo("prompt_embeddings", m.prompt.num_virtual_tokens * facts.hidden, 2, None, "root", None)]
        extra_seq = m.prompt.num_virtual_tokens
    elif kind == "prefix_tuning":
        adapters = [ParamInfo("prefix_embeddings", m.prompt.num_virtual_tokens * L * 2 * facts.kv_dim, 2, None,
                              "root", None)]
        extra_seq = m.prompt.num_virtual_tokens
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
        q = m.quant
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
    return MethodCounts(kind, adapters + copies, frozen, quantized, quant_bytes, quant_note, L, targets,
                        lora_dropped=dropped, lora_rank=rank, extra_seq=extra_seq)


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
                             None))
    return out


# ================================================================================================ the cluster

@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 1
    gpu: str = "H100"                   # a GPU_MEMORY_GIB key, or "cpu"
    device_memory_gib: float = 79.1     # per rank
    cpu_memory_gib: Optional[float] = None   # per node (None: not checked)
    mfu: float = DEFAULT_MFU
    intra_gbps: float = INTRA_NODE_GBPS
    inter_gbps: float = INTER_NODE_GBPS
    peak_flops: Optional[float] = None  # per device (None: the datasheet / a CPU measurement)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def is_cpu(self) -> bool:
        return self.gpu == "cpu"


def make_cluster(*, nodes: int = 1, gpus_per_node: int = 1, gpu: Optional[str] = None,
                 gpu_memory_gib: Optional[float] = None, cpu_memory_gib: Optional[float] = None,
                 mfu: float = DEFAULT_MFU, intra_gbps: float = INTRA_NODE_GBPS, inter_gbps: float = INTER_NODE_GBPS,
                 peak_tflops: Optional[float] = None) -> Cluster:
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError("--nodes and --gpus-per-node must be at least 1")
    if gpu is None:
        gpu = _local_gpu() or "H100"
    canon = {k.lower(): k for k in GPU_CHOICES}
    if gpu.lower() not in canon:
        raise PlanError(f"--gpu {gpu}: not one of {', '.join(GPU_CHOICES)} (pass --gpu-memory-gib for another)")
    gpu = canon[gpu.lower()]
    if gpu_memory_gib is None:
        if gpu == "cpu":
            node = cpu_memory_gib if cpu_memory_gib is not None else _machine_memory_gib()
            gpu_memory_gib = node / gpus_per_node
        else:
            gpu_memory_gib = GPU_MEMORY_GIB[gpu]
    if not 0 < mfu <= 1:
        raise PlanError("--mfu must be in (0, 1]")
    return Cluster(nodes, gpus_per_node, gpu, float(gpu_memory_gib), cpu_memory_gib, mfu, intra_gbps, inter_gbps,
                   peak_tflops * 1e12 if peak_tflops else None)


def _local_gpu() -> Optional[str]:
    try:
        import torch
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            for key in GPU_MEMORY_GIB:
                if key.split("-")[0].lower() in name.lower():
                    if key.startswith("A100"):
                        return "A100-80G" if torch.cuda.get_device_properties(0).total_memory > 50 * GIB else "A100-40G"
                    return key
    except Exception:  # noqa: BLE001
        pass
    return None


def _machine_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 16.0


# ================================================================================================ byte rules

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
    pb, cb = PRECISION_BYTES[precision]
    dtype = {4: "fp32", 2: "bf16" if "bf16" in precision else "fp16"}
    if strategy.startswith("zero"):
        w = cb if precision != "fp32" else 4   # DeepSpeed casts the module to bf16/fp16
        true16 = precision == "bf16-true"  # bf16_master_weights_and_grads + bf16_optimizer_states: no fp32 at all
        # the partitions of the master's dtype are the master (_share_fp32_master)
        shared = strategy == "zero3" and (w == 4 or true16)
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
    return ByteRules(weights=pb, grads=pb, master=0, optimizer=opt, compute=cb,
                     residual=(pb if strategy == "ddp" and mixed else cb),
                     reduce=4 if (strategy == "fsdp" and mixed) else pb,
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


def state_bytes(mc: MethodCounts, rules: ByteRules, strategy: str, offload: str, world: int,
                optimizer: str) -> list[Row]:
    """Parameters, gradients, optimizer state and master weights per rank: (device bytes, CPU bytes)."""
    n = world
    stage = int(strategy[-1]) if strategy.startswith("zero") else 0
    shard_w = 1 / n if strategy in ("fsdp", "zero3") else 1.0
    shard_g = 1 / n if strategy in ("fsdp", "zero3", "zero2") else 1.0
    shard_o = 1 / n if strategy != "ddp" else 1.0
    T, F, Q = mc.n_trainable, mc.n_frozen, mc.n_quantized
    weights = (T + F) * rules.weights + Q * mc.quant_bytes
    grads = T * rules.grads
    master = T * rules.master
    if optimizer == "adamw_8bit" and strategy == "ddp":
        small = sum(p.numel for p in mc.trainable if p.numel < ADAM_8BIT_MIN_SIZE)
        opt = (T - small) * ADAM_8BIT_BYTES + small * 2 * rules.weights
    else:
        opt = T * rules.optimizer
    w_dev, g_dev, m_dev, o_dev = weights * shard_w, grads * shard_g, master * shard_o, opt * shard_o
    w_cpu = g_cpu = m_cpu = o_cpu = 0.0
    where = ""
    if strategy == "fsdp" and offload in ("params", "all", "optimizer"):
        w_cpu, g_cpu, o_cpu = w_dev, g_dev, o_dev
        w_dev = g_dev = o_dev = 0.0
        where = " -> CPU"
    if stage and offload in ("optimizer", "all"):
        # ZeRO-Offload reduces gradients into an fp32 partition in host memory (stage 1 treated like stage 2)
        m_cpu, o_cpu, g_cpu = m_dev, o_dev, T * 4 / n
        m_dev = o_dev = g_dev = 0.0
    if stage == 3 and offload in ("params", "all"):
        w_cpu, w_dev = w_dev, 0.0
    share = lambda s: "" if s == 1 else f", 1/{n}"  # noqa: E731
    q = f" + {Q:,} quantised at {mc.quant_bytes:.3f} B" if Q else ""
    frozen = f" ({F:,} frozen)" if F and T else ""
    return [
        Row("parameters", "parameters", f"{rules.weights_note}{share(shard_w)}{frozen}{q}"
            f"{where if w_cpu else ''}", w_dev, w_cpu),
        Row("gradients", "gradients", f"{rules.grads_note}, trainable only{share(shard_g)}"
            + (" -> CPU fp32" if g_cpu else ""), g_dev, g_cpu),
        Row("optimizer", "optimizer state", f"AdamW {rules.optimizer_note}{share(shard_o)}"
            + (" -> CPU" if o_cpu else ""), o_dev, o_cpu),
        Row("master", "master weights", rules.master_note + (share(shard_o) if master else "")
            + (" -> CPU" if m_cpu else ""), m_dev, m_cpu),
    ]


# ================================================================================================ activations

def activation_bytes(facts: ModelFacts, *, seq: int, micro_batch: int, e: float, r: float, eager: bool,
                     layers_with_grad: int, lora_dropped: float = 0.0, lora_rank: float = 0.0) -> dict:
    """Saved activations per rank, without and with activation checkpointing (the formula in the docstring)."""
    h, i, a, kv = facts.hidden, facts.intermediate, facts.heads, facts.kv_dim
    tokens = seq * micro_batch
    norm_in = 4 * h if facts.rms_fp32 else e * h
    attn = r * h + e * (h + 2 * kv) + e * h + 4 * a
    mlp = r * h + (4 if facts.gated else 2) * e * i
    masks = (2 * h if facts.dropout_hidden > 0 else 0)
    scores = ((4 + e) * a * seq + (a * seq if facts.dropout_attn > 0 else 0)) if eager else 0
    lora = (e + 1) * lora_dropped + e * lora_rank                    # dropped input + mask, rank-r intermediate
    per_layer = 2 * norm_in + attn + mlp + masks + scores + lora     # bytes per token per block
    head = (norm_in + r * h) if facts.task == "causal_lm" else r * h  # final norm and the head's input
    g = layers_with_grad
    no_ac = tokens * (g * per_layer + head)
    ac = tokens * (g * r * h + (per_layer if g else 0) + head)
    return {"no_ac": no_ac, "ac": ac, "per_token_layer": per_layer, "per_token_layer_h": per_layer / h,
            "layers": g, "tokens": tokens}


def logits_bytes(facts: ModelFacts, *, seq: int, micro_batch: int, e: float) -> float:
    """The head's output and the cross-entropy around it. A causal LM's loss (losses._CrossEntropySum) writes its
    gradient over the logits, in their dtype: e bytes per logit, plus a 4 MB chunk. The head runs only at positions
    with a target (losses.forward_logits), so this counts the worst micro-batch, every position a target:
    instruction data, whose prompts carry none, holds less. Classification uses torch's cross-entropy on fp32
    logits."""
    if facts.task == "causal_lm":
        return micro_batch * seq * facts.vocab * e
    return micro_batch * seq * max(facts.num_labels, 1) * (e + LOGITS_LOSS_BYTES)


# ================================================================================================ buffers

def deepspeed_buckets(recipe, world: int, hidden: int, gpu: bool) -> dict:
    """Bucket sizes (elements) of the resolved DeepSpeed JSON; DeepSpeed's defaults for keys it leaves out."""
    from .distributed.deepspeed.config import AUTO, load_template, resolve_deepspeed_config

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
    d = recipe.distributed
    strategy, n = d.strategy, cluster.world
    rows: list[Row] = []
    T = mc.n_trainable
    trainable_ids = {id(p) for p in mc.trainable}
    if strategy == "ddp":
        rows.append(Row("buffers", "buffers", f"DDP buckets ({DDP_BUCKET_MIB} MiB each): a 2nd copy of the grads, "
                        "kept from the first backward on", T * rules.grads))
        if rules.weights != rules.compute:  # autocast's bf16 copies of fp32 weights
            ac = d.activation_checkpointing
            train_lin = sum(p.numel for p in mc.trainable if p.linear)
            frozen_lin = sum(p.numel for p in mc.frozen if p.linear and not (ac and p.block is not None))
            rows.append(Row("autocast", "autocast copies", "16-bit copies of Linear weights kept for backward",
                            (train_lin + frozen_lin) * rules.compute, phase="fwd_bwd"))
    elif strategy == "fsdp":
        units: dict[str, list[int]] = {}
        for p in [*mc.trainable, *mc.frozen, *mc.quantized]:
            u = units.setdefault(p.unit, [0, 0])
            u[0] += p.numel
            u[1] += p.numel if id(p) in trainable_ids else 0
        root = units.pop("root", [0, 0])
        blocks = [v for k, v in units.items() if k.startswith("block:")]
        largest = max(units.values(), key=lambda v: v[0]) if units else [0, 0]
        largest_block = max((v[0] for v in blocks), default=0)
        gathered = (largest[0] + largest_block + root[0]) * rules.compute
        # Gradients come out of backward in the compute dtype; a separate copy for the reduce-scatter exists only
        # when it reduces in another dtype (bf16 compute, fp32 reduce).
        per_grad = rules.compute + (rules.reduce if rules.reduce != rules.compute else 0)
        unsharded_grads = max((v[1] for v in [*units.values(), root]), default=0) * per_grad
        rows.append(Row("buffers", "buffers", f"FSDP2: 2 units gathered ({_dt(rules.compute)}) + 1 unit's grads "
                        f"({_dt(rules.compute)} + {_dt(rules.reduce)} reduce)", gathered + unsharded_grads,
                        phase="fwd_bwd"))
    else:
        stage = int(strategy[-1])
        b = deepspeed_buckets(recipe, n, facts.hidden, not cluster.is_cpu)
        reduce = b["reduce_bucket_size"] * rules.compute * (2 if b["overlap_comm"] else 1)
        reduce = min(reduce, T * rules.compute * (2 if b["overlap_comm"] else 1))
        detail = f"reduce buckets {b['reduce_bucket_size']:.3g} el" + (" x2 (overlap)" if b["overlap_comm"] else "")
        total = reduce
        if stage == 3:
            everything = [*mc.trainable, *mc.frozen, *mc.quantized]
            largest = max((p.numel for p in everything), default=0)
            persistent = sum(p.numel for p in everything if p.numel <= b["stage3_param_persistence_threshold"])
            live = min(sum(p.numel for p in everything), max(b["stage3_max_live_parameters"], largest)
                       + b["stage3_prefetch_bucket_size"])
            total += (live + persistent) * rules.compute
            detail += (f"; gathered: live {b['stage3_max_live_parameters']:.3g} + prefetch "
                       f"{b['stage3_prefetch_bucket_size']:.3g} el")
        rows.append(Row("buffers", "buffers", detail, total, phase="fwd_bwd"))
    # Optimizer step temporaries
    local_t = T / (n if strategy != "ddp" else 1)
    offloaded_step = (strategy == "fsdp" and d.offload != "none") or (strategy.startswith("zero") and
                                                                     d.offload in ("optimizer", "all"))
    if recipe.training.optimizer == "adamw_8bit":
        step, what = 0.0, "8-bit AdamW updates in place"
    elif strategy == "zero3" and not offloaded_step:
        step, what = 0.0, "fused AdamW on the gradient partitions in place (_step_on_gradients_in_place)"
    elif strategy.startswith("zero"):
        step = 0.0 if offloaded_step else local_t * 4
        what = "flattened fp32 grad partition (fused AdamW)" if not offloaded_step else "DeepSpeed CPU Adam"
    else:
        step, what = 0.0, "fused AdamW: in place"
    if offloaded_step and step:
        rows.append(Row("step", "optimizer step", what + " (on CPU)", 0.0, step, phase="step"))
    else:
        rows.append(Row("step", "optimizer step", what, step, phase="step"))
    return rows


def _dt(nbytes: float) -> str:
    return {4: "fp32", 2: "bf16"}.get(int(nbytes), f"{nbytes:g} B")


def runtime_row(cluster: Cluster) -> Row:
    if cluster.is_cpu:
        return Row("runtime", "runtime", "python + torch + transformers process",
                   CPU_PROCESS_RSS_GIB * GIB, phase="runtime")
    nccl = NCCL_BUFFERS_GIB if cluster.world > 1 else 0.0
    return Row("runtime", "runtime", "CUDA context + workspaces" + (" + NCCL buffers" if nccl else ""),
               (CUDA_CONTEXT_GIB + nccl) * GIB, CUDA_HOST_RSS_GIB * GIB, phase="runtime")


# ================================================================================================ the plan

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
              micro_batch: Optional[int] = None, find_max: bool = True) -> Plan:
    """Memory per rank and speed for `recipe` on `cluster`."""
    facts = facts or analyze_model(recipe)
    mc = method_counts(facts, recipe)
    mb = micro_batch or recipe.training.micro_batch_size
    plan = _plan(recipe, cluster, facts, mc, mb)
    if find_max:
        plan.max_micro_batch = largest_micro_batch(recipe, cluster, facts, mc)
    return plan


def _attention_is_eager(recipe) -> bool:
    return recipe.model.attn_implementation == "eager"


def _plan(recipe, cluster: Cluster, facts: ModelFacts, mc: MethodCounts, mb: int) -> Plan:
    d, t = recipe.distributed, recipe.training
    rules = byte_rules(d.strategy, d.precision, t.optimizer)
    seq = recipe.data.max_length + mc.extra_seq
    notes: list[str] = []
    rows = state_bytes(mc, rules, d.strategy, d.offload, cluster.world, t.optimizer)
    # Gradients that exist only from the backward to the step grow as the backward frees activations, so they are
    # counted with the step rather than on top of the activations: DDP's and FSDP2's (set to None after each step),
    # and on CPU ZeRO-3's released partitions (on GPUs the buffer is allocated whole at the start of the backward).
    if d.strategy in ("ddp", "fsdp") or (d.strategy == "zero3" and d.offload in ("none", "params")
                                         and cluster.is_cpu):
        for row in rows:
            if row.key == "gradients" and row.device:
                row.phase = "step"
    acts = activation_bytes(facts, seq=seq, micro_batch=mb, e=rules.compute, r=rules.residual,
                            eager=_attention_is_eager(recipe), layers_with_grad=mc.layers_with_grad,
                            lora_dropped=mc.lora_dropped, lora_rank=mc.lora_rank)
    use = acts["ac"] if d.activation_checkpointing else acts["no_ac"]
    other = acts["no_ac"] if d.activation_checkpointing else acts["ac"]
    ac_detail = (f"{acts['per_token_layer_h']:.1f}h B/token/block; "
                 + (f"AC: {acts['layers']} block inputs + 1 block (no AC: {other / GIB:.2f})"
                    if d.activation_checkpointing else f"{acts['layers']} blocks (with AC: {other / GIB:.2f})"))
    rows.append(Row("activations", "activations", ac_detail, use, phase="fwd_bwd"))
    lg = logits_bytes(facts, seq=seq, micro_batch=mb, e=rules.compute)
    width = facts.vocab if facts.task == "causal_lm" else max(facts.num_labels, 1)
    per_logit = lg / max(mb * seq * width, 1)
    held = "the loss gradient, written over the output" if facts.task == "causal_lm" else "output + loss"
    rows.append(Row("logits", "logits + loss", f"{mb}x{seq}x{width} x {per_logit:g} B ({held})", lg,
                    phase="fwd_bwd"))
    rows += buffer_bytes(facts, mc, rules, recipe, cluster)
    rows.append(runtime_row(cluster))
    resident = sum(r.device for r in rows if r.phase == "resident")
    fwd_bwd = sum(r.device for r in rows if r.phase == "fwd_bwd")
    step = sum(r.device for r in rows if r.phase == "step")
    runtime = sum(r.device for r in rows if r.phase == "runtime")
    cpu_state = sum(r.cpu for r in rows if r.phase in ("resident", "step"))
    host_rss = sum(r.cpu for r in rows if r.phase == "runtime")
    # Strategies that build the whole model on CPU before moving it (ddp, zero1/2 call ModelBuilder.build()).
    load_peak = 0.0
    if d.strategy in ("ddp", "zero1", "zero2") and mc.kind != "qlora" and not cluster.is_cpu:
        load_peak = facts.total * PRECISION_BYTES[d.precision][0]
    device_total = resident + max(fwd_bwd, step) + runtime
    if cluster.is_cpu:  # offloaded state lives in the same memory
        device_total += cpu_state
        cpu_per_rank = device_total
    else:
        cpu_per_rank = max(cpu_state, load_peak) + host_rss
    fits = device_total <= cluster.device_memory_gib * GIB
    cpu_fits = None
    if cluster.cpu_memory_gib is not None and not cluster.is_cpu:
        cpu_fits = cpu_per_rank * cluster.gpus_per_node <= cluster.cpu_memory_gib * GIB
    if d.precision.startswith("bf16") and cluster.gpu in NO_BF16:
        notes.append(f"{cluster.gpu} has no bfloat16: use fp16-mixed (same memory)")
    if mc.note:
        notes.append(mc.note)
    if mc.quant_note:
        notes.append("qlora base: " + mc.quant_note)
    if t.gradient_accumulation_steps > 1 and d.strategy == "fsdp":
        notes.append("fsdp with accumulation: unsharded gradients stay between micro-steps (no sync): + one "
                     "unsharded gradient copy not counted")
    speed = speed_estimate(recipe, cluster, facts, mc, rules, seq, mb)
    return Plan(recipe, cluster, facts, mc, mb, seq, rows, acts, device_total, fwd_bwd, step, resident,
                cpu_per_rank, load_peak, fits, cpu_fits, speed, notes)


def largest_micro_batch(recipe, cluster: Cluster, facts: ModelFacts, mc: Optional[MethodCounts] = None,
                        limit: int = MAX_MICRO_BATCH) -> int:
    """The largest micro-batch in 1..limit that fits (0: not even 1). Memory grows with the micro-batch, so a
    binary search is exact."""
    mc = mc or method_counts(facts, recipe)

    def fits(mb: int) -> bool:
        p = _plan(recipe, cluster, facts, mc, mb)
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


# ================================================================================================ speed

def training_flops_per_token(facts: ModelFacts, mc: MethodCounts, seq: int, checkpointing: bool) -> tuple[float, float]:
    """(forward FLOPs per token, training FLOPs per token): forward x (1 + recompute + g + f), see the docstring."""
    from .telemetry.flops import flops_per_token

    fwd = flops_per_token(facts.config, seq) / 3.0
    L = max(facts.layers, 1)
    g = mc.layers_with_grad / L
    f = mc.n_trainable / max(mc.n_total, 1) if mc.kind in ("full", "partial") else 0.0
    if mc.kind == "full":
        g, f = 1.0, 1.0
    recompute = g if checkpointing else 0.0
    return fwd, fwd * (1.0 + recompute + g + f)


def comm_bytes(recipe, facts: ModelFacts, mc: MethodCounts, rules: ByteRules, world: int) -> tuple[float, str]:
    """Bytes each rank sends per optimizer step (ring collectives: (n-1)/n of the payload each)."""
    if world <= 1:
        return 0.0, "one rank: no collectives"
    d = recipe.distributed
    gas = recipe.training.gradient_accumulation_steps
    f = (world - 1) / world
    T = mc.n_trainable
    W = mc.n_trainable + mc.n_frozen + mc.n_quantized
    if d.strategy == "ddp":
        return 2 * f * T * rules.grads, "all-reduce of the gradients (2x)"
    if d.strategy in ("zero1", "zero2"):
        rs = f * T * rules.grads * (gas if d.strategy == "zero2" else 1)
        return rs + f * T * rules.weights, "reduce-scatter grads" + (" every micro-step" if d.strategy == "zero2"
                                                                     else "") + " + all-gather params"
    if d.strategy == "zero3":
        return gas * f * (2 * W * rules.compute + T * rules.grads), "per micro-step: all-gather fwd + bwd, " \
                                                                     "reduce-scatter grads"
    return gas * f * 2 * W * rules.compute + f * T * rules.reduce, "per micro-step all-gather fwd + bwd (bf16); " \
                                                                   "reduce-scatter grads (fp32) once"


def offload_cost(recipe, mc: MethodCounts, rules: ByteRules, cluster: Cluster) -> tuple[float, str]:
    """Seconds per step spent on PCIe transfers and the CPU optimizer step."""
    d = recipe.distributed
    if d.offload == "none" or cluster.is_cpu:
        return 0.0, ""
    n, gas = cluster.world, recipe.training.gradient_accumulation_steps
    T = mc.n_trainable / n
    W = (mc.n_trainable + mc.n_frozen + mc.n_quantized) / n
    pcie, cpu_params, kind = 0.0, 0.0, "deepspeed"
    if d.strategy == "fsdp":
        pcie = gas * 2 * W * rules.weights + T * rules.grads
        cpu_params, kind = T, "torch"
    else:
        if d.offload in ("optimizer", "all"):
            pcie += T * rules.grads + T * rules.weights
            cpu_params = T
        if d.strategy == "zero3" and d.offload in ("params", "all"):
            pcie += gas * 2 * W * rules.compute
    seconds = pcie / (PCIE_GBPS * 1e9) + cpu_params * cluster.gpus_per_node / CPU_ADAM_PARAMS_PER_S[kind]
    return seconds, f"PCIe {pcie / 1e9:.2f} GB + CPU AdamW over {cpu_params:,.0f} params/rank"


def _peak(cluster: Cluster, precision: str) -> tuple[Optional[float], str]:
    from .telemetry.flops import gpu_peak

    if cluster.peak_flops:
        return cluster.peak_flops, "--peak-tflops"
    dtype = {"fp32": "fp32", "fp16-mixed": "fp16"}.get(precision, "bf16")
    if cluster.is_cpu:
        from .telemetry.flops import measured_cpu_peak
        measured = measured_cpu_peak()
        return measured / cluster.gpus_per_node, "measured fp32 matmul on this machine, shared by the processes"
    peak = gpu_peak(cluster.gpu, dtype)
    return peak, f"{cluster.gpu} {dtype} datasheet"


def speed_estimate(recipe, cluster: Cluster, facts: ModelFacts, mc: MethodCounts, rules: ByteRules, seq: int,
                   mb: int) -> dict:
    d, t = recipe.distributed, recipe.training
    fwd, train = training_flops_per_token(facts, mc, seq, d.activation_checkpointing)
    peak, peak_source = _peak(cluster, d.precision)
    tokens_rank = mb * seq * t.gradient_accumulation_steps
    comm, comm_what = comm_bytes(recipe, facts, mc, rules, cluster.world)
    gbps = cluster.inter_gbps if cluster.nodes > 1 else cluster.intra_gbps
    comm_s = comm / (gbps * 1e9) if comm else 0.0
    off_s, off_what = offload_cost(recipe, mc, rules, cluster)
    out = {"forward_flops_per_token": fwd, "train_flops_per_token": train, "flops_multiple": train / fwd,
           "peak_flops": peak, "peak_source": peak_source, "mfu": cluster.mfu, "tokens_per_rank_per_step": tokens_rank,
           "comm_bytes_per_rank": comm, "comm_what": comm_what, "bandwidth_gbps": gbps,
           "link": "inter-node" if cluster.nodes > 1 else "intra-node", "comm_s": comm_s, "offload_s": off_s,
           "offload_what": off_what}
    if peak:
        compute_s = tokens_rank * train / (peak * cluster.mfu)
        if mc.kind == "qlora":
            compute_s *= QLORA_COMPUTE_FACTOR
        step_s = max(compute_s, comm_s) + off_s
        out.update(compute_s=compute_s, step_s=step_s, tokens_per_s=cluster.world * tokens_rank / step_s,
                   tokens_per_s_per_rank=tokens_rank / step_s)
    else:
        out.update(compute_s=None, step_s=None, tokens_per_s=None, tokens_per_s_per_rank=None)
    return out


# ================================================================================================ all strategies

def variants(recipe, facts: ModelFacts) -> list[tuple[Any, str]]:
    """Every strategy x offload x method the project accepts for this recipe: (recipe, label)."""
    from .config import RecipeError, recipe_from_dict, recipe_to_dict

    base = recipe_to_dict(recipe)
    methods = ["full", "lora"]
    if any(n not in facts.head_modules for n in facts.linears):
        methods.append("qlora")
    if recipe.method.kind not in methods:
        methods.append(recipe.method.kind)
    offloads = {"ddp": ["none"], "fsdp": ["none", "all"], "zero1": ["none", "optimizer"],
                "zero2": ["none", "optimizer"], "zero3": ["none", "optimizer", "params", "all"]}
    out = []
    for strategy, offs in offloads.items():
        for off in offs:
            for kind in methods:
                data = copy.deepcopy(base)
                data["distributed"]["strategy"] = strategy
                data["distributed"]["offload"] = off
                if not strategy.startswith("zero"):
                    data["distributed"]["deepspeed_config"] = None
                data["method"]["kind"] = kind
                if kind != "partial":
                    data["method"]["partial"] = recipe_to_dict(type(recipe)())["method"]["partial"]
                try:
                    out.append((recipe_from_dict(data), f"{strategy} {off} {kind}"))
                except RecipeError:
                    continue
    return out


def compare(recipe, cluster: Cluster, facts: Optional[ModelFacts] = None) -> list[Plan]:
    facts = facts or analyze_model(recipe)
    plans = [make_plan(r, cluster, facts=facts) for r, _ in variants(recipe, facts)]
    return plans


def recommend(plans: list[Plan], method: Optional[str] = None) -> Optional[Plan]:
    ok = [p for p in plans if p.verdict == "fits" and p.speed.get("tokens_per_s") and
          (method is None or p.counts.kind == method)]
    if not ok:
        ok = [p for p in plans if p.verdict == "fits" and (method is None or p.counts.kind == method)]
        return min(ok, key=lambda p: p.device_total) if ok else None
    # the fastest; on a tie, the one that communicates less, then the one with more memory to spare
    return min(ok, key=lambda p: (-round(p.speed["tokens_per_s"], 6), p.speed["comm_s"], -p.margin_gib))


# ================================================================================================ output

def _g(x: float) -> str:
    return f"{x / GIB:.2f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def fmt(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [fmt(headers), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]


def render(plan: Plan) -> str:
    r, c, f, mc = plan.recipe, plan.cluster, plan.facts, plan.counts
    d, t = r.distributed, r.training
    tokens = plan.micro_batch * plan.seq * t.gradient_accumulation_steps * c.world
    lines = [f"model     {f.path} ({f.cls_name}; {f.source})",
             f"          {f.total:,} parameters" + (" (tied embeddings counted once)" if f.tied else ""),
             f"method    {mc.kind}: {mc.n_trainable:,} trainable ({100 * mc.n_trainable / max(mc.n_total, 1):.2f}% "
             f"of {mc.n_total:,})" + (f", LoRA on {len(mc.lora_targets)} Linear modules" if mc.lora_targets else ""),
             f"run       {d.strategy}, {d.precision}, {t.optimizer}, offload {d.offload}, activation checkpointing "
             f"{'on' if d.activation_checkpointing else 'off'}",
             f"cluster   {c.nodes} node(s) x {c.gpus_per_node} {c.gpu} = {c.world} rank(s); "
             f"{c.device_memory_gib:.2f} GiB per {'process' if c.is_cpu else 'GPU'}"
             + (f"; {c.cpu_memory_gib:.0f} GiB host memory per node" if c.cpu_memory_gib else ""),
             f"batch     micro-batch {plan.micro_batch} x {plan.seq} tokens x {t.gradient_accumulation_steps} "
             f"accumulation x {c.world} ranks = {tokens:,} tokens per step", ""]
    phase = {"resident": "", "fwd_bwd": "fwd/bwd", "step": "step", "runtime": ""}
    body = [[row.component, row.detail, _g(row.device), _g(row.cpu) if row.cpu else "", phase[row.phase]]
            for row in plan.rows]
    body.append(["", "", "", "", ""])
    body.append(["total", "resident + max(fwd/bwd, step) + runtime", _g(plan.device_total),
                 _g(plan.cpu_per_rank) if plan.cpu_per_rank else "", ""])
    lines += _table(["per rank", "what", "device GiB", "CPU GiB", "phase"], body, {2, 3})
    lines.append("")
    lines.append(f"peaks     resident {_g(plan.resident)} + fwd/bwd {_g(plan.fwd_bwd)} | optimizer step "
                 f"{_g(plan.step)} GiB")
    margin = plan.margin_gib
    lines.append(f"verdict   {plan.verdict.upper()}: {plan.device_total / GIB:.2f} of {c.device_memory_gib:.2f} GiB "
                 f"per {'process' if c.is_cpu else 'GPU'}, margin {margin:+.2f} GiB")
    if not c.is_cpu:
        host = plan.cpu_per_rank * c.gpus_per_node
        lines.append(f"host      {host / GIB:.2f} GiB per node ({c.gpus_per_node} ranks"
                     + (f"; the model is built whole on CPU first: {_g(plan.cpu_load_peak)} GiB per rank"
                        if plan.cpu_load_peak else "") + ")"
                     + ("" if plan.cpu_fits is None else f" of {c.cpu_memory_gib:.0f} GiB: "
                        + ("ok" if plan.cpu_fits else "TOO MUCH")))
    if plan.max_micro_batch is not None:
        lines.append(f"largest micro-batch that fits: {plan.max_micro_batch}"
                     + (" (the search stops at 1024)" if plan.max_micro_batch == MAX_MICRO_BATCH else ""))
    s = plan.speed
    lines.append(f"flops     {s['forward_flops_per_token'] / 1e9:.2f} GFLOP/token forward, x{s['flops_multiple']:.2f} "
                 f"for training = {s['train_flops_per_token'] / 1e9:.2f} GFLOP/token")
    if s["comm_bytes_per_rank"]:
        lines.append(f"comm      {s['comm_bytes_per_rank'] / 1e9:.2f} GB per rank per step ({s['comm_what']}) at "
                     f"{s['bandwidth_gbps']:g} GB/s {s['link']}: {s['comm_s']:.3f} s")
    if s["offload_s"]:
        lines.append(f"offload   {s['offload_s']:.3f} s per step ({s['offload_what']})")
    if s["step_s"]:
        lines.append(f"speed     compute {s['compute_s']:.3f} s at {c.mfu:.0%} MFU of {s['peak_flops'] / 1e12:.3g} "
                     f"TFLOP/s ({s['peak_source']}); step {s['step_s']:.3f} s; {s['tokens_per_s']:,.0f} tokens/s "
                     f"({s['tokens_per_s_per_rank']:,.0f} per rank)")
    else:
        lines.append("speed     no peak FLOP/s known for this device (pass --peak-tflops)")
    for n in plan.notes:
        lines.append(f"note      {n}")
    return "\n".join(lines)


def render_comparison(plans: list[Plan], recipe) -> str:
    order = sorted(plans, key=lambda p: (p.verdict != "fits", -round(p.speed.get("tokens_per_s") or 0, 6),
                                         p.speed["comm_s"], -p.margin_gib))
    body = []
    for p in order:
        s = p.speed
        body.append([p.recipe.distributed.strategy, p.recipe.distributed.offload, p.counts.kind,
                     f"{p.counts.n_trainable:,}", _g(p.device_total), _g(p.cpu_per_rank), p.verdict,
                     f"{p.margin_gib:+.2f}", str(p.max_micro_batch),
                     f"{s['step_s']:.3f}" if s.get("step_s") else "-",
                     f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-"])
    lines = _table(["strategy", "offload", "method", "trainable", "device GiB", "host GiB", "verdict", "margin",
                    "max mb", "step s", "tokens/s"], body, {3, 4, 5, 7, 8, 9, 10})
    best = recommend(plans)
    same = recommend(plans, recipe.method.kind)
    lines.append("")
    lines.append("fastest that fits: " + (best.label if best else "none"))
    if same is not None and same is not best:
        lines.append(f"fastest that fits with method {recipe.method.kind}: {same.label}")
    elif same is None and recipe.method.kind != (best.counts.kind if best else None):
        lines.append(f"nothing fits with method {recipe.method.kind}")
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    r, c, f, mc = plan.recipe, plan.cluster, plan.facts, plan.counts
    return {
        "model": {"path": f.path, "class": f.cls_name, "source": f.source, "parameters": f.total, "tied": f.tied,
                  "hidden": f.hidden, "layers": f.layers, "vocab": f.vocab},
        "method": {"kind": mc.kind, "trainable": mc.n_trainable, "frozen": mc.n_frozen, "quantized": mc.n_quantized,
                   "total": mc.n_total, "lora_targets": len(mc.lora_targets)},
        "run": {"strategy": r.distributed.strategy, "precision": r.distributed.precision,
                "offload": r.distributed.offload, "optimizer": r.training.optimizer,
                "activation_checkpointing": r.distributed.activation_checkpointing,
                "micro_batch": plan.micro_batch, "seq": plan.seq,
                "gradient_accumulation_steps": r.training.gradient_accumulation_steps},
        "cluster": dataclasses.asdict(c) | {"world": c.world},
        "rows": [{"key": row.key, "component": row.component, "detail": row.detail, "phase": row.phase,
                  "device_gib": row.device / GIB, "cpu_gib": row.cpu / GIB, "device_bytes": row.device,
                  "cpu_bytes": row.cpu} for row in plan.rows],
        "activations_gib": {"no_ac": plan.activations["no_ac"] / GIB, "ac": plan.activations["ac"] / GIB},
        "resident_gib": plan.resident / GIB, "fwd_bwd_gib": plan.fwd_bwd / GIB, "step_gib": plan.step / GIB,
        "device_total_gib": plan.device_total / GIB, "device_memory_gib": c.device_memory_gib,
        "margin_gib": plan.margin_gib, "fits": plan.fits, "cpu_per_rank_gib": plan.cpu_per_rank / GIB,
        "cpu_fits": plan.cpu_fits, "verdict": plan.verdict, "max_micro_batch": plan.max_micro_batch,
        "speed": plan.speed, "notes": plan.notes,
    }


# ================================================================================================ command line

def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to the YAML recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (ranks) per node; processes with --gpu cpu")
    p.add_argument("--gpu", default=None, type=str, help=f"one of {', '.join(GPU_CHOICES)} (default: this machine's "
                   "GPU, else H100)")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="device memory per rank (default: the --gpu's)")
    p.add_argument("--cpu-memory-gib", type=float, default=None, help="host memory per node (checked when given)")
    p.add_argument("--all-strategies", action="store_true", help="compare every strategy x offload x method")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation assumed (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device (default: datasheet)")
    p.add_argument("--intra-gbps", type=float, default=INTRA_NODE_GBPS, help="GB/s per rank within a node")
    p.add_argument("--inter-gbps", type=float, default=INTER_NODE_GBPS, help="GB/s per rank across nodes")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on dist-ft's subcommands (cli.build_parser): `add_parser(sub)`."""
    p = subparsers.add_parser("plan", help="memory per rank and speed of a recipe on a cluster, without running it")
    _add_arguments(p)
    p.set_defaults(fn=cmd_plan)
    return p


def cmd_plan(args) -> int:
    from .config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, list(args.overrides or []))
        cluster = make_cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
                               gpu_memory_gib=args.gpu_memory_gib, cpu_memory_gib=args.cpu_memory_gib, mfu=args.mfu,
                               intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps, peak_tflops=args.peak_tflops)
        facts = analyze_model(recipe)
        plan = make_plan(recipe, cluster, facts=facts)
        plans = compare(recipe, cluster, facts) if args.all_strategies else []
    except (RecipeError, PlanError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = plan_to_dict(plan)
        if plans:
            best, same = recommend(plans), recommend(plans, recipe.method.kind)
            out["alternatives"] = [plan_to_dict(p) | {"label": p.label} for p in plans]
            out["recommendation"] = best.label if best else None
            out["recommendation_same_method"] = same.label if same else None
        print(json.dumps(out, default=str))
        return 0
    print(f"dist-ft plan: {args.recipe}")
    print(render(plan))
    if plans:
        print()
        print(render_comparison(plans, recipe))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dist-ft plan", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    args, extra = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    return cmd_plan(args)


if __name__ == "__main__":
    sys.exit(main())
