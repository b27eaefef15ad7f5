"""Property-based fuzzing of data files (hypothesis): broken JSONL/JSON/CSV/TSV/parquet/text, wrong types per column,
empty and huge fields, invalid UTF-8, byte-order marks, chat/sharegpt turns with missing or unknown roles, alpaca
records with missing fields, labels of every wrong kind, mixtures with one bad source, streams with a bad shard.

Each generated file has an expected outcome computed here, independently of dist_ft (the oracle):
- refused: a DataError (or RecipeError from the preflight) naming the file, and the line of a record that is bad;
- dropped: counted in the stats and in the log line ("dropped empty: 2");
- kept: the tokens decode to the text the ChatML template renders, and the targets (labels != -100) decode to
  exactly the answers (each assistant turn and its "<|im_end|>\n"), or every token for text.
Never another exception type. Runs at the data-loading level (`data_problems` then `prepare_data`, as `dist-ft
data` and the trainer do), derandomized so that CI sees the same cases every time.

    .venv/bin/python -m pytest tests/test_data_fuzz.py -q
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ft.config import RecipeError, recipe_from_dict
from dist_ft.data.dataset import _spec, prepare_data
from dist_ft.data.formats import IGNORE
from dist_ft.data.sources import DataError
from dist_ft.data.streaming import StreamingRows
from dist_ft.preflight import data_problems

FUZZ = settings(max_examples=int(os.environ.get("DIST_FT_FUZZ_EXAMPLES", "800")), deadline=None, derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))
MAX_LENGTH = 1024


class Huge(str):
    """A field far beyond MAX_LENGTH tokens whatever the merges (~13,500 characters), shown short in reports."""

    def __repr__(self) -> str:
        return "HUGE"


HUGE = Huge("lorem ipsum dolor sit amet " * 500)
EOS = "<|im_end|>"
_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def env(tokenizer, tmp_path_factory):
    os.environ.setdefault("DIST_FT_CACHE", str(tmp_path_factory.mktemp("cache")))
    return tokenizer, tmp_path_factory.mktemp("fuzz")


def _new_dir(root: Path) -> Path:
    d = root / f"case{next(_COUNTER)}"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------------------ generators

good_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="<|"), min_size=1, max_size=24
                    ).filter(lambda t: t.strip() != "")
blank = st.sampled_from(["", " ", "\n", " \t\n "])
wrong_type = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                       st.none(), st.lists(st.integers(0, 3), max_size=2), st.just({"a": "b"}))
# A text column's value: mostly good, else blank, huge, a wrong type, or missing (the MISSING marker).
MISSING = object()
field = st.one_of(good_text, good_text, good_text, blank, st.just(HUGE), wrong_type, st.just(MISSING))
ROLES = ["system", "user", "assistant", "tool", "bot", "Assistant", "", 3, None]
SPEAKERS = ["human", "user", "gpt", "assistant", "system", "robot", "", 3, None]


def _turn(keys: tuple[str, str], names: list):
    who, text = keys
    return st.fixed_dictionaries({}, optional={who: st.sampled_from(names), text: st.one_of(good_text, good_text,
                                                                                            blank, wrong_type)})


def _chat_turns(keys, names):
    good = st.lists(st.fixed_dictionaries({keys[0]: st.sampled_from(names[:4]), keys[1]: good_text}), max_size=4)
    return st.one_of(good, good, good, st.lists(_turn(keys, names), max_size=4), wrong_type, good_text)


def _record(fmt: str):
    cols = {"text": ["text"], "instruction": ["prompt", "response"], "alpaca": ["instruction", "input", "output"],
            "classification": ["text"]}
    if fmt in cols:
        fields = {c: field for c in cols[fmt]}
        if fmt == "classification":
            fields["label"] = st.one_of(st.sampled_from(["cat", "dog", "bird"]), st.sampled_from(["cat", "dog"]),
                                        st.integers(-2, 4), st.sampled_from(["0", "1", " 2", "²", "-1", "1.0"]),
                                        st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none(),
                                        st.lists(st.integers(0, 2), max_size=2), st.just(MISSING))
    elif fmt == "chat":
        fields = {"messages": st.one_of(_chat_turns(("role", "content"), ROLES), st.just(MISSING))}
    else:
        fields = {"conversations": st.one_of(_chat_turns(("from", "value"), SPEAKERS), st.just(MISSING))}
    fields["extra"] = st.one_of(st.just(MISSING), good_text)
    return st.fixed_dictionaries(fields).map(lambda r: {k: v for k, v in r.items() if v is not MISSING})


# ------------------------------------------------------------------------------------------------ the oracle

def _is_text(v) -> bool:
    return isinstance(v, str)


def _blank(v) -> bool:
    return not v.strip()


def _chatml(messages: list[dict]) -> tuple[str, list[str], int]:
    """The ChatML text of a conversation, each assistant turn's target text, and where the first one starts."""
    text, targets, first = "", [], None
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant" and first is None:
            first = len(text) + len(head)
        text += head + m["content"] + EOS + "\n"
        if m["role"] == "assistant":
            targets.append(m["content"] + EOS + "\n")
    return text, targets, first


