"""Data formats token by token (prompt masking, chat turns, classification labels), packing, sample order,
bad data, built-in sources and the tokenization cache."""

import json

import numpy as np
import pytest
import torch

from dist_ft.config import recipe_from_dict
from dist_ft.data import sources
from dist_ft.data.batching import BatchLayout, SampleOrder, collate, count_targets, pack
from dist_ft.data.dataset import prepare_data
from dist_ft.data.formats import IGNORE, Example, FormatSpec, tokenize_records
from dist_ft.data.sources import DataError, resolve_source
from dist_ft.data.table import ExampleTable, FileColumn
from conftest import write_jsonl

COLS = {"text": "text", "prompt": "prompt", "response": "response", "messages": "messages", "label": "label"}


def spec(fmt, **kw):
    args = dict(format=fmt, max_length=512, too_long="truncate", columns=COLS, system_prompt=None,
                use_chat_template=True)
    args.update(kw)
    return FormatSpec(**args)


def test_text_format_every_token_is_a_target(tokenizer):
    (ex,), stats = tokenize_records(tokenizer, [{"text": "hello world"}], spec("text"), "t")
    ids = tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]
    assert ex.input_ids.tolist() == ids and ex.labels.tolist() == ids and stats.kept == 1


def test_instruction_masks_the_prompt_token_by_token(tokenizer):
    rec = {"prompt": "What is a cat?", "response": "A small animal."}
    (ex,), _ = tokenize_records(tokenizer, [rec], spec("instruction"), "t")
    ids = ex.input_ids.tolist()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]},
                                          {"role": "assistant", "content": rec["response"]}], tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ex.labels[:n_prompt].tolist() == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:].tolist() == ids[n_prompt:]
    # The target tokens decode to exactly the answer and the end-of-turn markup.
    assert tokenizer.decode(ids[n_prompt:]) == "A small animal.<|im_end|>\n"


def test_instruction_without_chat_template(tokenizer):
    rec = {"prompt": "Q", "response": "A"}
    (ex,), _ = tokenize_records(tokenizer, [rec], spec("instruction", use_chat_template=False), "t")
    p = tokenizer("Q\n")["input_ids"]
    r = tokenizer("A", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ex.input_ids.tolist() == p + r and ex.labels.tolist() == [IGNORE] * len(p) + r


def test_chat_only_assistant_turns_are_targets(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    (ex,), _ = tokenize_records(tokenizer, [{"messages": msgs}], spec("chat"), "t")
    target_text = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert target_text == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    spans = np.flatnonzero(ex.labels != IGNORE)
    assert len(np.split(spans, np.flatnonzero(np.diff(spans) != 1) + 1)) == 2  # two separate answer spans


def test_chat_without_assistant_is_counted_and_dropped(tokenizer):
    recs = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    exs, stats = tokenize_records(tokenizer, recs, spec("chat"), "t")
    assert len(exs) == 1 and stats.dropped_no_assistant == 1


def test_system_prompt_is_prepended(tokenizer):
    rec = {"prompt": "Q", "response": "A"}
    (ex,), _ = tokenize_records(tokenizer, [rec], spec("instruction", system_prompt="SYS"), "t")
    assert tokenizer.decode(ex.input_ids).startswith("<|im_start|>system\nSYS<|im_end|>")


def test_too_long_truncates_or_drops_and_counts(tokenizer):
    recs = [{"text": "word " * 200}, {"text": "short"}]
    exs, stats = tokenize_records(tokenizer, recs, spec("text", max_length=16), "t")
    assert stats.truncated == 1 and len(exs[0].input_ids) == 16 and len(exs) == 2
    exs, stats = tokenize_records(tokenizer, recs, spec("text", max_length=16, too_long="drop"), "t")
    assert stats.dropped_too_long == 1 and len(exs) == 1


def test_classification_labels(tokenizer):
    s = spec("classification", label_names=["neg", "pos"], num_labels=2)
    exs, _ = tokenize_records(tokenizer, [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}], s, "t")
    assert [int(e.labels[0]) for e in exs] == [1, 0] and all(e.is_classification for e in exs)
    with pytest.raises(DataError, match="does not occur in the training data"):
        tokenize_records(tokenizer, [{"text": "x", "label": "meh"}], s, "t")
    s_int = spec("classification", num_labels=3)
    with pytest.raises(DataError, match=r"label 3 is outside 0..2"):
        tokenize_records(tokenizer, [{"text": "x", "label": 3}], s_int, "t")


def test_missing_column_and_wrong_type_name_the_record(tokenizer):
    with pytest.raises(DataError, match=r"f record 2: format 'instruction' needs column 'response'"):
        tokenize_records(tokenizer, [{"prompt": "a", "response": "b"}, {"prompt": "a"}], spec("instruction"), "f")
    with pytest.raises(DataError, match=r"column 'text' must be text, got int"):
        tokenize_records(tokenizer, [{"text": 5}], spec("text"), "f")


def test_file_readers_and_their_errors(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    assert len(resolve_source(str(good)).load()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        resolve_source(str(bad)).load()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:1: not UTF-8"):
        resolve_source(str(latin)).load()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no records"):
        resolve_source(str(empty)).load()
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\nhello,a\nbye,b\n")
    assert resolve_source(str(csv_file)).load() == [{"text": "hello", "label": "a"}, {"text": "bye", "label": "b"}]
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\ntwo\n")
    assert resolve_source(str(txt)).load() == [{"text": "one"}, {"text": "two"}]
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"text": "a"}]))
    assert resolve_source(str(js)).load() == [{"text": "a"}]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "d.parquet")
    assert resolve_source(str(tmp_path / "d.parquet")).load() == [{"text": "p"}, {"text": "q"}]
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_source(str(tmp_path / "d.xlsx"))


