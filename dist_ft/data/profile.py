"""`dist-ft data RECIPE.yaml`: what the recipe's data looks like before any training.

Sizes per source, fields of the records that the format does not read, what cleaning / dedup / balance do, token
lengths (a histogram PNG) and how many samples truncation, dropping and packing touch, the label distribution,
duplicates found (whether or not the recipe removes them), and a few rendered samples with the loss-bearing tokens
marked [[like this]]. Written to OUTPUT_DIR/data-report/ (report.md, report.json, lengths.png); the run directory
stays usable for training.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import Recipe, data_sources
from .batching import pack, unpair
from .dataset import _collect, _read_columns, _spec, _used_columns, tokenize_part
from .formats import IGNORE, Example
from .quality import QualityReport, exact_duplicates, ignored_fields, ignored_fix, near_duplicates, record_text
from .streaming import StreamingRows, _records, list_shards

STREAM_SAMPLE = 2000  # records of a stream looked at


def render(tok, ex: Example, limit: int = 400) -> str:
    """The sample's text with the tokens that carry a loss in [[...]]."""
    if ex.is_classification:
        return tok.decode(ex.input_ids.tolist(), skip_special_tokens=False)[:limit] + f"  -> label {int(ex.labels[0])}"
    if ex.seq2seq:  # the encoder's input, then the decoder's labels (all of them targets)
        text = (tok.decode(ex.input_ids.tolist(), skip_special_tokens=False) + "  -> [["
                + tok.decode(ex.labels.tolist(), skip_special_tokens=False) + "]]")
        return text if len(text) <= limit else text[:limit] + " ..."
    out, inside, buf = [], False, []

    def flush():
        if buf:
            text = tok.decode(buf, skip_special_tokens=False)
            out.append(f"[[{text}]]" if inside else text)
            buf.clear()

    for t, lab in zip(ex.input_ids.tolist(), ex.labels.tolist()):
        target = lab != IGNORE
        if target != inside:
            flush()
            inside = target
        buf.append(t)
    flush()
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + " ..."