def expect(fmt: str, rec: dict, *, system: str | None, use_template: bool, labels: dict | None) -> tuple:
    """("refuse",) | ("empty",) | ("no_assistant",) | ("ok", full text, [target texts], huge_before_target,
    huge, label) for one record, from the rules in the README and formats.py's docstring."""
    def text_of(c):
        return rec[c] if c in rec and _is_text(rec[c]) else None

    if fmt in ("text", "classification"):
        t = text_of("text")
        if t is None:
            return ("refuse",)
        label = None
        if fmt == "classification":
            if "label" not in rec:
                return ("refuse",)
            label = labels.get(_label_key(rec["label"]))
            if label is None:
                return ("refuse",)
        if _blank(t):
            return ("empty",)
        full = t + (EOS if fmt == "text" else "")
        return ("ok", full, [full] if fmt == "text" else [], False, len(t) > 5000, label)
    if fmt in ("instruction", "alpaca"):
        if fmt == "instruction":
            p, r = text_of("prompt"), text_of("response")
            if p is None or r is None:
                return ("refuse",)
        else:
            i, r = text_of("instruction"), text_of("output")
            inp = rec.get("input")
            if i is None or r is None or (inp is not None and not _is_text(inp)):
                return ("refuse",)
            p = f"{i}\n\n{inp}" if inp is not None and inp.strip() else i
        if _blank(r):
            return ("empty",)
        huge_before = len(p) > 5000 or (system is not None and len(system) > 5000)
        if not use_template:
            return ("ok", p + "\n" + r + EOS, [r + EOS], huge_before, len(p + r) > 5000, None)
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": p}, {"role": "assistant", "content": r}]
        full, targets, _ = _chatml(msgs)
        return ("ok", full, targets, huge_before, len(full) > 5000, None)
    column, (who, what) = ("messages", ("role", "content")) if fmt == "chat" else ("conversations", ("from", "value"))
    turns = rec.get(column)
    if not isinstance(turns, list):
        return ("refuse",)
    msgs = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get(who), str) or not isinstance(t.get(what), str):
            return ("refuse",)
        role = t[who] if fmt == "chat" else {"human": "user", "user": "user", "gpt": "assistant",
                                             "assistant": "assistant", "system": "system"}.get(t[who])
        if role not in ("system", "user", "assistant", "tool"):
            return ("refuse",)
        msgs.append({"role": role, "content": t[what]})
    if not any(m["role"] == "assistant" for m in msgs):
        return ("no_assistant",)
    if system is not None and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}] + msgs
    full, targets, first = _chatml(msgs)
    return ("ok", full, targets, first > 5000, len(full) > 5000, None)


def _label_key(v):
    return (type(v).__name__, repr(v))