def test_builtin_sources_read_installed_data():
    defs = resolve_source("builtin:wordnet-definitions").load()
    assert len(defs) == 117659
    assert {"prompt", "response"} <= set(defs[0])
    cats = resolve_source("builtin:wordnet-categories").load()
    assert len({r["label"] for r in cats}) == 45
    assert len(resolve_source("builtin:fortunes").load()) > 10000
    assert len(resolve_source("builtin:pydoc").load()) > 100


def test_builtin_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "WORDNET_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        sources._wordnet_synsets()


def _ex(ids, labels=None):
    ids = np.asarray(ids, np.int32)
    return Example(ids, np.asarray(labels if labels is not None else ids, np.int32))


def test_packing_token_by_token():
    rows = pack([_ex([1, 2, 3]), _ex([4, 5], [IGNORE, 5]), _ex([6, 7, 8, 9])], max_length=6, strategy="greedy")
    assert len(rows) == 2
    r = rows[0]
    assert r.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert r.position_ids.tolist() == [0, 1, 2, 0, 1]
    # First token of every sample carries no target (never predicted from the previous sample).
    assert r.labels.tolist() == [IGNORE, 2, 3, IGNORE, 5]
    assert rows[1].input_ids.tolist() == [6, 7, 8, 9] and rows[1].position_ids.tolist() == [0, 1, 2, 3]
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch  # position ids mark the samples
    # The shorter row's padding is a sample of its own: its positions restart at 0.
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]
    assert batch["labels"][1].tolist() == [IGNORE, 7, 8, 9, IGNORE]


def _reference_bfd(lengths, capacity):
    """Best-fit decreasing by linear scan: the bin count pack(strategy="bfd") must reach."""
    rooms = []
    for n in sorted(lengths, reverse=True):
        fits = [r for r in rooms if r >= n]
        if fits:
            rooms[rooms.index(min(fits))] -= n
        else:
            rooms.append(capacity - n)
    return len(rooms)