def data_report(recipe: Recipe, tok, out_dir: Path, log=print) -> dict:
    d = recipe.data
    out_dir.mkdir(parents=True, exist_ok=True)
    rep: dict = {"sources": [], "max_length": d.max_length}
    examples: list[Example] = []
    if d.streaming:
        shards = list_shards(d.train)
        stream = StreamingRows(d.train, tok, _spec(recipe, d.format, d.columns), rank=0, world_size=1,
                               packing=False)
        examples = stream.take(STREAM_SAMPLE)
        st = stream.stats
        rep["sources"].append({"name": d.train, "shards": len(shards),
                               "bytes": sum(p.stat().st_size for p in shards),
                               "looked_at": st.records, "kept": st.kept, "truncated": st.truncated,
                               "dropped": st.records - st.kept})
        records_for_dups: list[tuple[dict, list[str]]] = []
        parts = []
        # The fields a stream's records carry, counted over the first shard's first records.
        sample = list(itertools.islice(_records(shards[0]), STREAM_SAMPLE))
        fields = ignored_fields(sample, _read_columns(d.format, d.columns))
        quality = QualityReport()
        if fields:
            quality.ignored[f"{shards[0]}, first {len(sample)} records,"] = {
                "format": d.format, "records": len(sample), "fields": fields,
                "fix": ignored_fix(d.format, list(fields))}
        rep["quality"] = quality.lines()
        rep["ignored_fields"] = quality.ignored
    else:
        parts, _, quality = _collect(recipe, lambda m: None)
        rep["quality"] = quality.lines()
        rep["ignored_fields"] = quality.ignored
        label_names, num_labels = [], recipe.model.num_labels
        records_for_dups = []
        for p in parts:
            if p.fmt == "classification":
                from .dataset import _label_names
                label_names, num_labels = _label_names([r for q in parts for r in q.train], d.columns.label,
                                                       recipe.model.num_labels)
            ex, st = tokenize_part(tok, p.train, _spec(recipe, p.fmt, p.columns, label_names, num_labels), p.name)
            examples += ex
            cols = _used_columns(p.fmt, p.columns)
            records_for_dups += [(r, cols) for r in p.train]
            rep["sources"].append({"name": p.name, "format": p.fmt, "train_records": len(p.train),
                                   "eval_records": len(p.eval), "kept": st.kept, "truncated": st.truncated,
                                   "dropped": st.records - st.kept,
                                   "weight": next(s.weight for s in data_sources(d) if s.name == p.name)})
        if label_names:
            counts = Counter(int(e.labels[0]) for e in examples if e.is_classification)
            rep["labels"] = {label_names[k] if k < len(label_names) else str(k): v
                             for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    if examples and examples[0].desirable >= 0:  # KTO: each example's own sequence (its mismatched one is KL's)
        rep["unpaired"] = _unpaired_counts(examples, d.max_length)
        examples = [unpair([e])[0] for e in examples]
    elif examples and examples[0].split:  # preference pairs: each side's length, and packing does not apply
        rep["pairs"] = _pair_lengths(examples, d.max_length)
        examples = [side for e in examples for side in unpair([e])]
    lengths = np.asarray([len(e.input_ids) for e in examples])
    if len(lengths):
        rep["tokens"] = {"samples": int(len(lengths)), "mean": float(lengths.mean()),
                         "p50": int(np.percentile(lengths, 50)), "p95": int(np.percentile(lengths, 95)),
                         "max": int(lengths.max()), "at_max_length": int((lengths >= d.max_length).sum())}
        if not (examples[0].is_classification or examples[0].seq2seq) and "pairs" not in rep \
                and "unpaired" not in rep:
            rows = pack(examples, d.max_length, d.packing_strategy)
            rep["packing"] = {"rows": len(rows), "samples_per_row": round(len(examples) / max(1, len(rows)), 2),
                              "fill": round(float(lengths.sum()) / (len(rows) * d.max_length), 3),
                              "padding_without_packing": round(1 - float(lengths.mean()) / lengths.max(), 3)}
    if records_for_dups:
        texts = [{"t": record_text(r, cols)} for r, cols in records_for_dups]
        exact = exact_duplicates(texts, ["t"])
        rep["duplicates"] = {"exact": len(exact), "removed_by_recipe": d.dedup != "none"}
        if len(texts) <= 50_000:  # near-duplicate search is quadratic-ish in the worst case
            rep["duplicates"]["near"] = len(near_duplicates(texts, ["t"], d.near_threshold))
    rep["examples"] = [render(tok, e) for e in examples[:3]]
    _histogram(lengths, d.max_length, out_dir / "lengths.png", log)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    (out_dir / "report.md").write_text(_markdown(rep))
    return rep


def _pair_lengths(pairs: list[Example], max_length: int) -> dict:
    """Tokens of chosen and rejected sequences, and how many pairs reach max_length on either side (truncated)."""
    out: dict = {"pairs": len(pairs)}
    for side, lens in (("chosen", np.asarray([e.split for e in pairs])),
                       ("rejected", np.asarray([len(e.input_ids) - e.split for e in pairs]))):
        out[side] = {"mean": float(lens.mean()), "p95": int(np.percentile(lens, 95)), "max": int(lens.max())}
    out["at_max_length"] = int(sum(max(e.split, len(e.input_ids) - e.split) >= max_length for e in pairs))
    return out


def _unpaired_counts(examples: list[Example], max_length: int) -> dict:
    """How many answers are desirable, and how many sequences reach max_length (truncated)."""
    good = sum(e.desirable == 1 for e in examples)
    return {"examples": len(examples), "desirable": good, "undesirable": len(examples) - good,
            "at_max_length": int(sum(e.split >= max_length for e in examples))}


def _histogram(lengths: np.ndarray, max_length: int, path: Path, log) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[data] matplotlib is not installed: no histogram (pip install 'dist-ft[plots]')")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=50)
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(rep: dict) -> str:
    lines = ["# Data report", "", "| source | records | kept | truncated | dropped |", "|---|---:|---:|---:|---:|"]
    for s in rep["sources"]:
        lines.append(f"| {s['name']} | {s.get('train_records', s.get('looked_at'))} | {s['kept']} | "
                     f"{s['truncated']} | {s['dropped']} |")
    for line in rep.get("quality", []):
        lines.append(f"\n- {line}")
    if "tokens" in rep:
        t = rep["tokens"]
        lines += ["", f"Tokens per sample: mean {t['mean']:.1f}, median {t['p50']}, p95 {t['p95']}, max {t['max']}; "
                      f"{t['at_max_length']} at max_length {rep['max_length']}. ![lengths](lengths.png)"]
    if "pairs" in rep:
        p = rep["pairs"]
        lines.append(f"Preference pairs: {p['pairs']}; chosen sequences {p['chosen']['mean']:.1f} tokens on average "
                     f"(p95 {p['chosen']['p95']}, max {p['chosen']['max']}), rejected {p['rejected']['mean']:.1f} "
                     f"(p95 {p['rejected']['p95']}, max {p['rejected']['max']}); {p['at_max_length']} pair(s) reach "
                     f"max_length on a side (truncated there).")
    if "unpaired" in rep:
        u = rep["unpaired"]
        lines.append(f"Unpaired preference examples: {u['examples']}, {u['desirable']} desirable and "
                     f"{u['undesirable']} not; {u['at_max_length']} reach max_length (truncated there).")
    if "packing" in rep:
        p = rep["packing"]
        lines.append(f"Packing: {p['rows']} rows, {p['samples_per_row']} samples per row, {p['fill']:.0%} full "
                     f"(without packing {p['padding_without_packing']:.0%} of a batch would be padding).")
    if "labels" in rep:
        lines += ["", "| label | samples |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rep["labels"].items()]
    if "duplicates" in rep:
        dup = rep["duplicates"]
        lines.append(f"\nDuplicates: {dup['exact']} exact" + (f", {dup['near']} near" if "near" in dup else "")
                     + (" (the recipe removes them)" if dup["removed_by_recipe"] else " (kept: set data.dedup)"))
    lines += ["", "Samples (loss-bearing tokens in [[...]]):", ""]
    lines += [f"```\n{e}\n```" for e in rep["examples"]]
    return "\n".join(lines) + "\n"
