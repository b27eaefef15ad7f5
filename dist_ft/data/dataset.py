"""Prepare the tokenized train and eval sets once, cached on disk keyed by the data, the format and the tokenizer.

Preparation runs in every rank *before* the process group exists: the first rank to take the cache's file lock
tokenizes and writes the cache atomically, the others wait on the lock (not on a collective, so a long
tokenization can never trip a collective's timeout) and then read it. The cache holds numpy arrays only
(`allow_pickle=False`), one `.npy` file per column, from which every rank reads each example when it needs it
(table.py): the ranks of a node share the tokens in the page cache, and each holds only offsets in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..assets import cache_root, file_lock
from ..config import Recipe, data_sources, eval_sources, source_format
from .formats import Example, FormatSpec, FormatStats, int_label, tokenize_records
from .quality import QualityReport, balance, clean, dedup, ignored_fields, ignored_fix, record_text
from .seq2seq import tokenize_seq2seq
from .sources import DataError, resolve_source
from .table import ExampleTable

CACHE_VERSION = "8"  # 8: a seq2seq column (encoder-decoder examples); 7: a desirable column (KTO); 6: a split column (preference pairs); 5: a conversation opening with an assistant turn no longer trains on its header


@dataclass
class PreparedData:
    train: ExampleTable
    eval: ExampleTable
    train_stats: FormatStats
    eval_stats: FormatStats
    label_names: list[str]
    num_labels: int | None
    cache_dir: Path | None = None
    source_names: list[str] = dataclasses.field(default_factory=lambda: ["train"])
    weights: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    train_source: np.ndarray | None = None  # which source each training example came from (mixtures)
    eval_source: np.ndarray | None = None  # and each held-out one (None: one eval set)
    class_weights: list[float] | None = None  # data.balance: class_weights, per label index
    report: list[str] = dataclasses.field(default_factory=list)  # what cleaning, dedup and balance did
    eval_names: list[str] = dataclasses.field(default_factory=list)  # the groups eval_source numbers
    pad_token_id: int | None = None  # the tokenizer's, kept so that a run from the cache need not load it

    def train_by_source(self) -> list[ExampleTable]:
        if self.train_source is None:
            return [self.train]
        return [self.train.select(np.flatnonzero(self.train_source == i)) for i in range(len(self.source_names))]

    def eval_by_source(self) -> dict[str, ExampleTable]:
        names = self.eval_names or self.source_names
        if self.eval_source is None or len(names) < 2:
            return {}
        return {name: self.eval.select(np.flatnonzero(self.eval_source == i)) for i, name in enumerate(names)}


def tokenizer_fingerprint(tok) -> str:
    from ..model import LazyTokenizer
    if isinstance(tok, LazyTokenizer):  # its files, without loading it
        return tok.fingerprint()
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(repr((tok.bos_token_id, tok.eos_token_id, getattr(tok, "chat_template", None))).encode())
    return h.hexdigest()[:16]


def _label_names(records: list[dict], column: str, num_labels: int | None) -> tuple[list[str], int | None]:
    values = [r.get(column) for r in records if column in r]
    if values and all(isinstance(v, str) and int_label(v) is None for v in values):
        names = sorted(set(values))
        if num_labels is not None and num_labels != len(names):
            raise DataError(f"model.num_labels is {num_labels} but the training data has {len(names)} class names; "
                            f"set model.num_labels: {len(names)} (or leave it unset)")
        return names, len(names)
    ints = [i for i in map(int_label, values) if i is not None]
    if num_labels is None and ints:
        num_labels = max(ints) + 1
    return [str(i) for i in range(num_labels or 0)], num_labels


def _spec(recipe: Recipe, fmt: str, columns, label_names=None, num_labels=None) -> FormatSpec:
    d = recipe.data
    sg = d.sharegpt
    roles = {name: role for role in ("user", "assistant", "system") for name in getattr(sg, role)}
    return FormatSpec(format=fmt, max_length=d.max_length, too_long=d.too_long, columns=dataclasses.asdict(columns),
                      system_prompt=d.system_prompt, use_chat_template=d.use_chat_template,
                      label_names=label_names or [], num_labels=num_labels, sharegpt_roles=roles,
                      sharegpt_keys=(sg.role_key, sg.content_key), seq2seq=recipe.model.task == "seq2seq_lm")


def _used_columns(fmt: str, columns) -> list[str]:
    """The columns whose text cleaning and dedup look at."""
    return {"text": [columns.text], "instruction": [columns.prompt, columns.response],
            "alpaca": [columns.instruction, columns.input, columns.output],
            "chat": [columns.messages], "sharegpt": [columns.conversations],
            "classification": [columns.text],
            "preference": [columns.prompt, columns.chosen, columns.rejected],
            "unpaired_preference": [columns.prompt, columns.completion]}[fmt]


def _read_columns(fmt: str, columns) -> list[str]:
    """Every column the format reads; the others are reported as ignored."""
    labelled = fmt in ("classification", "unpaired_preference")
    return _used_columns(fmt, columns) + ([columns.label] if labelled else [])


@dataclass
class _Part:
    """One source's records on their way to tokens."""
    name: str
    fmt: str
    columns: object
    train: list[dict]
    eval: list[dict]