@pytest.mark.parametrize("seed", range(6))
def test_best_fit_decreasing_packing(seed):
    rng = np.random.default_rng(seed)
    cap = int(rng.integers(8, 64))
    examples = [_ex(rng.integers(10, 1000, int(n)), None) for n in rng.integers(1, cap + 1, int(rng.integers(1, 80)))]
    rows = pack(examples, max_length=cap)  # bfd is the default
    greedy = pack(examples, max_length=cap, strategy="greedy")
    assert len(rows) == _reference_bfd([len(e.input_ids) for e in examples], cap)
    assert len(rows) <= len(greedy)
    # Every sample exactly once, whole, positions restarting at 0, its first token no target.
    seen = []
    for r in rows:
        assert len(r.input_ids) <= cap
        starts = np.flatnonzero(r.position_ids == 0).tolist() + [len(r.input_ids)]
        for a, b in zip(starts, starts[1:]):
            assert r.position_ids[a:b].tolist() == list(range(b - a))
            assert r.labels[a] == IGNORE and r.labels[a + 1:b].tolist() == r.input_ids[a + 1:b].tolist()
            seen.append(tuple(r.input_ids[a:b].tolist()))
    assert sorted(seen) == sorted(tuple(e.input_ids.tolist()) for e in examples)


def test_packing_strategy_is_a_recipe_field(tmp_path):
    with pytest.raises(Exception, match="packing_strategy"):
        recipe_from_dict({"model": {"path": "x"}, "data": {"train": "builtin:wordnet", "packing_strategy": "best"},
                          "output_dir": str(tmp_path)})


def test_collate_pads_and_counts_targets():
    batch = collate([_ex([1, 2, 3], [IGNORE, 2, 3]), _ex([4, 5])], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, 5, IGNORE]]
    assert count_targets(batch) == 3  # shifted: positions 1.. of each row


def test_sample_order_is_independent_of_world_size():
    order = SampleOrder(num_rows=37, seed=3)
    one = BatchLayout(micro_batch=4, world_size=1, accumulation=1)
    two = BatchLayout(micro_batch=2, world_size=2, accumulation=1)
    ga = BatchLayout(micro_batch=1, world_size=2, accumulation=2)
    for step in range(12):  # crosses epochs
        ref = sorted(order.rows(*one.micro_positions(step, 0, 0)))
        split = sorted(order.rows(*two.micro_positions(step, 0, 0)) + order.rows(*two.micro_positions(step, 0, 1)))
        acc = sorted(sum((order.rows(*ga.micro_positions(step, m, r)) for m in range(2) for r in range(2)), []))
        assert ref == split == acc
        # The two ranks never see the same rows in a step.
        assert not set(order.rows(*two.micro_positions(step, 0, 0))) & set(order.rows(*two.micro_positions(step, 0, 1)))
    epoch0 = order.rows(0, 37)
    assert sorted(epoch0) == list(range(37))


def test_prepare_data_caches_and_splits(tmp_path, monkeypatch, tokenizer, tiny_llama):
    monkeypatch.setenv("DIST_FT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample number {i}"} for i in range(50)])
    r = recipe_from_dict({"model": {"path": str(tiny_llama)}, "data": {"train": str(data), "format": "text",
                                                                        "eval_fraction": 0.2}})
    logs = []
    first = prepare_data(r, tokenizer, log=logs.append)
    assert len(first.train) == 40 and len(first.eval) == 10 and logs
    logs.clear()
    again = prepare_data(r, tokenizer, log=logs.append)
    assert not logs, "second preparation must come from the cache"
    assert [e.input_ids.tolist() for e in again.train] == [e.input_ids.tolist() for e in first.train]
    # Different content: a new cache entry.
    write_jsonl(data, [{"text": f"other {i}"} for i in range(50)])
    third = prepare_data(r, tokenizer, log=logs.append)
    assert logs and third.train[0].input_ids.tolist() != first.train[0].input_ids.tolist()


