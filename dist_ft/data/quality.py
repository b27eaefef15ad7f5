"""What is done to records before tokenization, each step counted: cleaning, de-duplication, class balance.

Nothing is removed silently: every function returns what it removed or added, and the caller logs it; fields of
the records that the chosen format does not read are counted too (ignored_fields), with the fix when one is known.

- clean: strip surrounding whitespace, normalise unicode (NFC/NFKC), drop records whose text is empty or longer
  than a number of characters.
- dedup exact: records whose used text (every column the format reads, whitespace collapsed, case folded) is
  identical to an earlier record's.
- dedup near: MinHash over word 3-shingles with LSH banding, every candidate pair confirmed by its true Jaccard
  similarity (>= near_threshold): "the same text with a few words changed".
- balance (classification): oversample every class up to the largest (repeats, seeded), undersample down to the
  smallest, or keep the data and weight the loss by inverse class frequency (class_weights).
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class QualityReport:
    """Counts of what each step did, for the log and `dist-ft data`."""
    cleaned: dict = field(default_factory=dict)  # e.g. {"stripped": 3, "dropped_empty": 1}
    duplicates: dict = field(default_factory=dict)  # {"exact": n, "near": m}
    balance: dict = field(default_factory=dict)  # {"mode", "before": {label: n}, "after": {...}, "weights"?}
    # {source: {"format", "records", "fields": {field: records with a non-empty value}, "fix"}}
    ignored: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        if self.cleaned:
            out.append("clean: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.cleaned.items()))
        if self.duplicates:
            out.append("dedup: removed " + ", ".join(f"{v} {k}" for k, v in self.duplicates.items()))
        if self.balance:
            b = self.balance
            out.append(f"balance {b['mode']}: " + _dist(b["before"]) + " -> " + _dist(b["after"]))
        for name, ig in self.ignored.items():
            fields = ", ".join(f"{k!r} (non-empty in {v} of {ig['records']} records)" for k, v in ig["fields"].items())
            out.append(f"ignored fields: {name} (format {ig['format']}) does not read {fields}; {ig['fix']}")
        return out


def _dist(counts: dict) -> str:
    total = sum(counts.values()) or 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in top[:4])
    return f"{total} records [{shown}{', ...' if len(top) > 4 else ''}]"


def _non_empty(value) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, dict, tuple)):
        return bool(value)
    return True


def ignored_fields(records: list[dict], read: list[str]) -> dict[str, int]:
    """Fields the format does not read, each with the number of records holding a non-empty value in it."""
    read_set = set(read)
    counts: Counter = Counter()
    for r in records:
        for k, v in r.items():
            if k not in read_set and _non_empty(v):
                counts[k] += 1
    return {str(k): n for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def ignored_fix(fmt: str, fields: list[str]) -> str:
    """What to write when ignored fields look like another format's."""
    have = set(fields)
    if (fmt == "instruction" and "input" in have) or (fmt != "alpaca" and {"instruction", "output"} <= have):
        return ("use data.format: alpaca (it joins instruction and input into the user turn; data.columns."
                "instruction/input/output name the fields)")
    if fmt != "sharegpt" and "conversations" in have:
        return "use data.format: sharegpt (data.columns.conversations names the field)"
    if fmt != "chat" and "messages" in have:
        return "use data.format: chat (data.columns.messages names the field)"
    return ("if one of them should be trained on, choose the data.format that reads it or point data.columns at it; "
            "otherwise nothing is lost")


def record_text(record: dict, columns: list[str]) -> str:
    parts = []
    for c in columns:
        v = record.get(c)
        parts.append(v if isinstance(v, str) else repr(v))
    return "\n".join(parts)


def clean(records: list[dict], columns: list[str], *, strip: bool, normalize_unicode: str | None,
          drop_empty: bool, max_chars: int | None) -> tuple[list[dict], dict]:
    counts: Counter = Counter()
    out = []
    for r in records:
        r = r.copy()  # a sources.Row keeps the line it came from
        for c in columns:
            v = r.get(c)
            if not isinstance(v, str):
                continue
            new = unicodedata.normalize(normalize_unicode, v) if normalize_unicode else v
            new = new.strip() if strip else new
            if new != v:
                counts["normalized" if normalize_unicode and unicodedata.normalize(normalize_unicode, v) != v
                       else "stripped"] += 1
                r[c] = new
        texts = [r.get(c) for c in columns if isinstance(r.get(c), str)]
        if drop_empty and texts and not any(t.strip() for t in texts):
            counts["dropped_empty"] += 1
            continue
        if max_chars is not None and sum(len(t) for t in texts) > max_chars:
            counts["dropped_too_long"] += 1
            continue
        out.append(r)
    return out, dict(counts)