def _collect(recipe: Recipe, log) -> tuple[list[_Part], list[dict] | None, str | None, QualityReport]:
    """Every source loaded, cleaned, shuffled (seeded) and split; then dedup and balance over the training part."""
    d = recipe.data
    report = QualityReport()
    parts = []
    for i, src in enumerate([] if d.streaming else data_sources(d)):  # a stream is read while training
        fmt, columns = source_format(d, src), src.columns or d.columns
        source = resolve_source(src.path)
        records = source.load()
        _note_ignored(report, src, fmt, columns, records)
        used = _used_columns(fmt, columns)
        c = d.clean
        if c.strip or c.normalize_unicode or c.drop_empty or c.max_chars:
            records, counts = clean(records, used, strip=c.strip, normalize_unicode=c.normalize_unicode,
                                    drop_empty=c.drop_empty, max_chars=c.max_chars)
            for k, v in counts.items():
                report.cleaned[k] = report.cleaned.get(k, 0) + v
        if d.shuffle:
            # Shuffle before the hold-out split so that held-out records are not one file's tail.
            random.Random(recipe.seed if i == 0 else recipe.seed * 1000003 + i).shuffle(records)
        eval_records: list[dict] = []
        if d.eval is None:
            n_eval = int(round(len(records) * d.eval_fraction))
            if d.eval_fraction > 0 and n_eval == 0:
                n_eval = 1
            if n_eval >= len(records):
                raise DataError(f"{src.path}: {len(records)} record(s) are too few to hold out data.eval_fraction="
                                f"{d.eval_fraction}; add data or set data.eval")
            eval_records, records = records[:n_eval], records[n_eval:]
        if d.max_train_samples:
            records = records[: d.max_train_samples]
        parts.append(_Part(src.name, fmt, columns, records, eval_records))
    if d.dedup != "none":
        tagged = [(p, r) for p in parts for r in p.train]
        key_cols = ["__dedup_text"]
        keyed = [{"__dedup_text": record_text(r, _used_columns(p.fmt, p.columns))} for p, r in tagged]
        kept_rows, counts = dedup(keyed, key_cols, d.dedup, d.near_threshold)
        kept_ids = {id(k) for k in kept_rows}
        for p in parts:
            p.train = []
        for (p, r), k in zip(tagged, keyed):
            if id(k) in kept_ids:
                p.train.append(r)
        report.duplicates = counts
    if d.balance != "none":
        label = d.columns.label
        for p in parts:
            p.train, b = balance(p.train, p.columns.label if p.columns else label, d.balance, recipe.seed)
            if b:
                report.balance = b if not report.balance else _merge_balance(report.balance, b)
    evals = None  # data.eval's own sources, when it is set
    if d.eval is not None:
        evals = []
        for src in eval_sources(d):
            records = resolve_source(src.path).load()
            _note_ignored(report, src, source_format(d, src), src.columns or d.columns, records, " (data.eval)")
            evals.append(_Part(src.name, source_format(d, src), src.columns or d.columns, [],
                               records[: d.max_eval_samples] if d.max_eval_samples else records))
    elif d.max_eval_samples:
        for p in parts:
            p.eval = p.eval[: d.max_eval_samples]
    return parts, evals, report