def test_example_table_round_trip_reads_from_the_file_and_selects(tmp_path):
    rng = np.random.default_rng(0)
    examples = [_ex(rng.integers(0, 1000, int(n)), None) for n in rng.integers(1, 30, 25)]
    examples[3] = Example(np.asarray([5, 6], np.int32), np.asarray([2], np.int32), True)  # classification: 1 label
    table = ExampleTable.from_examples(examples)
    table.save(tmp_path, "train")
    loaded = ExampleTable.load(tmp_path, "train")
    assert isinstance(loaded.ids, FileColumn) and isinstance(loaded.labels, FileColumn)  # tokens stay in the file
    assert len(loaded) == 25
    for e, g in zip(examples, loaded):
        assert g.input_ids.tolist() == e.input_ids.tolist() and g.labels.tolist() == e.labels.tolist()
        assert g.is_classification == e.is_classification
    assert loaded.lengths().tolist() == [len(e.input_ids) for e in examples]
    every_third = loaded[1::3]  # the evaluation's per-rank share
    assert [e.input_ids.tolist() for e in every_third] == [e.input_ids.tolist() for e in examples[1::3]]
    picked = loaded.select([7, 2]).select([1])
    assert picked[0].input_ids.tolist() == examples[2].input_ids.tolist() and picked[-1] is not None
    with pytest.raises(IndexError):
        picked[1]
    # A selection saves as its own compact table.
    every_third.save(tmp_path, "sub")
    sub = ExampleTable.load(tmp_path, "sub", in_memory=True)
    assert len(sub.ids) == sum(len(e.input_ids) for e in examples[1::3])
    # Packing a table reads its lengths from the offsets and builds the same rows as from the list.
    plain = [e for i, e in enumerate(examples) if i != 3]
    rows = pack(ExampleTable.from_examples(plain), max_length=40)
    ref = pack(plain, max_length=40)
    assert len(rows) == len(ref) and all(a.input_ids.tolist() == b.input_ids.tolist()
                                         and a.labels.tolist() == b.labels.tolist() for a, b in zip(rows, ref))


def test_example_table_rejects_a_truncated_cache(tmp_path):
    ExampleTable.from_examples([_ex([1, 2, 3]), _ex([4])]).save(tmp_path, "train")
    np.save(tmp_path / "train.ids.npy", np.asarray([1, 2], np.int32))
    with pytest.raises(ValueError, match="delete the folder"):
        ExampleTable.load(tmp_path, "train")


def test_a_run_from_the_cache_never_loads_the_tokenizer(tmp_path, monkeypatch, tiny_llama):
    from dist_ft.model import LazyTokenizer, load_tokenizer

    monkeypatch.setenv("DIST_FT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"sample number {i}"} for i in range(30)])
    r = recipe_from_dict({"model": {"path": str(tiny_llama)}, "data": {"train": str(data), "format": "text",
                                                                        "eval_fraction": 0.2}})
    first_tok = LazyTokenizer(tiny_llama)
    first = prepare_data(r, first_tok, log=lambda m: None)
    assert first_tok.loaded  # a miss tokenizes
    tok = LazyTokenizer(tiny_llama)
    again = prepare_data(r, tok, log=lambda m: None)
    assert not tok.loaded, "a cache hit must not load the tokenizer"
    real = load_tokenizer(tiny_llama)
    assert again.pad_token_id == first.pad_token_id == real.pad_token_id is not None
    # A checkpoint's tokenizer is the cache's copy, still without loading it, and loads as the real one.
    tok.save_pretrained(tmp_path / "ckpt" / "tokenizer")
    assert not tok.loaded
    copy = load_tokenizer(tmp_path / "ckpt" / "tokenizer")
    assert copy.get_vocab() == real.get_vocab() and copy.pad_token_id == real.pad_token_id
    # Anything read from it loads it, as the tokenizer it stands for.
    assert tok("sample number 3")["input_ids"] == real("sample number 3")["input_ids"] and tok.loaded


def test_tokenizer_fingerprint_follows_its_files_not_the_weights(tmp_path, tiny_llama):
    import shutil

    from dist_ft.model import LazyTokenizer

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    before = LazyTokenizer(folder).fingerprint()
    (folder / "model.safetensors").write_bytes(b"other weights")
    assert LazyTokenizer(folder).fingerprint() == before
    cfg = folder / "tokenizer_config.json"
    cfg.write_text(cfg.read_text() + "\n")  # any change to a tokenizer file
    assert LazyTokenizer(folder).fingerprint() != before
    assert LazyTokenizer(folder, trust_remote_code=True).fingerprint() != LazyTokenizer(folder).fingerprint()
