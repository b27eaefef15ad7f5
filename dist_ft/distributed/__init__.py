"""Distributed concerns, one module each: topology, precision, activation checkpointing, and one strategy per
backend (DDP, FSDP2, DeepSpeed ZeRO). Nothing outside this package imports torch.distributed's wrappers or
deepspeed."""
