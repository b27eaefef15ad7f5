"""Records to an encoder-decoder's examples (model.task: seq2seq_lm): the prompt is the encoder's input and the answer
the decoder's labels, every one of them a target (the model shifts them right itself to make its decoder inputs).

instruction and alpaca: the prompt (alpaca's as ALPACA_PROMPT) and the answer. chat and sharegpt: the turns before
the last assistant turn, one "role: content" line each, and that turn's text (encoder-decoder tokenizers have no chat
template). data.system_prompt, when set, opens the encoder's text followed by a space: T5's task prefix
("summarize:", "translate English to German:"). Each side is held to data.max_length on its own.
"""

from __future__ import annotations

import numpy as np

from ..distributed import watchdog
from .formats import (Example, FormatSpec, FormatStats, _as_text, _column, _messages, _sharegpt_messages,
                      alpaca_prompt)


def seq2seq_texts(record: dict, spec: FormatSpec, where: str) -> tuple[str, str] | None:
    """An encoder-decoder's (source text, target text) of a record; None when it has no answer (counted by the caller
    as empty), ("", "") when a conversation has no assistant turn."""
    c, fmt = spec.columns, spec.format
    if fmt == "instruction":
        source = _as_text(_column(record, c["prompt"], where, fmt), where, c["prompt"])
        target = _as_text(_column(record, c["response"], where, fmt), where, c["response"])
    elif fmt == "alpaca":
        instruction = _as_text(_column(record, c["instruction"], where, fmt), where, c["instruction"])
        input_ = record.get(c["input"])
        input_ = "" if input_ is None else _as_text(input_, where, c["input"])
        source = alpaca_prompt(instruction, input_)
        target = _as_text(_column(record, c["output"], where, fmt), where, c["output"])
    elif fmt in ("chat", "sharegpt"):
        msgs = (_messages(_column(record, c["messages"], where, fmt), where, c["messages"]) if fmt == "chat" else
                _sharegpt_messages(_column(record, c["conversations"], where, fmt), spec, where, c["conversations"]))
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            return "", ""
        source = "\n".join(f"{m['role']}: {m['content']}" for m in msgs[:last])
        target = msgs[last]["content"]
    else:
        raise AssertionError(f"format {fmt} has no prompt and answer (config checks refuse it for seq2seq_lm)")
    if not target.strip():
        return None
    if spec.system_prompt:
        source = f"{spec.system_prompt} {source}"
    return source, target


def _keep_end(ids: list[int], max_length: int, end: int | None) -> list[int]:
    """Truncated to max_length, keeping a closing EOS as the tokenizer's own truncation does (T5's </s>)."""
    if len(ids) <= max_length:
        return ids
    return ids[:max_length - 1] + [end] if end is not None and ids[-1] == end else ids[:max_length]


def seq2seq_example(tok, record: dict, spec: FormatSpec, where: str, stats: FormatStats) -> Example | None:
    """A record as an encoder-decoder's example (encoder ids; decoder labels, all targets, ending in EOS); None when
    it is dropped (counted in `stats`). Each side is held to data.max_length on its own."""
    texts = seq2seq_texts(record, spec, where)
    if texts is None:
        stats.dropped_empty += 1
        return None
    if texts == ("", ""):
        stats.dropped_no_assistant += 1
        return None
    source, target = texts
    if not source.strip():  # nothing for the encoder to read
        stats.dropped_empty += 1
        return None
    eos = tok.eos_token_id
    ids = tok(source, add_special_tokens=True)["input_ids"]
    # The tokenizer's own target encoding (BART's <s> ... </s>, T5's ... </s>); EOS appended where it adds none, so
    # that the model learns to stop.
    labels = tok(text_target=target, add_special_tokens=True)["input_ids"]
    if eos is not None and (not labels or labels[-1] != eos):
        labels = labels + [eos]
    too_long = len(ids) > spec.max_length or len(labels) > spec.max_length
    if too_long and spec.too_long == "drop":
        stats.dropped_too_long += 1
        return None
    stats.truncated += too_long
    return Example(np.asarray(_keep_end(ids, spec.max_length, eos), np.int32),
                   np.asarray(_keep_end(labels, spec.max_length, eos), np.int32), seq2seq=True)


def tokenize_seq2seq(tok, records: list[dict], spec: FormatSpec, source: str) -> tuple[list[Example], FormatStats]:
    """Every record as an encoder-decoder's example (formats.tokenize_records for every other task)."""
    stats = FormatStats(records=len(records))
    examples = []
    for n, record in enumerate(records):
        watchdog.beat()
        ex = seq2seq_example(tok, record, spec, getattr(record, "origin", None) or f"{source} record {n + 1}", stats)
        if ex is not None:
            examples.append(ex)
    stats.kept = len(examples)
    return examples, stats