def _key(text: str) -> str:
    return hashlib.blake2b(" ".join(text.casefold().split()).encode(), digest_size=16).hexdigest()


def exact_duplicates(records: list[dict], columns: list[str]) -> list[int]:
    """Indices of records whose text repeats an earlier record's (the first one is kept)."""
    seen, dups = set(), []
    for i, r in enumerate(records):
        k = _key(record_text(r, columns))
        if k in seen:
            dups.append(i)
        else:
            seen.add(k)
    return dups


def _shingles(text: str, n: int = 3) -> set[str]:
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def near_duplicates(records: list[dict], columns: list[str], threshold: float = 0.8, *, num_perm: int = 64,
                    bands: int = 16, seed: int = 0) -> list[int]:
    """Indices of records whose word-3-shingle Jaccard similarity with an earlier kept record is >= threshold.

    MinHash signatures (num_perm universal hashes of 64-bit shingle hashes), LSH with `bands` bands, and every
    candidate pair checked exactly: LSH only decides which pairs are compared, never what is removed.
    """
    shingle_sets = [_shingles(record_text(r, columns)) for r in records]
    rng = np.random.default_rng(seed)
    prime = np.uint64((1 << 61) - 1)
    a = rng.integers(1, (1 << 61) - 1, num_perm, dtype=np.uint64)
    b = rng.integers(0, (1 << 61) - 1, num_perm, dtype=np.uint64)
    rows = num_perm // bands
    buckets: dict[tuple, list[int]] = defaultdict(list)
    removed: set[int] = set()
    out = []
    for i, sh in enumerate(shingle_sets):
        if not sh:
            continue
        h = np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3
                         for s in sh), dtype=np.uint64, count=len(sh))
        with np.errstate(over="ignore"):
            sig = ((np.outer(a, h) + b[:, None]) % prime).min(axis=1)
        candidates = set()
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        for key in keys:
            candidates.update(buckets.get(key, ()))
        dup = any(len(sh & shingle_sets[j]) / len(sh | shingle_sets[j]) >= threshold for j in candidates
                  if j not in removed)
        if dup:
            removed.add(i)
            out.append(i)
            continue
        for key in keys:
            buckets[key].append(i)
    return out


def dedup(records: list[dict], columns: list[str], mode: str, threshold: float) -> tuple[list[dict], dict]:
    if mode == "none":
        return records, {}
    counts = {}
    drop = set(exact_duplicates(records, columns))
    counts["exact"] = len(drop)
    if mode == "near":
        kept = [i for i in range(len(records)) if i not in drop]
        near = near_duplicates([records[i] for i in kept], columns, threshold)
        counts["near"] = len(near)
        drop |= {kept[j] for j in near}
    return [r for i, r in enumerate(records) if i not in drop], counts


def balance(records: list[dict], label_column: str, mode: str, seed: int) -> tuple[list[dict], dict]:
    """oversample / undersample to equal class counts; class_weights leaves the records and returns weights
    (total / (classes x count), mean 1 over the records) in the report."""
    if mode == "none":
        return records, {}
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_label[str(r.get(label_column))].append(r)
    before = {k: len(v) for k, v in sorted(by_label.items())}
    rng = random.Random(seed)
    report = {"mode": mode, "before": before}
    if mode == "class_weights":
        n, k = len(records), len(by_label)
        report["weights"] = {lab: n / (k * c) for lab, c in before.items()}
        report["after"] = before
        return records, report
    target = max(before.values()) if mode == "oversample" else min(before.values())
    out = []
    for lab, group in sorted(by_label.items()):
        if len(group) >= target:
            out += rng.sample(group, target) if len(group) > target else group
        else:
            whole, part = divmod(target - len(group), len(group))  # whole extra copies, then a random part
            out += group * (1 + whole) + rng.sample(group, part)
    rng.shuffle(out)
    report["after"] = {lab: target for lab in before}
    return out, report