def label_table(records: list[dict]) -> dict:
    """label value -> class index, as the README says: class names sorted, or integers 0..max."""
    values = [r["label"] for r in records if "label" in r]
    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and re.fullmatch(r"\s*-?[0-9]+\s*", v):
            return int(v)
        return None
    if values and all(isinstance(v, str) and as_int(v) is None for v in values):
        names = sorted(set(values))
        return {_label_key(v): names.index(v) for v in values}
    ints = [as_int(v) for v in values if as_int(v) is not None]
    n = max(ints) + 1 if ints else 0
    table = {}
    for v in values:
        i = as_int(v)
        if i is not None and 0 <= i < n:
            table[_label_key(v)] = i
    return table


# ------------------------------------------------------------------------------------------------ writing files

def write(path: Path, kind: str, records: list[dict], corrupt: list[tuple[int, bytes]], bom: bool) -> dict[int, int]:
    """Write the records (plus corrupt lines inserted before record index i) and return record index -> line."""
    lines, where = [], {}
    if kind in ("jsonl",):
        bad = dict(corrupt)
        for i, r in enumerate(records + [None]):
            if i in bad:
                lines.append(bad[i])
            if r is not None:
                lines.append(json.dumps(r, ensure_ascii=i % 2 == 0).encode())
                where[i] = len(lines)
        data = b"\n".join(lines) + b"\n"
    elif kind in ("csv", "tsv"):
        buf = io.StringIO(newline="")
        records = csv_view(records)
        cols = sorted({k for r in records for k in r})
        w = csv.DictWriter(buf, cols, delimiter="\t" if kind == "tsv" else ",", lineterminator="\n")
        w.writeheader()
        line = 2
        for i, r in enumerate(records):
            where[i] = line
            w.writerow(r)
            line = buf.getvalue().count("\n") + 1
        data = buf.getvalue().encode()
    elif kind == "txt":
        for i, r in enumerate(records):
            lines.append(r["text"].encode())
            where[i] = len(lines)
        data = b"\n".join(lines) + b"\n"
    else:
        raise AssertionError(kind)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return where


def csv_view(records: list[dict]) -> list[dict]:
    """What a CSV reader gives back: every column of the header, every value a string."""
    cols = sorted({k for r in records for k in r})
    # Line ends inside quoted fields read back as "\n" (sources.py reads text files with universal newlines).
    return [{k: ("" if r.get(k) is None else str(r[k])).replace("\r\n", "\n").replace("\r", "\n") for k in cols}
            for r in records]


# ------------------------------------------------------------------------------------------------ the check

def run(tok, folder: Path, data: dict, spec_files: list[Path]) -> tuple[object, list[str]]:
    task = "sequence_classification" if data.get("format") == "classification" else "causal_lm"
    recipe = recipe_from_dict({"output_dir": str(folder / "out"), "seed": 1, "model": {"path": str(folder), "task": task},
                               "data": {"max_length": MAX_LENGTH, "eval_fraction": 0.0, **data}})
    log: list[str] = []
    try:
        problems = data_problems(recipe)
        if problems:
            raise RecipeError(problems, "fuzz")
        return prepare_data(recipe, tok, use_cache=False, log=log.append), log
    except (DataError, RecipeError) as exc:
        return exc, log


def check_refused(exc, path: Path, bad_lines: set[int], *, named_line_required: bool = True) -> None:
    assert isinstance(exc, (DataError, RecipeError)), f"expected a refusal naming {path}, got {exc!r}"
    msg = str(exc)
    assert str(path) in msg, msg
    named = {int(m) for m in re.findall(re.escape(str(path)) + r":(\d+)", msg)}
    if named or (isinstance(exc, DataError) and named_line_required and bad_lines):
        assert named and named <= bad_lines, f"{msg}\nexpected one of lines {sorted(bad_lines)}"


