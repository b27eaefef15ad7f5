"""The output head and the cross-entropy fused (training.fused_loss): the head's matmul and the loss computed over
chunks of target rows, forward and backward, so that neither the [targets, vocab] logits nor their gradient ever
exist whole (the idea of Liger Kernel's fused linear cross-entropy and of Cut Cross-Entropy).

On a 128k-256k vocabulary (Llama-3, Qwen, Gemma) and long sequences those logits are the largest tensor of the step,
even with the head run at target positions only (loss.forward_logits). Here one chunk's logits exist at a time; the
gradients for the head's input (and, when the head trains, its weight) are accumulated chunk by chunk during the
forward and handed to autograd in the backward, scaled by the incoming gradient.

The computation runs inside the head module's own forward: FSDP2 and ZeRO-3 gather a module's parameters around
its forward (and reduce its gradients after its backward), so reading `head.weight` anywhere else would see a shard.
The head's forward is replaced once by one that, while targets are set for it (`head_loss`), returns the summed
loss instead of the logits; the model's own forward is left to run as written, so only models that return the head's
output unchanged can fuse (`why_not_fusable`).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from ..data.formats import IGNORE
from .loss import _chunk_loss, _unwrapped, attention_implementation, attention_inputs

# A chunk's fp32 logits: ~16 MB on a CPU (large enough for the matmuls to run near peak, small beside the logits the
# fusion removes), ~64 MB on an accelerator (130 rows at a 128k vocabulary: matmuls that fill a GPU, a few dozen
# chunks for a 4k-token micro-batch, as Liger's chunking gives).
CPU_CHUNK_ELEMENTS = 1 << 22
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24

# Config fields of architectures that transform the head's output before returning it (Gemma-2/3's soft-cap,
# Cohere's logit_scale, Granite's logits_scaling): a loss returned in place of the logits would be transformed too.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_rows(*, device_type: str, vocab: int) -> int:
    elements = CPU_CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab))


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM's output head under a backend's wrapper and peft."""
    inner = _unwrapped(model)
    if getattr(inner, "active_peft_config", None) is not None:
        inner = inner.get_base_model()
    return inner.get_output_embeddings()


def why_not_fusable(model: torch.nn.Module) -> str | None:
    """Why this model's head cannot be fused (None: it can). Checked once, when the model is built."""
    inner = _unwrapped(model)
    peft_config = getattr(inner, "active_peft_config", None)
    if peft_config is not None:
        if peft_config.is_prompt_learning:
            return "prompt and prefix tuning shift the positions the fused head is given"
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    for field in LOGIT_TRANSFORMS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            return f"{type(inner).__name__} transforms its logits after the head ({field})"
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear and not type(head).__name__.startswith("FSDPLinear"):
        return (f"its output head is a {type(head).__name__}, not a plain Linear (an adapted head: LoRA or "
                "modules_to_save on lm_head)")
    return None


def _fused_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    targets = self._dist_ft_targets
    fn = LinearCrossEntropyRows if getattr(self, "_dist_ft_per_row", False) else LinearCrossEntropySum
    if targets is None:
        return F.linear(hidden, self.weight, self.bias)
    hidden = hidden.reshape(-1, hidden.size(-1))
    device = hidden.device.type
    rows = chunk_rows(device_type=device, vocab=self.weight.size(0))
    # Under autocast (bf16-mixed) the head runs in the autocast dtype: the weight is cast once here (autograd takes
    # its gradient back to the fp32 weight) rather than by autocast in every chunk's matmul.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with torch.autocast(device, enabled=False):
        weight, bias = self.weight, self.bias
        if dtype is not None:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return fn.apply(hidden, weight, bias, targets, rows)


@contextlib.contextmanager
def head_loss(model: torch.nn.Module, targets: torch.Tensor, *, per_row: bool = False):
    """While open, the model's forward returns (as its `logits`) the summed cross-entropy of its head's output rows
    against `targets` (one per row the head is given; loss.IGNORE rows count nothing), or with `per_row` each row's
    cross-entropy ([rows])."""
    head = output_head(model)
    if not isinstance(getattr(head, "forward", None), types.MethodType) or head.forward.__func__ is not _fused_forward:
        head._dist_ft_targets = None
        head.forward = types.MethodType(_fused_forward, head)
    head._dist_ft_targets, head._dist_ft_per_row = targets, per_row
    try:
        yield
    finally:
        head._dist_ft_targets, head._dist_ft_per_row = None, False


def fused_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                  per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's forward with its head fused to the cross-entropy, over the positions whose next token is a
    target: (the summed loss, or with `per_row` each target's loss; those targets, in order)."""
    batch = attention_inputs(batch, attn_implementation=attention_implementation(model))
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    keep = targets != IGNORE
    with head_loss(model, targets[keep], per_row=per_row):
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=keep).logits
    return out, targets[keep]


