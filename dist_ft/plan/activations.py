"""What the forward saves for the backward, per rank: activations and the logits with their loss.

Activations (`activation_bytes`), per token and per transformer block, for a Llama-style decoder: the Korthikanti
et al. (2022) count (34 h bytes per token per layer for GPT in 16-bit, plus 5 a s for the attention scores),
redone for what HF Llama saves: e = bytes of the compute dtype (2 in bf16, 4 in fp32), r = bytes of the residual
stream (fp32 under DDP autocast, whose embedding output stays fp32; the compute dtype elsewhere):
    norms  2 x (4 h)                   RMSNorm upcasts its input to fp32 and saves it (LayerNorm: e h)
    attn   r h + e (h + 2 kv) + e h + 4 a    q/k/v input; q, k, v for SDPA; its output (o_proj input); logsumexp
    mlp    r h + 4 e i   (gated)        gate/up input; gate, SiLU(gate), up, their product (down_proj input)
           r h + 2 e i   (not gated)    fc1 input, GELU input and output
    (the q/k/v and gate/up inputs in e instead of r where DDP casts the norms' outputs once for autocast)
    dropout masks 1 B per element where the config has dropout (BERT); eager attention adds (4 + e) a s (fp32
    softmax output and its cast); SDPA / flash attention do not store the s x s scores.
  Llama-3-8B in bf16 (FSDP): 45 h bytes per token per block. LoRA adds per targeted Linear its dropped input and mask
  ((e + 1) x in_features, when lora dropout > 0) and the rank-r intermediate (e r).
  With activation checkpointing (every block recomputed, as HF's gradient_checkpointing does): each block's input
  (r h per token) plus one block's full activations (the block being recomputed).
  Logits (`logits_bytes`): causal LM B T V x e: the loss writes its gradient over the head's output
  (train/loss.py's _CrossEntropySum, reuse_logits), an upper bound since the head runs only at target positions.
  Classification B C x (e + 12): the head's output, torch's fp32 log-softmax (4) and its backward (4 + 4).
"""

from __future__ import annotations

from .constants import LOGITS_LOSS_BYTES
from .model import LM_TASKS, ModelFacts


def activation_bytes(facts: ModelFacts, *, seq: int, micro_batch: int, e: float, r: float, eager: bool,
                     layers_with_grad: int, lora_dropped: float = 0.0, lora_rank: float = 0.0,
                     proj_in: float | None = None) -> dict:
    """Saved activations per rank, without and with activation checkpointing (the formula in the docstring).
    `proj_in`: bytes per element of the norm outputs the q/k/v and gate/up projections save (default `r`; the
    compute dtype where the backend casts them once, precision.autocast_inputs_cast_once)."""
    h, i, a, kv = facts.hidden, facts.intermediate, facts.heads, facts.kv_dim
    p = r if proj_in is None else proj_in
    tokens = seq * micro_batch
    norm_in = 4 * h if facts.rms_fp32 else e * h
    attn = p * h + e * (h + 2 * kv) + e * h + 4 * a
    mlp = p * h + (4 if facts.gated else 2) * e * i
    masks = (2 * h if facts.dropout_hidden > 0 else 0)
    scores = ((4 + e) * a * seq + (a * seq if facts.dropout_attn > 0 else 0)) if eager else 0
    lora = (e + 1) * lora_dropped + e * lora_rank                    # dropped input + mask, rank-r intermediate
    per_layer = 2 * norm_in + attn + mlp + masks + scores + lora     # bytes per token per block
    head = (norm_in + r * h) if facts.task in LM_TASKS else r * h  # final norm and the head's input
    g = layers_with_grad
    no_ac = tokens * (g * per_layer + head)
    ac = tokens * (g * r * h + (per_layer if g else 0) + head)
    return {"no_ac": no_ac, "ac": ac, "per_token_layer": per_layer, "per_token_layer_h": per_layer / h,
            "layers": g, "tokens": tokens}


def logits_bytes(facts: ModelFacts, *, seq: int, micro_batch: int, e: float) -> float:
    """The head's output and the cross-entropy around it. A causal LM's loss (train/loss.py's _CrossEntropySum)
    writes its gradient over the logits, in their dtype: e bytes per logit, plus a 4 MB chunk. The head runs only at
    positions with a target (train/loss.py's forward_logits), so this counts the worst micro-batch, every position
    a target: instruction data, whose prompts carry none, holds less. Classification uses torch's cross-entropy on
    fp32 logits."""
    if facts.task in LM_TASKS:
        return micro_batch * seq * facts.vocab * e
    return micro_batch * seq * max(facts.num_labels, 1) * (e + LOGITS_LOSS_BYTES)


def fused_loss_bytes(facts: ModelFacts, *, seq: int, micro_batch: int, e: float, device_type: str) -> float:
    """training.fused_loss (train/fused_loss.py): one chunk of logits (e bytes) and their fp32 log-probabilities,
    the gradient for the head's input (one row of `hidden` per target, e bytes) and each row's fp32 log-sum-exp. A
    head that trains gets its gradient as it would unfused (counted with the gradients). No [targets, vocab]
    tensor."""
    from ..train.fused_loss import chunk_rows

    tokens = micro_batch * seq
    rows = min(chunk_rows(device_type=device_type, vocab=facts.vocab), tokens)
    return rows * facts.vocab * (e + 4) + tokens * (facts.hidden * e + 4)