def _note_ignored(report: QualityReport, src, fmt: str, columns, records: list[dict], tag: str = "") -> None:
    """Count the fields of a source's records that its format does not read (a mapping must never drop a field
    unseen). Built-in sources carry other renderings of the same data by design, so they are not counted."""
    if src.path.startswith("builtin:"):
        return
    fields = ignored_fields(records, _read_columns(fmt, columns))
    if fields:
        report.ignored[src.name + tag] = {"format": fmt, "records": len(records), "fields": fields,
                                          "fix": ignored_fix(fmt, list(fields))}


def _stream_fingerprint(spec: str) -> list:
    from .streaming import list_shards
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in list_shards(spec)]


def _merge_balance(a: dict, b: dict) -> dict:
    add = lambda x, y: {k: x.get(k, 0) + y.get(k, 0) for k in sorted(set(x) | set(y))}  # noqa: E731
    return {**a, "before": add(a["before"], b["before"]), "after": add(a["after"], b["after"])}


def cache_key(recipe: Recipe, tok) -> str:
    d = recipe.data
    parts = {
        "version": CACHE_VERSION,
        "train": _stream_fingerprint(d.train) if d.streaming else [resolve_source(s.path).fingerprint
                                                                   for s in data_sources(d)],
        "eval": [resolve_source(s.path).fingerprint for s in eval_sources(d)],
        "data": {k: v for k, v in dataclasses.asdict(d).items()
                 if k not in ("packing", "packing_strategy")},  # packing happens at load
        "seed": recipe.seed,
        "num_labels": recipe.model.num_labels,
        "task": recipe.model.task,  # the same records give other examples to an encoder-decoder
        "tokenizer": tokenizer_fingerprint(tok),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def prepare_data(recipe: Recipe, tok, *, use_cache: bool = True, log=print) -> PreparedData:
    """Tokenized train/eval examples for the recipe, from the cache when it already holds them."""
    key = cache_key(recipe, tok)
    folder = cache_root() / "data" / key
    if use_cache and (folder / "meta.json").exists():
        return _read_cache(folder, tok)
    with file_lock(folder.with_suffix(".lock")):
        if use_cache and (folder / "meta.json").exists():
            return _read_cache(folder, tok)
        prepared = _tokenize(recipe, tok, log)
        if use_cache:
            _write_cache(folder, prepared, tok)
            return _read_cache(folder, tok)  # as every later run reads it; the lists built here are let go
    return prepared


def tokenize_part(tok, records: list[dict], spec: FormatSpec, source: str) -> tuple[list[Example], FormatStats]:
    """A source's records as examples: an encoder-decoder's (seq2seq.py) or everyone else's (formats.py)."""
    return (tokenize_seq2seq if spec.seq2seq else tokenize_records)(tok, records, spec, source)


def _tokenize(recipe: Recipe, tok, log) -> PreparedData:
    d = recipe.data
    parts, eval_parts, report = _collect(recipe, log)
    label_names, num_labels = [], recipe.model.num_labels
    if d.format == "classification":
        label_names, num_labels = _label_names([r for p in parts for r in p.train], d.columns.label,
                                               recipe.model.num_labels)
    train, train_src, evals, eval_src = [], [], [], []
    train_stats, eval_stats = FormatStats(), FormatStats()
    for i, p in enumerate(parts):
        spec = _spec(recipe, p.fmt, p.columns, label_names, num_labels)
        ex, st = tokenize_part(tok, p.train, spec, p.name)
        train += ex
        train_src += [i] * len(ex)
        _add_stats(train_stats, st)
        log(f"[data] train {p.name}: {st.summary()}")
        if eval_parts is None:
            ex, st = tokenize_part(tok, p.eval, spec, f"{p.name} (held-out {d.eval_fraction:.0%})")
            evals += ex
            eval_src += [i] * len(ex)
            _add_stats(eval_stats, st)
    eval_names = [p.name for p in parts]
    if eval_parts is not None:
        eval_names = [p.name for p in eval_parts]
        for i, p in enumerate(eval_parts):
            ex, st = tokenize_part(tok, p.eval, _spec(recipe, p.fmt, p.columns, label_names, num_labels), p.name)
            evals += ex
            eval_src += [i] * len(ex)
            _add_stats(eval_stats, st)
    log(f"[data] eval: {eval_stats.summary()}")
    for line in report.lines():
        log(f"[data] {line}")
    if not train and not d.streaming:
        raise DataError(f"{d.train}: no usable training samples remain ({train_stats.summary()})")
    class_weights = None
    if report.balance.get("weights"):
        w = report.balance["weights"]
        class_weights = [float(w.get(name, w.get(str(i), 1.0))) for i, name in enumerate(label_names)]
    many = len(parts) > 1
    return PreparedData(ExampleTable.from_examples(train), ExampleTable.from_examples(evals), train_stats, eval_stats,
                        label_names, num_labels,
                        source_names=[p.name for p in parts], weights=[s.weight for s in data_sources(d)],
                        train_source=np.asarray(train_src, np.int32) if many else None,
                        eval_source=np.asarray(eval_src, np.int32) if len(eval_names) > 1 else None,
                        eval_names=eval_names,
                        class_weights=class_weights, report=report.lines(), pad_token_id=tok.pad_token_id)


def _add_stats(total: FormatStats, part: FormatStats) -> None:
    for f in dataclasses.fields(FormatStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))


