"""The numbers `dist-ft plan` assumes: every one a measurement should calibrate lives here, beside the byte sizes of
the precisions. The lowest module of plan/: it imports nothing from the others."""

from __future__ import annotations

GIB = 2 ** 30

CUDA_CONTEXT_GIB = 0.75      # CUDA context, cuBLAS/cuDNN workspaces, kernels of one process (0.5-1 GiB measured)
NCCL_BUFFERS_GIB = 0.25      # NCCL communicator buffers per process when there is more than one rank
CPU_PROCESS_RSS_GIB = 0.5    # idle python + torch + transformers + peft + dist_ft (0.39 GiB measured on a CPU
#                              torch 2.13 / transformers 5.2 / python 3.11 venv); calibrate on the target machine
CUDA_HOST_RSS_GIB = 2.0      # host memory of a CUDA rank process (CUDA libraries, pinned staging)
DEFAULT_MFU = 0.4
INTRA_NODE_GBPS = 300.0      # GB/s each rank moves within a node (NVLink, effective)
INTER_NODE_GBPS = 25.0       # GB/s each rank moves across nodes (200 Gb/s InfiniBand)
CPU_GLOO_GBPS = 1.0          # GB/s a CPU rank moves over gloo between processes of one machine (dist-ft doctor on
#                              the 2-core dev VM: 1.05 GB/s ping-pong, 0.82 GB/s all-reduce bus bandwidth)
CPU_UNSHARD_GBPS = 0.23      # GB/s of parameters a CPU rank receives when FSDP2 unshards a block over gloo: the
#                              all-gather into a freshly allocated buffer (page faults for large blocks) and the
#                              copy-out into the parameters. benchmarks/unshard_rate.py on the 2-core dev VM, 2 ranks,
#                              two runs: 0.22-0.27 for 98-605 MiB blocks (1.1B to 13B shapes), 0.38-0.40 for a 14 MiB
#                              one; a raw all_gather into a preallocated buffer 0.45-0.69.
CPU_COMM_CONTENTION = 0.2    # on a CPU, the share of the shorter of compute and communication that the longer does
#                              not hide (gloo's threads share the cores). Fitted on the 7B LoRA FSDP2 row of
#                              benchmarks/results/scale.md (64-66 s/step), checked on the 13B QLoRA row (92-98 s;
#                              plan 97) and on a 1.1B LoRA run made afterwards (10.0-10.8 s; plan 10.6).
PCIE_GBPS = 25.0             # GB/s host <-> device per GPU (PCIe Gen4 x16, effective)
CPU_ADAM_PARAMS_PER_S = {"deepspeed": 1.0e9, "torch": 3.0e8}   # parameter updates per second per node, by the
#                                                                 CPU optimizer a spec names (MemoryRules.cpu_optimizer)
QUANTISE_CPU_WORK_BYTES = 14.3  # bitsandbytes' quantize_4bit on a CPU: peak working bytes per parameter (measured)
QUANTISE_GPU_WORK_BYTES = 0.6   # its CUDA kernel: the packed codes and the constants it writes
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


class PlanError(ValueError):
    """The plan cannot be made (a model path that names nothing, a bad option)."""
