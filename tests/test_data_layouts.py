"""Data layouts users bring as they are: Alpaca and ShareGPT records checked token by token against the tokenizer's
own chat template, fields a format does not read reported (never dropped unseen), and CSV files saved by Excel
(byte-order mark) and TSV files read."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dist_ft.config import RecipeError, describe_schema, recipe_from_dict
from dist_ft.data.dataset import _spec, prepare_data
from dist_ft.data.formats import IGNORE, FormatSpec, tokenize_records
from dist_ft.data.sources import DataError, resolve_source
from conftest import write_jsonl

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system"}


def spec(fmt, **kw):
    from dist_ft.config import DataColumns
    args = dict(format=fmt, max_length=512, too_long="truncate", columns=dataclasses.asdict(DataColumns()),
                system_prompt=None, use_chat_template=True, sharegpt_roles=SHAREGPT_ROLES)
    args.update(kw)
    return FormatSpec(**args)


def reference(tok, messages):
    """Token ids of the conversation as the tokenizer renders it, and the labels: every assistant turn's tokens
    (from the end of the generation prompt before it to the end of its own rendering), IGNORE elsewhere."""
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"])
            end = len(tok(tok.apply_chat_template(messages[:i + 1], tokenize=False),
                          add_special_tokens=False)["input_ids"])
            labels[start:end] = ids[start:end]
    return ids, labels


def targets(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids.tolist(), ex.labels.tolist()) if lab != IGNORE])


# ------------------------------------------------------------------------------------------------ alpaca

@pytest.mark.parametrize("record, user_turn", [
    ({"instruction": "Define the word.", "input": "cat", "output": "A small animal."}, "Define the word.\n\ncat"),
    ({"instruction": "Name a colour.", "input": "", "output": "Blue."}, "Name a colour."),
    ({"instruction": "Name a colour.", "input": "  ", "output": "Blue."}, "Name a colour."),
    ({"instruction": "Name a colour.", "output": "Blue."}, "Name a colour."),  # no input column at all
    ({"instruction": "Name a colour.", "input": None, "output": "Blue."}, "Name a colour."),  # parquet null
])
def test_alpaca_renders_instruction_and_input_as_the_user_turn(tokenizer, record, user_turn):
    (ex,), stats = tokenize_records(tokenizer, [record], spec("alpaca"), "t")
    ids, labels = reference(tokenizer, [{"role": "user", "content": user_turn},
                                        {"role": "assistant", "content": record["output"]}])
    assert ex.input_ids.tolist() == ids
    assert ex.labels.tolist() == labels  # the loss covers the answer (and its end-of-turn) and nothing else
    assert targets(tokenizer, ex) == record["output"] + "<|im_end|>\n"
    assert stats.kept == 1


def test_alpaca_is_the_instruction_path_with_mapped_columns(tokenizer):
    cols = {**spec("alpaca").columns, "instruction": "task", "input": "context", "output": "answer"}
    rec = {"task": "Define the word.", "context": "cat", "answer": "A small animal."}
    same = {"prompt": "Define the word.\n\ncat", "response": "A small animal."}
    for kw in ({}, {"use_chat_template": False}, {"system_prompt": "Be brief."}):
        (a,), _ = tokenize_records(tokenizer, [rec], spec("alpaca", columns=cols, **kw), "t")
        (b,), _ = tokenize_records(tokenizer, [same], spec("instruction", **kw), "t")
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
    with pytest.raises(DataError, match=r"t record 1: format 'alpaca' needs column 'answer'"):
        tokenize_records(tokenizer, [{"task": "x"}], spec("alpaca", columns=cols), "t")
    with pytest.raises(DataError, match=r"column 'context' must be text, got int"):
        tokenize_records(tokenizer, [{**rec, "context": 3}], spec("alpaca", columns=cols), "t")


# ------------------------------------------------------------------------------------------------ sharegpt

CONVERSATION = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"}, {"from": "user", "value": "Bye"},
                {"from": "chatgpt", "value": "Goodbye."}]


def test_sharegpt_renders_as_chat_token_by_token(tokenizer):
    (ex,), _ = tokenize_records(tokenizer, [{"conversations": CONVERSATION}], spec("sharegpt"), "t")
    role = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant"}
    messages = [{"role": role[t["from"]], "content": t["value"]} for t in CONVERSATION]
    ids, labels = reference(tokenizer, messages)
    assert ex.input_ids.tolist() == ids and ex.labels.tolist() == labels
    assert targets(tokenizer, ex) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    (chat,), _ = tokenize_records(tokenizer, [{"messages": messages}], spec("chat"), "t")
    assert chat.input_ids.tolist() == ids and chat.labels.tolist() == labels


def test_sharegpt_without_an_assistant_turn_is_counted(tokenizer):
    recs = [{"conversations": [{"from": "human", "value": "hi"}]}, {"conversations": CONVERSATION}]
    exs, stats = tokenize_records(tokenizer, recs, spec("sharegpt"), "t")
    assert len(exs) == 1 and stats.dropped_no_assistant == 1


def test_sharegpt_unknown_speaker_names_the_record_and_the_fix(tokenizer, tmp_path):
    recs = [{"conversations": CONVERSATION}, {"conversations": [{"from": "human", "value": "hi"},
                                                                {"from": "bot", "value": "yo"}]}]
    with pytest.raises(DataError, match=r"data.jsonl record 2: turn 2 has speaker 'bot'.*data.sharegpt.assistant: "
                                        r"\[gpt, assistant, chatgpt, bing, bot\]"):
        tokenize_records(tokenizer, recs, spec("sharegpt"), "data.jsonl")
    # The fix, written in the recipe, is what tokenization then uses.
    r = recipe_from_dict({"data": {"format": "sharegpt",
                                   "sharegpt": {"assistant": ["gpt", "assistant", "chatgpt", "bing", "bot"]}}})
    exs, _ = tokenize_records(tokenizer, recs, _spec(r, "sharegpt", r.data.columns), "data.jsonl")
    assert targets(tokenizer, exs[1]) == "yo<|im_end|>\n"
    with pytest.raises(DataError, match=r"turn 1 of column 'conversations' must have text keys 'from' and 'value' "
                                        r"\(it has role, content\)"):
        tokenize_records(tokenizer, [{"conversations": [{"role": "user", "content": "x"}]}], spec("sharegpt"), "t")
    # Turns keyed otherwise: data.sharegpt.role_key / content_key.
    r = recipe_from_dict({"data": {"format": "sharegpt", "sharegpt": {"role_key": "role", "content_key": "text"}}})
    (ex,), _ = tokenize_records(tokenizer, [{"conversations": [{"role": "human", "text": "hi"},
                                                               {"role": "gpt", "text": "yo"}]}],
                                _spec(r, "sharegpt", r.data.columns), "t")
    assert targets(tokenizer, ex) == "yo<|im_end|>\n"


def test_sharegpt_roles_are_checked_in_the_recipe():
    with pytest.raises(RecipeError, match=r"data.sharegpt: 'human' is listed under user and assistant"):
        recipe_from_dict({"data": {"format": "sharegpt", "sharegpt": {"assistant": ["gpt", "human"]}}})


# ------------------------------------------------------------------------------------------------ recipe rules

@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt"])
def test_new_formats_have_prompts_for_generation_metrics(fmt):
    r = recipe_from_dict({"data": {"format": fmt}, "eval": {"metrics": ["exact_match", "rouge"]}})
    assert r.data.format == fmt
    with pytest.raises(RecipeError, match="use data.format instruction, alpaca, chat, sharegpt"):
        recipe_from_dict({"data": {"format": "text"}, "eval": {"metrics": ["exact_match"]}})


def test_schema_lists_the_new_formats_and_columns():
    rows = {key: (tp, default) for key, tp, default, _ in describe_schema()}
    assert "alpaca" in rows["data.format"][0] and "sharegpt" in rows["data.format"][0]
    for key, default in (("instruction", "instruction"), ("input", "input"), ("output", "output"),
                         ("conversations", "conversations")):
        assert rows[f"data.columns.{key}"][1] == default
    assert rows["data.sharegpt.assistant"][1] == ["gpt", "assistant", "chatgpt", "bing"]


# ------------------------------------------------------------------------------------------------ ignored fields

ALPACA = [{"instruction": f"Define word {i}.", "input": f"word{i}" if i % 3 else "", "output": f"Meaning {i}.",
           "id": i} for i in range(30)]


def _recipe(tmp_path, data, **data_keys):
    return recipe_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "smollm2-135m-instruct"},
                             "data": {"train": str(data), "eval_fraction": 0.1, **data_keys}})


def test_a_mapping_that_leaves_a_field_out_is_reported(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("DIST_FT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    r = _recipe(tmp_path, data, format="instruction", columns={"prompt": "instruction", "response": "output"})
    logs = []
    prepared = prepare_data(r, tokenizer, log=logs.append, use_cache=False)
    non_empty = sum(1 for rec in ALPACA if rec["input"])  # 20 of 30
    line = next(m for m in logs if "ignored fields" in m)
    assert f"'input' (non-empty in {non_empty} of 30 records)" in line
    assert "'id' (non-empty in 30 of 30 records)" in line
    assert "use data.format: alpaca" in line and str(data) in line
    assert line.removeprefix("[data] ") in prepared.report  # kept with the cache, for the run's record

    from dist_ft.data.profile import data_report
    rep = data_report(r, tokenizer, tmp_path / "data-report", log=lambda m: None)
    assert rep["ignored_fields"][str(data)]["fields"] == {"id": 30, "input": non_empty}
    assert f"'input' (non-empty in {non_empty} of 30 records)" in (tmp_path / "data-report" / "report.md").read_text()

    # With the format that reads the input, only the id is left over, and the fix is no longer alpaca.
    r = _recipe(tmp_path, data, format="alpaca")
    logs.clear()
    prepare_data(r, tokenizer, log=logs.append, use_cache=False)
    line = next(m for m in logs if "ignored fields" in m)
    assert "'id' (non-empty in 30 of 30 records)" in line and "'input'" not in line
    assert "use data.format" not in line


def test_nothing_is_reported_when_every_field_is_read(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "a.jsonl", [{k: v for k, v in rec.items() if k != "id"} for rec in ALPACA])
    logs = []
    prepare_data(_recipe(tmp_path, data, format="alpaca"), tokenizer, log=logs.append, use_cache=False)
    assert logs and not any("ignored" in m for m in logs)


def test_conversations_under_chat_name_sharegpt(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "s.jsonl", [{"conversations": CONVERSATION, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 4 + [
        {"conversations": [], "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    logs = []
    prepare_data(_recipe(tmp_path, data, format="chat", eval_fraction=0.2), tokenizer, log=logs.append,
                 use_cache=False)
    line = next(m for m in logs if "ignored fields" in m)
    assert "'conversations' (non-empty in 4 of 5 records)" in line and "use data.format: sharegpt" in line


# ------------------------------------------------------------------------------------------------ CSV / TSV

def test_a_csv_saved_by_excel_keeps_its_first_column(tmp_path, tokenizer):
    from dist_ft.preflight import data_problems
    path = tmp_path / "excel.csv"
    path.write_bytes("prompt,response\r\nWhat is a cat?,\"A small\r\nanimal, furry.\"\r\nQ2,A2\r\n"
                     .encode("utf-8-sig"))
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    records = resolve_source(str(path)).load()
    # A newline inside a quoted field is kept (line ends read as "\n", as in every text file here).
    assert records == [{"prompt": "What is a cat?", "response": "A small\nanimal, furry."},
                       {"prompt": "Q2", "response": "A2"}]
    r = recipe_from_dict({"data": {"train": str(path), "format": "instruction"}})
    assert data_problems(r) == []  # was: "no column 'prompt' (columns: \ufeffprompt, response)"
    (ex, _), _ = tokenize_records(tokenizer, records, spec("instruction"), str(path))
    assert targets(tokenizer, ex) == "A small\nanimal, furry.<|im_end|>\n"


def test_tsv_by_extension_and_a_ragged_row_is_refused(tmp_path):
    from dist_ft.preflight import data_problems
    path = tmp_path / "data.tsv"
    path.write_text("\ufeffinstruction\tinput\toutput\nSay it.\ta, b\tA, B.\nSay.\t\tX\n", encoding="utf-8")
    assert resolve_source(str(path)).load() == [{"instruction": "Say it.", "input": "a, b", "output": "A, B."},
                                                {"instruction": "Say.", "input": "", "output": "X"}]
    r = recipe_from_dict({"data": {"train": str(path), "format": "alpaca"}})
    assert data_problems(r) == []
    r = recipe_from_dict({"data": {"train": str(path), "format": "instruction"}})
    assert any("has no column 'prompt'" in p and "instruction, input, output" in p for p in data_problems(r))
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,1\nnot, quoted,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:3: 3 fields but the header names 2"):
        resolve_source(str(bad)).load()


def test_a_byte_order_mark_in_json_lines_is_not_data(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in ALPACA[:2]).encode("utf-8-sig"))
    assert resolve_source(str(path)).load() == ALPACA[:2]
    from dist_ft.data.streaming import _records
    assert list(_records(path)) == ALPACA[:2]

