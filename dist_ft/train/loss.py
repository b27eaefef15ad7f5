"""Summed losses over target tokens (or samples). Normalisation happens once, by the global target count, in the
training step; evaluation divides the same sums by the same counts, so the two can never drift apart."""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.formats import IGNORE

_SELECTS_POSITIONS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits the loss needs and their targets, both flat: [N, vocab] and [N] for a causal LM and an
    encoder-decoder (its decoder's positions), [B, classes] and [B] for a classifier.

    A causal LM's head runs only at positions whose next token is a target. In instruction data the prompt (system
    text, question) is most of each row and carries no target, and the head is the widest matrix multiply of a
    small model (SmolLM2-135M: a fifth of the forward's FLOPs), so projecting every position would spend a large
    share of the step, forward and backward, on logits the loss then ignores; it would also hold them in memory.
    transformers' `logits_to_keep` takes a boolean [B, T] mask for exactly this.
    """
    batch = attention_inputs(batch, attn_implementation=attention_implementation(model))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if labels.dim() == 1:  # one label per sample
        return model(**inputs).logits, labels
    if "decoder_attention_mask" in batch:  # an encoder-decoder: logits at every decoder position, labels unshifted
        logits = model(**inputs, decoder_input_ids=decoder_inputs(model, labels)).logits
        return logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    # Shift the labels rather than the logits: slicing [B, T, V] logits would copy the largest activation.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    if selects_positions(model):
        keep = targets != IGNORE
        return model(**inputs, logits_to_keep=keep).logits, targets[keep]
    logits = model(**inputs).logits
    if logits.size(1) > labels.size(1):
        logits = logits[:, -labels.size(1):]  # prompt tuning prepends its virtual tokens: they carry no target
    return logits.reshape(-1, logits.size(-1)), targets.reshape(-1)


def attention_inputs(batch: dict[str, torch.Tensor], *, attn_implementation: str) -> dict[str, torch.Tensor | int]:
    """The micro-batch as the model is given it under this attention implementation (labels included).

    Packed rows ([B, T] position_ids restarting at every sample, no attention mask) mark their samples by the
    restarts alone. sdpa, eager and flex read restarts in every row (transformers' masking_utils builds a per-sample
    mask from [B, T] position ids), so their batches go as they are. Flash-attention kernels get no mask: transformers
    finds samples from position ids only in a batch of one row (`_is_packed_sequence`), and a [B, T] batch with
    B > 1 runs dense causal attention across the samples of each row. For them the rows are laid end to end as one
    [1, B*T] row (each row's padding is a sample of its own, so no boundary is lost), with the sample boundaries
    given as cu_seq_lens / max_length, which transformers passes straight to the varlen kernel (else it would work
    them out again from the position ids in every layer, a device sync each). A row's first label is never a target
    in the [B, T] form (nothing precedes it); it is made IGNORE so the end of the previous row does not predict it.
    """
    packed = "position_ids" in batch and "attention_mask" not in batch and batch["labels"].dim() == 2
    # "flash" in the name is transformers' own test for a flash kernel (is_flash_attention_requested):
    # flash_attention_2, _3, _4 and hub kernels such as kernels-community/flash-attn2.
    if not packed or "flash" not in attn_implementation:
        return batch
    rows, length = batch["input_ids"].shape
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE
    position_ids = batch["position_ids"].reshape(1, -1)
    pos = position_ids[0]
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1  # a sample starts where positions do not continue, and at each row's start
    starts[::length] = True
    total = torch.tensor([rows * length], device=pos.device)
    cu_seq_lens = torch.cat([starts.nonzero().view(-1), total]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())  # an int: the varlen kernels take the longest sample as a number
    return {**batch, "input_ids": batch["input_ids"].reshape(1, -1), "labels": labels.reshape(1, -1),
            "position_ids": position_ids, "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length, "max_length_k": max_length}


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a backend's wrapper or engine (`.module`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def decoder_inputs(model: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """An encoder-decoder's decoder inputs, made by the model itself from the labels (T5's `_shift_right`, BART's
    `shift_tokens_right`: the start token, then the labels shifted right, IGNORE as padding), as transformers'
    DataCollatorForSeq2Seq makes them. Not by passing `labels` to the forward: the model would then also compute its
    own mean loss over every logit, which the summed loss here would throw away."""
    inner = _unwrapped(model)
    if getattr(inner, "active_peft_config", None) is not None:
        inner = inner.get_base_model()
    return inner.prepare_decoder_input_ids_from_labels(labels=labels)


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation `model` (under a backend's wrapper or peft) runs, from its config ("" if none)."""
    inner = _unwrapped(model)
    if getattr(inner, "active_peft_config", None) is not None:
        inner = inner.get_base_model()
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) or ""


def selects_positions(model: torch.nn.Module) -> bool:
    """Whether `model` (under a backend's wrapper or peft) takes a [B, T] mask of positions to project (`logits_to_keep`).
    Prompt and prefix tuning do not: their virtual tokens shift the positions the mask would name."""
    if model not in _SELECTS_POSITIONS:
        inner = _unwrapped(model)
        peft_config = getattr(inner, "active_peft_config", None)
        prompt_learning = peft_config is not None and peft_config.is_prompt_learning
        if peft_config is not None:
            inner = inner.get_base_model()
        _SELECTS_POSITIONS[model] = (not prompt_learning
                                     and "logits_to_keep" in inspect.signature(inner.forward).parameters)
    return _SELECTS_POSITIONS[model]