def _write_cache(folder: Path, p: PreparedData, tok) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(tmp / "tokenizer")  # what made these tokens: checkpoints copy it (LazyTokenizer)
    p.train.save(tmp, "train")
    p.eval.save(tmp, "eval")
    meta = {"train_stats": dataclasses.asdict(p.train_stats), "eval_stats": dataclasses.asdict(p.eval_stats),
            "label_names": p.label_names, "num_labels": p.num_labels, "source_names": p.source_names,
            "weights": p.weights, "class_weights": p.class_weights, "report": p.report,
            "train_source": None if p.train_source is None else p.train_source.tolist(),
            "eval_source": None if p.eval_source is None else p.eval_source.tolist(), "eval_names": p.eval_names,
            "pad_token_id": p.pad_token_id}
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _read_cache(folder: Path, tok) -> PreparedData:
    from ..model import LazyTokenizer
    if isinstance(tok, LazyTokenizer):
        tok.saved_at(folder / "tokenizer")
    meta = json.loads((folder / "meta.json").read_text())
    arr = lambda v: None if v is None else np.asarray(v, np.int32)  # noqa: E731
    return PreparedData(ExampleTable.load(folder, "train"), ExampleTable.load(folder, "eval"),
                        FormatStats(**meta["train_stats"]), FormatStats(**meta["eval_stats"]),
                        meta["label_names"], meta["num_labels"], folder, meta["source_names"], meta["weights"],
                        arr(meta["train_source"]), arr(meta["eval_source"]), meta["class_weights"], meta["report"],
                        meta["eval_names"], meta["pad_token_id"])


def forgetting_examples(recipe: Recipe, tok) -> list[Example]:
    """eval.forgetting's texts (its 'text' column), tokenized as plain text: a fixed seeded choice of
    eval.forgetting_samples records, the same for every recipe, so that runs can be compared on it."""
    source = resolve_source(recipe.eval.forgetting)
    records = [r for r in source.load() if isinstance(r.get("text"), str) and r["text"].strip()]
    if not records:
        raise DataError(f"eval.forgetting: {source.name} holds no texts (a 'text' column, or .txt lines)")
    random.Random(0).shuffle(records)
    spec = FormatSpec(format="text", max_length=recipe.data.max_length, too_long="truncate",
                      columns={**dataclasses.asdict(recipe.data.columns), "text": "text"}, system_prompt=None,
                      use_chat_template=False)
    examples, _ = tokenize_records(tok, records[:recipe.eval.forgetting_samples], spec,
                                   f"eval.forgetting {source.name}")
    return examples
