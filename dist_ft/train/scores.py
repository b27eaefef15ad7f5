"""Task metrics from counts and texts: classification from a confusion matrix, generated answers against references
(exact match, ROUGE through `rouge-score`, BLEU through `sacrebleu`; both work offline, no hub metric scripts).

Everything here is a pure function of numbers every rank can hold in full (a confusion matrix, the gathered
answers), so a sharded evaluation gives exactly the numbers of a one-process one.
"""

from __future__ import annotations

import re
import string

import torch

CLASSIFICATION_METRICS = ("accuracy", "f1", "confusion")
GENERATION_METRICS = ("exact_match", "rouge", "bleu")
METRICS = CLASSIFICATION_METRICS + GENERATION_METRICS
# Which way is better, for keep_best "auto" and sweeps.
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity", "eval_forgetting_loss", "eval_forgetting_delta")


def classification_metrics(confusion: torch.Tensor, label_names: list[str] | None = None,
                           detail: bool = False) -> dict:
    """Accuracy and macro F1 from a confusion matrix (rows: true class, columns: predicted). Classes absent from
    both the labels and the predictions are left out of the macro average. `detail`: also F1 per class (by
    name) and the matrix itself."""
    confusion = confusion.to(torch.float64)
    tp = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = (support + predicted) > 0
    out = {"eval_accuracy": float(tp.sum() / confusion.sum().clamp(min=1)),
           "eval_f1": float(f1[present].mean()) if present.any() else 0.0}
    if detail:
        names = label_names if label_names and len(label_names) == len(tp) else [str(i) for i in range(len(tp))]
        out["eval_f1_per_class"] = {n: round(float(v), 6) for n, v, p in zip(names, f1, present) if p}
        out["eval_confusion"] = confusion.to(torch.int64).tolist()
    return out


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """For exact match: lower case, punctuation dropped, whitespace collapsed (SQuAD's rule, without its English
    article removal, which would make the metric language-specific)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def generation_metrics(predictions: list[str], references: list[str], wanted: list[str] | tuple[str, ...]) -> dict:
    """Exact match (fraction), ROUGE-1/2/L F-measure (0-1, stemmed) and corpus BLEU (0-100, sacrebleu's default
    13a tokenization), over aligned lists."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(1, len(predictions))
    out: dict[str, float] = {"eval_generated": float(len(predictions))}
    if "exact_match" in wanted:
        out["eval_exact_match"] = sum(normalize_answer(p) == normalize_answer(r)
                                      for p, r in zip(predictions, references)) / n
    if "rouge" in wanted:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for p, r in zip(predictions, references):
            for key, score in scorer.score(r, p).items():
                sums[key] += score.fmeasure
        out.update({f"eval_{k}": v / n for k, v in sums.items()})
    if "bleu" in wanted:
        import sacrebleu

        out["eval_bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score) if predictions else 0.0
    return out


def better(metric: str, mode: str, new: float, old: float | None) -> bool:
    """Whether `new` beats `old` for `metric` ("auto": lower for losses, higher otherwise)."""
    if old is None:
        return True
    lower = metric in LOWER_IS_BETTER if mode == "auto" else mode == "min"
    return new < old - 1e-12 if lower else new > old + 1e-12