def loss_sum(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None, *,
             reuse_logits: bool = False) -> torch.Tensor:
    """Sum of cross-entropies over the targets that `forward_logits` returns (IGNORE ones count nothing), each
    sample weighted by its class where given (data.balance: the weights average 1 over the training set, so the
    loss keeps its scale).

    reuse_logits: the caller does not read the logits afterwards (the training step drops them), so the gradient may
    be written over them: no second vocabulary-sized tensor. Not where the op that made them keeps its output for
    its own backward (Gemma's logit soft-cap is a tanh): then the gradient gets its own tensor. An op that keeps it
    out of sight (a custom autograd Function) makes autograd stop the backward with an in-place error, never a wrong
    gradient."""
    if class_weights is not None:
        return F.cross_entropy(logits.float(), targets, weight=class_weights, ignore_index=IGNORE, reduction="sum")
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropySum.apply(logits, targets, reuse_logits and not _kept_by_producer(logits))
    return _summed_cross_entropy(logits, targets)


def _summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss's value without its gradient (evaluation): the same chunks, the same fp32 arithmetic.

    F.cross_entropy on the whole would make an fp32 copy of the [tokens, vocab] logits and their log-softmax beside
    them (two more vocabulary-sized tensors, ~16 GB at 16k tokens and a 128k vocabulary), so evaluation would peak
    above the training step. Here one chunk's log-probabilities exist at a time."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    rows = chunk_rows(device_type=logits.device.type, vocab=logits.size(-1))
    for start in range(0, logits.size(0), rows):
        total += _chunk_loss(logits[start:start + rows], targets[start:start + rows]).loss
    return total


@dataclass
class _ChunkLoss:
    loss: torch.Tensor  # summed over the chunk's kept rows, fp32
    logp: torch.Tensor  # [rows, vocab] fp32 log-probabilities: a tensor of the chunk's own, free to overwrite
    safe: torch.Tensor  # [rows, 1] targets, ignored ones replaced by 0 (a valid index)
    keep: torch.Tensor  # [rows] whether the row's target counts


def _chunk_loss(x: torch.Tensor, t: torch.Tensor) -> _ChunkLoss:
    """Cross-entropy of one chunk of logits `x` (any float dtype; read, never written) against targets `t`.

    log_softmax is one fused pass over the chunk; logsumexp and a subtraction are four (max, subtract, exp, sum):
    on a CPU this is 3-4x faster per chunk, and on a GPU it is fewer launches."""
    keep = t != IGNORE
    safe = torch.where(keep, t, torch.zeros_like(t)).unsqueeze(1)
    logp = torch.log_softmax(x, dim=-1, dtype=torch.float32)
    return _ChunkLoss(-(logp.gather(1, safe).squeeze(1) * keep).sum(), logp, safe, keep)


_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0", "AliasBackward0")


def _kept_by_producer(t: torch.Tensor) -> bool:
    """Whether the op that made `t` (through reshapes) saved its output for the backward (tanh, sigmoid, exp...)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEWS:
        fn = fn.next_functions[0][0]
    return fn is not None and hasattr(fn, "_saved_result")


# One chunk's fp32 temporary on an accelerator: 256 MB, i.e. 512 rows at a 128k vocabulary, 1,365 at 49k. A chunk
# costs about ten kernel launches whatever its size, so CPU-sized chunks (8-21 rows there) would make the loss
# thousands of tiny launches per micro-step; 256 MB is small beside the [tokens, vocab] gradient the loss keeps.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(*, device_type: str, vocab: int) -> int:
    """Rows of [tokens, vocab] logits the loss works on at a time, on a device of this type ("cpu", "cuda", ...).

    On a CPU a chunk's fp32 copy should stay in cache (~4 MB), and a loop iteration costs next to nothing. On a
    GPU (or any accelerator) each iteration is a handful of kernel launches, so chunks are made large. The logits'
    dtype does not enter: the working copy is fp32 whatever they are, and writing it back casts without a temporary.
    """
    elements = _CrossEntropySum.CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab))


class _CrossEntropySum(torch.autograd.Function):
    """Summed token cross-entropy whose gradient is worked out during the forward, a few rows at a time.

    F.cross_entropy keeps the [tokens, vocab] log-probabilities for the backward, and the backward then makes two
    more tensors of that size (the incoming gradient and the softmax), with the logits themselves still alive: about
    four vocabulary-sized tensors at the start of the backward, which is where FSDP and ZeRO-3 peak. Here only the
    gradient is kept (in the logits' dtype, so bf16 logits are never copied whole to fp32), and the caller can free
    the logits straight after the loss: one vocabulary-sized tensor instead of four, and none beyond the logits
    when the gradient is written over them (reuse_logits). Values are fp32 throughout.
    """

    CHUNK_ELEMENTS = 1 << 20  # on a CPU: rows per chunk such that one chunk's fp32 temporary stays ~4 MB

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, reuse_logits: bool = False) -> torch.Tensor:
        n, vocab = logits.shape
        # Each chunk is read into its own fp32 tensor before its rows are overwritten, so writing the gradient over
        # the logits is safe.
        grad = logits if reuse_logits else torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = chunk_rows(device_type=logits.device.type, vocab=vocab)
        for start in range(0, n, rows):
            c = _chunk_loss(logits[start:start + rows], targets[start:start + rows])
            total += c.loss
            # d(lse - x_t)/dx = softmax(x) - onehot(t); zero for ignored rows. The log-probabilities are the chunk's
            # own fp32 tensor, so they become the gradient in place.
            x = c.logp.exp_()
            x.scatter_add_(1, c.safe, torch.full_like(c.safe, -1, dtype=x.dtype))
            x.mul_(c.keep.unsqueeze(1))
            grad[start:start + rows] = x
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # The saved gradient is used once: scaled in place rather than copied.
        return grad.mul_(grad_output.to(grad.dtype)), None, None
