"""Where records come from: local files (.jsonl, .json, .csv, .tsv, .parquet, .txt) and built-in sources that
read data installed by Debian packages or CPython. A record is a plain dict; formats.py turns it into tokens.

Every reader names the file (and the line, for JSON lines and CSV) in its errors, and a built-in whose package is
missing says which package to install. Text files are UTF-8; a byte-order mark in front (Excel writes one) is not
part of the data and is dropped, so that it never sticks to the first column's name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")

# WordNet's 45 lexicographer files, indexed by the two-digit lex_filenum of each synset line.
WORDNET_LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
_POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


class DataError(ValueError):
    """Bad data: the message names the file (and line) and the fix."""


class Row(dict):
    """A record that remembers where it was read (`path:line`, or `path: row N`): shuffling, cleaning and
    de-duplication reorder records, and an error must still name the line of the file."""
    __slots__ = ("origin",)

    def __init__(self, data=(), origin: str | None = None):
        super().__init__(data)
        self.origin = origin

    def copy(self) -> Row:
        return Row(self, self.origin)


@dataclass(frozen=True)
class Source:
    """A resolved data source: its records and a fingerprint that changes whenever its content may have."""
    name: str
    fingerprint: str
    load: Callable[[], list[dict]]


def _missing(path: Path, package: str) -> DataError:
    return DataError(f"{path} not found: the built-in source needs the Debian package {package} "
                     f"(sudo apt-get install {package})")


def _wordnet_synsets() -> list[dict]:
    records = []
    for pos_file in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{pos_file}"
        if not path.exists():
            raise _missing(path, "wordnet-base")
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                lexnum, ss_type, w_cnt = int(fields[1]), fields[2], int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
                # The gloss is "definition; \"example\"; ...": keep the definition alone.
                definition = re.split(r';\s*"', gloss.strip(), maxsplit=1)[0].strip().rstrip(";").strip()
                if not definition:
                    continue
                word = re.sub(r"\([a-z]+\)$", "", words[0])  # adjective markers such as (a), (p)
                records.append({"word": word, "pos": _POS_NAME[ss_type], "definition": definition,
                                "category": WORDNET_LEXNAMES[lexnum]})
    return records


def _wordnet_definitions() -> list[dict]:
    return [{"prompt": f'What does the {r["pos"]} "{r["word"]}" mean?', "response": r["definition"][0].upper()
             + r["definition"][1:] + ".", "text": f'{r["word"]} ({r["pos"]}): {r["definition"]}.'}
            for r in _wordnet_synsets()]


def _wordnet_preference() -> list[dict]:
    """Preference pairs: the word's own definition chosen; the definition of another word of the same part of
    speech rejected (a fixed, seeded choice: the next word in a seeded shuffle of that part of speech)."""
    import random

    records = _wordnet_synsets()
    by_pos: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_pos.setdefault(r["pos"], []).append(i)
    other = {}
    rng = random.Random(0)
    for idx in by_pos.values():
        order = idx[:]
        rng.shuffle(order)
        other.update({a: b for a, b in zip(order, order[1:] + order[:1])})
    sentence = lambda d: d[0].upper() + d[1:] + "."  # noqa: E731
    return [{"prompt": f'What does the {r["pos"]} "{r["word"]}" mean?', "chosen": sentence(r["definition"]),
             "rejected": sentence(records[other[i]]["definition"])}
            for i, r in enumerate(records) if records[other[i]]["definition"] != r["definition"]]


def _wordnet_unpaired() -> list[dict]:
    """KTO's unpaired data from the same pairs: each prompt once, with its own definition (desirable) or the other
    word's (undesirable), chosen by a seeded coin, so that no prompt has both answers."""
    import random

    rng = random.Random(1)
    out = []
    for r in _wordnet_preference():
        good = rng.random() < 0.5
        out.append({"prompt": r["prompt"], "completion": r["chosen"] if good else r["rejected"], "label": good})
    return out


def _wordnet_categories() -> list[dict]:
    return [{"text": r["definition"], "label": r["category"]} for r in _wordnet_synsets()]


def _fortunes() -> list[dict]:
    if not FORTUNES_DIR.is_dir():
        raise _missing(FORTUNES_DIR, "fortunes")
    records = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if path.suffix or not path.is_file():  # skip .dat indexes and .u8 links
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        records.extend({"text": t.strip("\n")} for t in text.split("\n%\n") if t.strip())
    if not records:
        raise _missing(FORTUNES_DIR, "fortunes")
    return records


