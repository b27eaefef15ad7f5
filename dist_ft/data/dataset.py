"""Prepare the tokenized train and eval sets once, cached on disk keyed by the data, the format and the tokenizer.

Preparation runs in every rank *before* the process group exists: the first rank to take the cache's file lock
tokenizes and writes the cache atomically, the others wait on the lock (not on a collective, so a long
tokenization can never trip a collective's timeout) and then read it. The cache holds numpy arrays only
(`allow_pickle=False`).
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
from ..config import Recipe
from .formats import Example, FormatSpec, FormatStats, tokenize_records
from .sources import DataError, resolve_source

CACHE_VERSION = "1"


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    train_stats: FormatStats
    eval_stats: FormatStats
    label_names: list[str]
    num_labels: int | None
    cache_dir: Path | None = None


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(repr((tok.bos_token_id, tok.eos_token_id, getattr(tok, "chat_template", None))).encode())
    return h.hexdigest()[:16]


def _label_names(records: list[dict], column: str, num_labels: int | None) -> tuple[list[str], int | None]:
    values = [r.get(column) for r in records if column in r]
    if values and all(isinstance(v, str) and not v.strip().lstrip("-").isdigit() for v in values):
        names = sorted(set(values))
        if num_labels is not None and num_labels != len(names):
            raise DataError(f"model.num_labels is {num_labels} but the training data has {len(names)} class names; "
                            f"set model.num_labels: {len(names)} (or leave it unset)")
        return names, len(names)
    ints = [int(v) for v in values if isinstance(v, (int, str)) and not isinstance(v, bool)
            and str(v).strip().lstrip("-").isdigit()]
    if num_labels is None and ints:
        num_labels = max(ints) + 1
    return [str(i) for i in range(num_labels or 0)], num_labels


def _save_split(path: Path, examples: list[Example]) -> None:
    lengths = np.asarray([len(e.input_ids) for e in examples], np.int64)
    ids = np.concatenate([e.input_ids for e in examples]) if examples else np.zeros(0, np.int32)
    labels = np.concatenate([e.labels for e in examples]) if examples else np.zeros(0, np.int32)
    label_lengths = np.asarray([len(e.labels) for e in examples], np.int64)
    cls = np.asarray([e.is_classification for e in examples], np.bool_)
    with open(path, "wb") as fh:
        np.savez(fh, ids=ids, labels=labels, lengths=lengths, label_lengths=label_lengths, cls=cls)


def _load_split(path: Path) -> list[Example]:
    with np.load(path, allow_pickle=False) as z:
        ids, labels, lengths, llens, cls = z["ids"], z["labels"], z["lengths"], z["label_lengths"], z["cls"]
    out, a, b = [], 0, 0
    for n, m, c in zip(lengths, llens, cls):
        out.append(Example(ids[a:a + n], labels[b:b + m], bool(c)))
        a, b = a + n, b + m
    return out


def _split_records(recipe: Recipe) -> tuple[list[dict], list[dict], str, str]:
    d = recipe.data
    train_src = resolve_source(d.train)
    records = train_src.load()
    rng = random.Random(recipe.seed)
    order = list(range(len(records)))
    rng.shuffle(order)  # shuffle before the hold-out split so that held-out records are not one file's tail
    records = [records[i] for i in order]
    if d.eval is not None:
        eval_src = resolve_source(d.eval)
        eval_records, eval_name = eval_src.load(), eval_src.name
    else:
        n_eval = int(round(len(records) * d.eval_fraction))
        if d.eval_fraction > 0 and n_eval == 0:
            n_eval = 1
        if n_eval >= len(records):
            raise DataError(f"{d.train}: {len(records)} record(s) are too few to hold out data.eval_fraction="
                            f"{d.eval_fraction}; add data or set data.eval")
        eval_records, records = records[:n_eval], records[n_eval:]
        eval_name = f"{train_src.name} (held-out {d.eval_fraction:.0%})"
    if d.max_train_samples:
        records = records[: d.max_train_samples]
    if d.max_eval_samples:
        eval_records = eval_records[: d.max_eval_samples]
    return records, eval_records, train_src.name, eval_name


def cache_key(recipe: Recipe, tok) -> str:
    d = recipe.data
    parts = {
        "version": CACHE_VERSION,
        "train": resolve_source(d.train).fingerprint,
        "eval": resolve_source(d.eval).fingerprint if d.eval else None,
        "data": {k: v for k, v in dataclasses.asdict(d).items() if k != "packing"},  # packing happens at load
        "seed": recipe.seed,
        "num_labels": recipe.model.num_labels,
        "tokenizer": tokenizer_fingerprint(tok),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def prepare_data(recipe: Recipe, tok, *, use_cache: bool = True, log=print) -> PreparedData:
    """Tokenized train/eval examples for the recipe, from the cache when it already holds them."""
    key = cache_key(recipe, tok)
    folder = cache_root() / "data" / key
    if use_cache and (folder / "meta.json").exists():
        return _read_cache(folder)
    with file_lock(folder.with_suffix(".lock")):
        if use_cache and (folder / "meta.json").exists():
            return _read_cache(folder)
        prepared = _tokenize(recipe, tok, log)
        if use_cache:
            _write_cache(folder, prepared)
            prepared.cache_dir = folder
    return prepared


def _tokenize(recipe: Recipe, tok, log) -> PreparedData:
    d = recipe.data
    train_records, eval_records, train_name, eval_name = _split_records(recipe)
    label_names, num_labels = [], recipe.model.num_labels
    if d.format == "classification":
        label_names, num_labels = _label_names(train_records, d.columns.label, recipe.model.num_labels)
    spec = FormatSpec(format=d.format, max_length=d.max_length, too_long=d.too_long,
                      columns=dataclasses.asdict(d.columns), system_prompt=d.system_prompt,
                      use_chat_template=d.use_chat_template, label_names=label_names, num_labels=num_labels)
    train, train_stats = tokenize_records(tok, train_records, spec, train_name)
    evals, eval_stats = tokenize_records(tok, eval_records, spec, eval_name)
    log(f"[data] train {train_name}: {train_stats.summary()}")
    log(f"[data] eval {eval_name}: {eval_stats.summary()}")
    if not train:
        raise DataError(f"{train_name}: no usable training samples remain ({train_stats.summary()})")
    return PreparedData(train, evals, train_stats, eval_stats, label_names, num_labels)


def _write_cache(folder: Path, p: PreparedData) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    _save_split(tmp / "train.npz", p.train)
    _save_split(tmp / "eval.npz", p.eval)
    meta = {"train_stats": dataclasses.asdict(p.train_stats), "eval_stats": dataclasses.asdict(p.eval_stats),
            "label_names": p.label_names, "num_labels": p.num_labels}
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _read_cache(folder: Path) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    return PreparedData(_load_split(folder / "train.npz"), _load_split(folder / "eval.npz"),
                        FormatStats(**meta["train_stats"]), FormatStats(**meta["eval_stats"]),
                        meta["label_names"], meta["num_labels"], folder)


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
