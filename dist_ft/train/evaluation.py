"""Held-out evaluation, sharded across ranks and reduced exactly: loss and perplexity, classification metrics, and
answers generated for the prompts of instruction or chat data, scored against their references.

Rank r evaluates examples r, r+W, r+2W, ... Every rank runs the same number of forward passes (a sharded model
needs every rank in every forward), padding its last batch with zero-weight repeats. Sums and counts (and, for
classification, the confusion matrix) are all-reduced, so the result equals a one-process evaluation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from ..data.batching import collate
from ..data.formats import IGNORE, Example
from .loss import forward_logits, loss_sum
from .scores import classification_metrics, generation_metrics


def _reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu()


@torch.no_grad()
def evaluate(strategy, examples: list[Example], *, micro_batch: int, pad_id: int, num_labels: int | None = None,
             label_names: list[str] | None = None, detail: bool = False) -> dict:
    topo = strategy.topo
    mine = examples[topo.rank::topo.world_size]
    per_rank = math.ceil(len(examples) / topo.world_size)
    n_batches = math.ceil(per_rank / micro_batch) if per_rank else 0
    classification = bool(examples) and examples[0].is_classification
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, target count
    confusion = torch.zeros((num_labels or 1, num_labels or 1), dtype=torch.float64)
    was_training = strategy.model.training
    strategy.train(False)
    for b in range(n_batches):
        chunk = mine[b * micro_batch:(b + 1) * micro_batch]
        real = len(chunk)
        if real == 0:  # this rank ran out: a dummy forward keeps sharded collectives in step, then is discarded
            chunk = [examples[0]]
        batch = {k: v.to(topo.device) for k, v in collate(chunk, pad_id).items()}
        with strategy.forward_context():
            logits, targets = forward_logits(strategy.model, batch)
        if real:
            # Chunk-wise (losses.loss_sum under no_grad): no fp32 copy of the [tokens, vocab] logits is made.
            total[0] += float(loss_sum(logits, targets))
            if classification:
                total[1] += real
                preds = logits.argmax(-1).cpu()
                for t, p in zip(batch["labels"].cpu().tolist(), preds.tolist()):
                    confusion[t, p] += 1
            else:
                total[1] += int((targets != IGNORE).sum())
        # Freed before the next forward, as the training step frees them: else two batches' logits live at once.
        del logits, targets
    strategy.train(was_training)
    total = _reduce(total, topo.device)
    out = {"eval_loss": float(total[0] / max(total[1], 1))}
    out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    if classification:
        confusion = _reduce(confusion, topo.device)
        out.update(classification_metrics(confusion, label_names, detail))
    return out


def prompt_and_reference(example: Example) -> tuple[np.ndarray, np.ndarray] | None:
    """The prompt (tokens before the first loss-bearing token) and the reference answer (the first contiguous run
    of loss-bearing tokens) of an instruction or chat example; None for one without a prompt. An encoder-decoder's
    example: its encoder input and its labels."""
    if example.seq2seq:
        return example.input_ids, example.labels
    target = np.flatnonzero(example.labels != IGNORE)
    if len(target) == 0 or target[0] == 0:
        return None
    start = int(target[0])
    end = start
    while end < len(example.labels) and example.labels[end] != IGNORE:
        end += 1
    return example.input_ids[:start], example.input_ids[start:end]


@torch.no_grad()
def generate_answers(strategy, examples: list[Example], tok, *, max_new_tokens: int, do_sample: bool,
                     temperature: float, top_p: float, sample_size: int | None, seed: int) -> tuple[list[str], list[str]]:
    """Answers to the first `sample_size` prompts, generated across ranks, returned in order on every rank.

    One prompt at a time, each with its own seed: the text does not depend on how many ranks share the work.
    Every rank runs the same number of generations of exactly max_new_tokens (EOS does not stop it; the answer is
    cut there afterwards), because a sharded model (FSDP2, ZeRO-3) needs every rank in every forward.
    """
    topo = strategy.topo
    pairs = [pr for pr in (prompt_and_reference(e) for e in examples) if pr is not None][:sample_size]
    mine = list(range(topo.rank, len(pairs), topo.world_size))
    rounds = math.ceil(len(pairs) / topo.world_size) if pairs else 0
    model = strategy.unwrap()
    was_training = model.training
    strategy.train(False)
    answers: list[tuple[int, str]] = []
    eos = tok.eos_token_id
    # An encoder-decoder's output is the decoder's sequence alone: its start token, then the answer.
    skip = 1 if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else None
    with torch.random.fork_rng(devices=[topo.device] if topo.device.type == "cuda" else []):
        for r in range(rounds):
            index = mine[r] if r < len(mine) else None
            prompt = pairs[index if index is not None else 0][0]
            torch.manual_seed(seed + (index or 0))
            ids = torch.as_tensor(prompt, dtype=torch.long, device=topo.device)[None]
            kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else \
                {"do_sample": False}
            with strategy.forward_context():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     eos_token_id=None, pad_token_id=tok.pad_token_id, **kwargs)
            if index is None:
                continue  # a dummy round that kept this rank in step with the others
            new = out[0, skip if skip is not None else ids.shape[1]:].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            answers.append((index, tok.decode(new, skip_special_tokens=True).strip()))
    strategy.train(was_training)
    gathered = [answers]
    if dist.is_initialized() and topo.world_size > 1:
        gathered = [None] * topo.world_size
        dist.all_gather_object(gathered, answers)
    predictions = [text for _, text in sorted(a for part in gathered for a in part)]
    references = [tok.decode(ref.tolist(), skip_special_tokens=True).strip() for _, ref in pairs]
    return predictions, references


def generated_metrics(strategy, examples: list[Example], tok, wanted: list[str], gen) -> tuple[dict, list[dict]]:
    """generation_metrics over answers from `generate_answers`, and the answers with their references."""
    preds, refs = generate_answers(strategy, examples, tok, max_new_tokens=gen.max_new_tokens,
                                   do_sample=gen.do_sample, temperature=gen.temperature, top_p=gen.top_p,
                                   sample_size=gen.sample_size, seed=gen.seed)
    answers = [{"answer": p, "reference": r} for p, r in zip(preds, refs)]
    return generation_metrics(preds, refs, wanted), answers


class RunEvaluator:
    """One evaluation of a run, as the recipe asks for it: loss and perplexity on the held-out data, its listed
    metrics, answers generated and scored, and the loss on eval.forgetting's general text against `baseline`
    (the evaluation before training)."""

    def __init__(self, recipe, strategy, data, tok, forgetting: list[Example], objective=None):
        self.recipe, self.strategy, self.data, self.tok, self.forgetting = recipe, strategy, data, tok, forgetting
        # A preference objective evaluates its own loss and rewards on held-out pairs (objective.py).
        self.pairs = objective if hasattr(objective, "evaluate") else None
        wanted = recipe.eval.metrics
        self.detail = "f1" in wanted or "confusion" in wanted
        self.generated = [m for m in wanted if m in ("exact_match", "rouge", "bleu")]

    def __call__(self, baseline: dict | None) -> tuple[dict, list[dict]]:
        r, data = self.recipe, self.data
        res: dict = {}
        samples: list[dict] = []
        if data.eval and self.pairs is not None:
            res = self.pairs.evaluate(self.strategy, data.eval, micro_batch=r.training.micro_batch_size,
                                      pad_id=data.pad_token_id)
            for i, (name, part) in enumerate(data.eval_by_source().items()):
                if part:
                    res[f"eval_loss/{name}"] = self.pairs.evaluate(
                        self.strategy, part, micro_batch=r.training.micro_batch_size, pad_id=data.pad_token_id,
                        indices=np.flatnonzero(data.eval_source == i))["eval_loss"]
        elif data.eval:
            classification = r.data.format == "classification"
            res = evaluate(self.strategy, data.eval, micro_batch=r.training.micro_batch_size,
                           pad_id=data.pad_token_id, num_labels=data.num_labels if classification else None,
                           label_names=data.label_names, detail=self.detail)
            if "confusion" not in r.eval.metrics:
                res.pop("eval_confusion", None)
            if "f1" not in r.eval.metrics:
                res.pop("eval_f1_per_class", None)
            for name, part in data.eval_by_source().items():  # a mixture: each source's own held-out loss
                if part:
                    res[f"eval_loss/{name}"] = evaluate(self.strategy, part, micro_batch=r.training.micro_batch_size,
                                                        pad_id=data.pad_token_id,
                                                        num_labels=data.num_labels if classification else None
                                                        )["eval_loss"]
            if self.generated:
                scores, samples = generated_metrics(self.strategy, data.eval, self.tok, self.generated,
                                                    r.eval.generation)
                res.update(scores)
        if self.forgetting:
            loss = evaluate(self.strategy, self.forgetting, micro_batch=r.training.micro_batch_size,
                            pad_id=data.pad_token_id)["eval_loss"]
            base = (baseline or {}).get("eval_forgetting_loss", loss)
            res.update({"eval_forgetting_loss": loss, "eval_forgetting_delta": loss - base})
        return res, samples