def check_kept(tok, prepared, outcomes: list[tuple], too_long: str, fmt: str, log: list[str]) -> None:
    oks = [o for o in outcomes if o[0] == "ok"]
    st_ = prepared.train_stats
    n = Counter(o[0] for o in outcomes)
    assert st_.records == len(outcomes)
    assert st_.dropped_empty == n["empty"] and st_.dropped_no_assistant == n["no_assistant"], st_
    huge = [o for o in oks if o[4]]
    if too_long == "drop":
        assert st_.dropped_too_long == len(huge) and st_.kept == len(oks) - len(huge), st_
        assert st_.truncated == 0
        whole = [o for o in oks if not o[4]]
    else:
        lost = [o for o in huge if o[3] and fmt != "classification" and fmt != "text"]  # no target left in the row
        assert st_.dropped_no_target == len(lost) and st_.truncated == len(huge) - len(lost), st_
        assert st_.kept == len(oks) - len(lost)
        whole = [o for o in oks if not o[4]]
    examples = list(prepared.train)
    got_whole = []
    for ex in examples:
        ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
        assert len(ids) <= MAX_LENGTH
        if len(ids) == MAX_LENGTH:
            continue  # a truncated one: counted above
        if ex.is_classification:
            got_whole.append((tok.decode(ids, clean_up_tokenization_spaces=False), (), labels[0]))
            continue
        assert len(labels) == len(ids) and all(lab in (IGNORE, i) for lab, i in zip(labels, ids))
        targets = [i for i, lab in zip(ids, labels) if lab != IGNORE]
        got_whole.append((tok.decode(ids, clean_up_tokenization_spaces=False),
                          tok.decode(targets, clean_up_tokenization_spaces=False), None))
    want = [(o[1], "".join(o[2]) if fmt != "classification" else (), o[5]) for o in whole]
    got = Counter(got_whole)
    # A kept record that is not huge must come back exactly: its text, its targets and its class.
    assert Counter(want) == got, (Counter(want) - got, got - Counter(want))
    counts = {"dropped empty": st_.dropped_empty, "dropped no assistant": st_.dropped_no_assistant,
              "dropped too long": st_.dropped_too_long, "dropped no target": st_.dropped_no_target,
              "truncated": st_.truncated}
    train_line = [line for line in log if line.startswith("[data] train ")]
    assert len(train_line) == 1 and f"{st_.kept}/{st_.records} kept" in train_line[0], log
    for name, count in counts.items():  # nothing removed without its count in the log
        if count:
            assert f"{name}: {count}" in train_line[0], (name, log)


FORMATS = ["text", "instruction", "alpaca", "chat", "sharegpt", "classification"]


@st.composite
def cases(draw):
    fmt = draw(st.sampled_from(FORMATS))
    kind = draw(st.sampled_from({"text": ["jsonl", "jsonl", "csv", "tsv", "txt"],
                                 "chat": ["jsonl"], "sharegpt": ["jsonl"]}.get(fmt, ["jsonl", "jsonl", "csv", "tsv"])))
    records = draw(st.lists(_record(fmt), min_size=1, max_size=6))
    if kind == "txt":
        records = [{"text": draw(st.one_of(good_text, st.just(HUGE)).filter(lambda t: "\n" not in t and "\r" not in t))}
                   for _ in records]
    corrupt = []
    if kind == "jsonl":
        bad = st.sampled_from([b"{not json", b"[1, 2]", b"\"text\"", b"\xff\xfe{\"text\": \"x\"}", b"{\"text\": \"\xc3\"}",
                               b"", b"   ", b"null", b"{\"text\": \"a\"} {"])
        corrupt = draw(st.lists(st.tuples(st.integers(0, len(records)), bad), max_size=2, unique_by=lambda t: t[0]))
    return dict(fmt=fmt, kind=kind, records=records, corrupt=corrupt, bom=draw(st.booleans()),
                shuffle=draw(st.booleans()), too_long=draw(st.sampled_from(["truncate", "drop"])),
                system=draw(st.sampled_from([None, None, "Be brief."])), use_template=draw(st.booleans()))