def _row_pass(hidden, weight, bias, targets, rows: int, *, need_h: bool, need_lse: bool, per_row: bool):
    """Pass 1, over chunks of rows: the loss (summed, or per row), each row's log-sum-exp, and the input's gradient
    per unit of each row's loss, (softmax - onehot) @ weight."""
    n = hidden.size(0)
    losses = torch.zeros(n if per_row else (), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device) if need_lse else None
    for start in range(0, n, rows):
        x = F.linear(hidden[start:start + rows], weight, bias)
        t = targets[start:start + rows]
        c = _chunk_loss(x, t)
        if per_row:
            losses[start:start + rows] = -(c.logp.gather(1, c.safe).squeeze(1) * c.keep)
        else:
            losses += c.loss
        if lse is not None:  # log-sum-exp = x - log p, read at any column
            lse[start:start + rows] = x[:, 0].float() - c.logp[:, 0]
        if need_h:
            # d(lse - x_t)/dx = softmax(x) - onehot(t), zero on ignored rows: made in place of the log-probs
            g = c.logp.exp_()
            g.scatter_add_(1, c.safe, torch.full_like(c.safe, -1, dtype=g.dtype))
            g.mul_(c.keep.unsqueeze(1))
            torch.matmul(g.to(weight.dtype), weight, out=grad_h[start:start + rows])
    return losses, grad_h, lse


def _weight_pass(hidden, weight, bias, targets, lse, rows: int, *, need_w: bool, need_b: bool,
                 row_scale: torch.Tensor | None = None):
    """Pass 2, over chunks of vocabulary columns: those columns' logits for every row again, and the weight's (and
    bias's) gradient for those columns in one matmul over all rows; each row's share scaled by `row_scale`."""
    n, vocab = hidden.size(0), weight.size(0)
    keep = (targets != IGNORE).unsqueeze(1)
    scale = keep if row_scale is None else keep * row_scale.float().unsqueeze(1)
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    cols = max(1, rows * vocab // max(n, 1))  # the same number of logits per chunk as pass 1
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        x = F.linear(hidden, weight[v0:v1], bias[v0:v1] if bias is not None else None)
        g = x.float().sub_(lse.unsqueeze(1)).exp_()
        hit = (targets >= v0) & (targets < v1)
        g[hit.nonzero().squeeze(1), targets[hit] - v0] -= 1.0
        g.mul_(scale)
        if need_b:
            grad_b[v0:v1] = g.sum(0)
        if need_w:
            torch.matmul(g.t().to(weight.dtype), hidden, out=grad_w[v0:v1])
    return grad_w, grad_b


class LinearCrossEntropySum(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias, targets), with its gradients worked out in the forward, in two
    passes that each hold one chunk of logits:

    1. over chunks of rows: the loss, each row's log-sum-exp, and the input's gradient (softmax - onehot) @ weight;
    2. only when the head trains, over chunks of vocabulary columns: those columns' logits for every row again, and
       the weight's (and bias's) gradient for those columns in one matmul over all rows.

    Pass 2 recomputes the logits (a third more of the head's FLOPs) so that each row block of the weight's gradient
    is written once, by one matmul with its own accumulation: accumulating a [vocab, hidden] gradient over row
    chunks instead re-reads and re-writes the whole of it per chunk (2.4x slower than unfused on a CPU, measured).
    Values are fp32 (each chunk's logits are read into fp32); the gradient matmuls run in the head's dtype, as
    autograd's would."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total, grad_h, lse = _row_pass(hidden, weight, bias, targets, rows, need_h=need_h,
                                       need_lse=need_w or need_b, per_row=False)
        grad_w = grad_b = None
        if need_w or need_b:
            grad_w, grad_b = _weight_pass(hidden, weight, bias, targets, lse, rows, need_w=need_w, need_b=need_b)
        ctx.grads = (grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.grads
        ctx.grads = None  # used once: scaled in place
        return (*(g.mul_(grad_output.to(g.dtype)) if g is not None else None for g in grads), None, None)


class LinearCrossEntropyRows(torch.autograd.Function):
    """CE(hidden @ weight.T + bias, targets) of each row (0 where the target is IGNORE), for objectives that weigh
    rows unequally: the preference losses, through each sequence's summed log-probabilities. Pass 1 as above, keeping
    the input's gradient per unit of each row's loss (scaled by the row's incoming gradient in the backward); pass 2,
    the head's own gradient when it trains, runs in the backward, where each row's weight is known."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        losses, grad_h, lse = _row_pass(hidden, weight, bias, targets, rows, need_h=need_h,
                                        need_lse=need_w or need_b, per_row=True)
        ctx.grad_h, ctx.rows = grad_h, rows
        if need_w or need_b:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h, ctx.grad_h = ctx.grad_h, None  # used once: scaled in place
        if grad_h is not None:
            grad_h.mul_(grad_output.to(grad_h.dtype).unsqueeze(1))
        grad_w = grad_b = None
        if need_w or need_b:
            hidden, weight, bias, targets, lse = ctx.saved_tensors
            grad_w, grad_b = _weight_pass(hidden, weight, bias, targets, lse, ctx.rows, need_w=need_w,
                                          need_b=need_b, row_scale=grad_output)
        return grad_h, grad_w, grad_b, None, None