def _pydoc() -> list[dict]:
    from pydoc_data.topics import topics

    records = []
    for key in sorted(topics):
        chunk = ""
        for para in topics[key].split("\n\n"):  # paragraphs grouped into ~1,500-character texts
            if chunk and len(chunk) + len(para) > 1500:
                records.append({"text": chunk.strip()})
                chunk = ""
            chunk += para + "\n\n"
        if chunk.strip():
            records.append({"text": chunk.strip()})
    return records


def _builtin_fingerprint(paths: list[Path], tag: str) -> str:
    h = hashlib.sha256(tag.encode())
    for p in paths:
        if p.exists():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _wordnet_paths() -> list[Path]:
    return [WORDNET_DIR / f"data.{p}" for p in ("noun", "verb", "adj", "adv")]


BUILTINS: dict[str, tuple[Callable[[], list[dict]], Callable[[], list[Path]], str]] = {
    "wordnet-definitions": (_wordnet_definitions, _wordnet_paths, "wordnet-base"),
    "wordnet-categories": (_wordnet_categories, _wordnet_paths, "wordnet-base"),
    "wordnet-preference": (_wordnet_preference, _wordnet_paths, "wordnet-base"),
    "wordnet-unpaired": (_wordnet_unpaired, _wordnet_paths, "wordnet-base"),
    "fortunes": (_fortunes, lambda: [FORTUNES_DIR], "fortunes"),
    "pydoc": (_pydoc, lambda: [], "python3"),
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


# ------------------------------------------------------------------------------------------------ local files

def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{n}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file "
                                "as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be "
                                "one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
            records.append(Row(obj, f"{path}:{n}"))
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8") \
            from None


def _read_json(path: Path) -> list[dict]:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return [Row(o, f"{path}: record {i}") for i, o in enumerate(obj, 1)]


def _read_csv(path: Path) -> list[dict]:
    """A header row, then one record a row; comma-separated, or tab-separated for a .tsv file. Quoted fields may
    hold newlines (line ends read as "\n", as in the other text files)."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    records = []
    try:
        start = 2  # the line a row starts on (the header is line 1)
        for row in reader:
            if None in row:  # DictReader files the values beyond the header under the key None
                raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames) + len(row[None])} fields but the "
                                f"header names {len(reader.fieldnames)}; quote fields that hold the delimiter")
            records.append(Row(row, f"{path}:{start}"))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: {exc}") from None
    return records


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read as parquet ({exc}); rewrite the file (e.g. with pandas.to_parquet)") \
            from None
    return [Row(r, f"{path}: row {i}") for i, r in enumerate(rows, 1)]


def _read_txt(path: Path) -> list[dict]:
    # Lines end at "\n" only (str.splitlines would also split a line at U+2028, U+0085, form feeds...).
    lines = _read_text(path).split("\n")
    return [Row({"text": line.removesuffix("\r")}, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
            ".parquet": _read_parquet, ".txt": _read_txt}


def _file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_spec(spec: str) -> str | None:
    """Cheap existence check for `dist-ft check`: None when fine, else the problem and its fix."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            return f"unknown built-in source {name!r}; choose one of {', '.join('builtin:' + b for b in BUILTINS)}"
        _, paths, package = BUILTINS[name]
        missing = [p for p in paths() if not p.exists()]
        if missing:
            return f"{missing[0]} not found: install the Debian package {package} (sudo apt-get install {package})"
        return None
    path = Path(spec)
    if path.suffix not in FILE_SUFFIXES:
        return f"{spec}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)} or builtin:NAME"
    if not path.is_file():
        return f"{spec}: no such file"
    return None


def resolve_source(spec: str) -> Source:
    problem = check_spec(spec)
    if problem:
        raise DataError(problem)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        load, paths, _ = BUILTINS[name]
        return Source(spec, _builtin_fingerprint(paths(), spec + ":v1"), load)
    path = Path(spec)

    def load() -> list[dict]:
        records = _READERS[path.suffix](path)
        if not records:
            raise DataError(f"{path}: the file holds no records")
        return records

    return Source(str(path), _file_fingerprint(path), load)