@FUZZ
@given(case=cases())
def test_fuzzed_files_are_trained_on_counted_or_refused(env, case):
    tok, root = env
    folder = _new_dir(root)
    fmt, kind = case["fmt"], case["kind"]
    path = folder / f"data.{kind}"
    lines = write(path, kind, case["records"], case["corrupt"], case["bom"])
    records = csv_view(case["records"]) if kind in ("csv", "tsv") else case["records"]
    data = {"train": str(path), "format": fmt, "shuffle": case["shuffle"], "too_long": case["too_long"],
            "system_prompt": case["system"], "use_chat_template": case["use_template"]}
    got, log = run(tok, folder, data, [path])
    # 1. The file itself: the first bad line in the file's order stops reading, named.
    reader_bad = sorted(lines_of_corrupt(case["corrupt"], lines, len(case["records"])))
    if reader_bad:
        check_refused(got, path, {reader_bad[0]})
        return
    if kind in ("csv", "tsv") and not any(records):  # no header at all: the file holds no records
        check_refused(got, path, set(), named_line_required=False)
        return
    labels = label_table(records) if fmt == "classification" else None
    outcomes = [expect(fmt, r, system=case["system"], use_template=case["use_template"], labels=labels)
                for r in records]
    refused = {lines[i] for i, o in enumerate(outcomes) if o[0] == "refuse"}
    if refused:
        # data_problems may refuse a first record lacking a column (naming the file and the column), before reading.
        check_refused(got, path, refused)
        return
    if not any(o[0] == "ok" and not (case["too_long"] == "drop" and o[4])
               and not (o[4] and o[3] and fmt not in ("text", "classification")) for o in outcomes):
        assert isinstance(got, (DataError, RecipeError)) and "no usable training samples" in str(got), got
        return
    assert not isinstance(got, Exception), f"{got}\n{outcomes}"
    check_kept(tok, got, outcomes, case["too_long"], fmt, log)


def lines_of_corrupt(corrupt, lines: dict[int, int], n: int) -> set[int]:
    """Lines of the corrupt insertions that a reader refuses (blank lines are skipped)."""
    out = set()
    for i, raw in corrupt:
        if not raw.strip():
            continue
        line = (lines[i] - 1) if i < n else max(lines.values(), default=0) + 1
        out.add(line)
    return out


# ------------------------------------------------------------------------------------------------ parquet, mixtures, streams

def _examples(name: str, default: int):
    return settings(FUZZ, max_examples=int(os.environ.get("DIST_FT_FUZZ_EXAMPLES_" + name, default)))


@st.composite
def parquet_cases(draw):
    """Typed columns (as parquet holds them): each column one type, nulls anywhere; or a damaged file."""
    fmt = draw(st.sampled_from(["text", "instruction", "alpaca", "classification"]))
    cols = {"text": ["text"], "instruction": ["prompt", "response"], "alpaca": ["instruction", "input", "output"],
            "classification": ["text", "label"]}[fmt]
    n = draw(st.integers(1, 5))
    records = [{} for _ in range(n)]
    for c in cols + ["extra"]:
        kind = draw(st.sampled_from(["str", "str", "str", "int", "float", "bool", "list", "absent"]))
        if kind == "absent":
            continue
        value = {"str": st.one_of(good_text, blank, st.just(HUGE), st.sampled_from(["cat", "dog", "0", "1", "-1"])),
                 "int": st.integers(-2, 3), "float": st.floats(-2, 3, allow_nan=False), "bool": st.booleans(),
                 "list": st.lists(good_text, max_size=2)}[kind]
        for r in records:
            r[c] = draw(st.one_of(value, value, value, st.none()))
    return dict(fmt=fmt, records=records, damage=draw(st.sampled_from([None, None, None, "truncate", "garbage"])),
                too_long=draw(st.sampled_from(["truncate", "drop"])))


@_examples("PARQUET", 150)
@given(case=parquet_cases())
def test_fuzzed_parquet_files(env, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, root = env
    folder = _new_dir(root)
    path = folder / "data.parquet"
    fmt, records = case["fmt"], case["records"]
    if not any(records):
        records = [{"extra": "x"} for _ in records]  # parquet needs a column
    pq.write_table(pa.Table.from_pylist(records), path)
    if case["damage"] == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif case["damage"] == "garbage":
        path.write_bytes(b"PAR1" + bytes(range(256)) * 3)
    got, log = run(tok, folder, {"train": str(path), "format": fmt, "too_long": case["too_long"]}, [path])
    if case["damage"]:
        check_refused(got, path, set(), named_line_required=False)
        return
    # What a parquet reader gives back: every column in every row, None where a row has no value.
    cols = sorted({k for r in records for k in r})
    rows = [{k: r.get(k) for k in cols} for r in records]
    labels = label_table(rows) if fmt == "classification" else None
    outcomes = [expect(fmt, r, system=None, use_template=True, labels=labels) for r in rows]
    refused = {i + 1 for i, o in enumerate(outcomes) if o[0] == "refuse"}
    if refused:
        assert isinstance(got, (DataError, RecipeError)), f"{got}\n{outcomes}"
        msg = str(got)
        assert str(path) in msg, msg
        named = {int(m) for m in re.findall(re.escape(str(path)) + r": row (\d+)", msg)}
        assert isinstance(got, RecipeError) or (named and named <= refused), f"{msg}\nexpected rows {sorted(refused)}"
        return
    if not any(o[0] == "ok" and not (case["too_long"] == "drop" and o[4])
               and not (o[4] and o[3] and fmt not in ("text", "classification")) for o in outcomes):
        assert isinstance(got, DataError) and "no usable training samples" in str(got), got
        return
    assert not isinstance(got, Exception), f"{got}\n{outcomes}"
    check_kept(tok, got, outcomes, case["too_long"], fmt, log)


def _good_record(fmt: str):
    def pair(a, b, **kw):
        return st.fixed_dictionaries({a: good_text, b: good_text}, **kw)

    return {"text": st.fixed_dictionaries({"text": good_text}), "instruction": pair("prompt", "response"),
            "alpaca": pair("instruction", "output", optional={"input": good_text}),
            "chat": st.tuples(good_text, good_text).map(lambda t: {"messages": [
                {"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]}),
            "sharegpt": st.tuples(good_text, good_text).map(lambda t: {"conversations": [
                {"from": "human", "value": t[0]}, {"from": "gpt", "value": t[1]}]})}[fmt]


@st.composite
def mixture_cases(draw):
    """Two or three sources of any format; one of them (perhaps) holds a bad record or a broken line."""
    sources = []
    for _ in range(draw(st.integers(2, 3))):
        fmt = draw(st.sampled_from(["text", "instruction", "alpaca", "chat", "sharegpt"]))
        good = draw(st.lists(_good_record(fmt), min_size=1, max_size=3))
        sources.append({"fmt": fmt, "records": good})
    bad = draw(st.sampled_from([None, "record", "line"]))
    return dict(sources=sources, bad=bad, which=draw(st.integers(0, len(sources) - 1)),
                at=draw(st.integers(0, 3)), weights=draw(st.lists(st.floats(0.1, 5), min_size=3, max_size=3)))


BAD_RECORD = {"text": 3, "prompt": None, "response": ["x"], "instruction": 1, "output": {},
              "messages": [{"role": "bot", "content": "x"}], "conversations": [{"from": "robot", "value": "x"}]}


@_examples("MIXTURE", 80)
@given(case=mixture_cases())
def test_fuzzed_mixtures_refuse_the_bad_source_by_name(env, case):
    tok, root = env
    folder = _new_dir(root)
    train, paths, bad_line = [], [], None
    for k, src in enumerate(case["sources"]):
        path = folder / f"part{k}.jsonl"
        records = list(src["records"])
        corrupt = []
        if k == case["which"] and case["bad"] == "record":
            records.insert(min(case["at"], len(records)), BAD_RECORD)
        elif k == case["which"] and case["bad"] == "line":
            corrupt = [(min(case["at"], len(records)), b"{broken")]
        lines = write(path, "jsonl", records, corrupt, False)
        if k == case["which"] and case["bad"] == "record":
            bad_line = lines[min(case["at"], len(src["records"]))]
        elif k == case["which"] and case["bad"] == "line":
            bad_line = min(lines_of_corrupt(corrupt, lines, len(records)))
        train.append({"path": str(path), "format": src["fmt"], "weight": case["weights"][k]})
        paths.append(path)
    got, log = run(tok, folder, {"train": train}, paths)
    if case["bad"] is None:
        assert not isinstance(got, Exception), got
        assert got.train_stats.kept == sum(len(s["records"]) for s in case["sources"])
        assert len(got.train_by_source()) == len(case["sources"])
        for part, src in zip(got.train_by_source(), case["sources"]):
            assert len(part) == len(src["records"])  # each source's records, and only them, under its index
        assert sum(line.startswith("[data] train ") for line in log) == len(case["sources"])
        return
    check_refused(got, paths[case["which"]], {bad_line})
    for k, p in enumerate(paths):  # the good sources are not blamed
        if k != case["which"]:
            assert str(p) + ":" not in str(got)


@st.composite
def stream_cases(draw):
    n_shards = draw(st.integers(2, 4))
    shards = [draw(st.lists(st.fixed_dictionaries({"text": good_text}), min_size=1, max_size=4))
              for _ in range(n_shards)]
    bad = draw(st.sampled_from(["line", "utf8", "array", "record", "parquet", "none"]))
    return dict(shards=shards, bad=bad, which=draw(st.integers(0, n_shards - 1)), at=draw(st.integers(0, 4)),
                rank=draw(st.integers(0, 1)), bom=draw(st.booleans()))


@_examples("STREAM", 80)
@given(case=stream_cases())
def test_fuzzed_streams_name_the_bad_shard_and_line(env, case):
    """Each rank reads its own shards; a bad shard is refused by file and line where the stream reaches it."""
    tok, root = env
    folder = _new_dir(root)
    shard_dir = folder / "shards"
    shard_dir.mkdir()
    bad_path, bad_line = None, None
    for k, records in enumerate(case["shards"]):
        path = shard_dir / f"shard-{k:03d}.jsonl"
        corrupt = []
        if k == case["which"] and case["bad"] != "none":
            at = min(case["at"], len(records))
            raw = {"line": b"{oops", "utf8": b'{"text": "\xff\xfe"}', "array": b"[1]",
                   "record": json.dumps({"text": 7}).encode()}.get(case["bad"])
            if case["bad"] == "parquet":
                path = shard_dir / f"shard-{k:03d}.parquet"
                path.write_bytes(b"PAR1 not really parquet PAR1")
                bad_path = path
                continue
            corrupt = [(at, raw)]
        lines = write(path, "jsonl", records, corrupt, case["bom"] and k == 0)
        if corrupt:
            bad_path, bad_line = path, min(lines_of_corrupt(corrupt, lines, len(records)))
    recipe = recipe_from_dict({"output_dir": str(folder / "out"), "model": {"path": str(folder)},
                               "data": {"train": str(shard_dir), "streaming": True, "eval": str(shard_dir / "x.jsonl"),
                                        "format": "text", "max_length": 64}})
    rank = case["rank"]
    mine = sorted(shard_dir.iterdir())[rank::2]
    try:
        rows = StreamingRows(str(shard_dir), tok, _spec(recipe, "text", recipe.data.columns), rank=rank,
                             world_size=2, packing=False)
        n_mine = sum(len(case["shards"][k]) for k in range(len(case["shards"])) if k % 2 == rank)
        taken = rows.take(n_mine + 1)  # one past this rank's records: the stream goes round
        got = None
    except DataError as exc:
        got = exc
    if bad_path is None or bad_path not in mine:
        assert got is None, got
        texts = [tok.decode(ex.input_ids.tolist()) for ex in taken]
        want = [r["text"] + EOS for k in range(len(case["shards"])) if k % 2 == rank for r in case["shards"][k]]
        assert texts == want + want[:1]  # in shard order, then the next epoch
        assert all((ex.labels == ex.input_ids).all() for ex in taken)
        return
    assert isinstance(got, DataError), got
    assert str(bad_path) in str(got)
    if bad_line is not None:
        assert f"{bad_path}:{bad_line}:" in str(got), str(got)
