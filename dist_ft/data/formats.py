"""Records to tokens, one function per data format.

- text: every token is a target.
- instruction: prompt and response rendered through the tokenizer's chat template (when it has one); only the
  response tokens are targets (prompt masking).
- alpaca: instruction, optional input and output; the user turn is ALPACA_PROMPT (the instruction, a blank line,
  the input; the instruction alone when the input is empty or absent), then exactly as instruction.
- chat: a list of {role, content} turns through the chat template; only assistant turns are targets.
- sharegpt: a list of {from, value} turns, speakers mapped to roles by data.sharegpt, then exactly as chat.
- classification: the text, and the label as a class index.
- preference: a prompt and two answers (chosen, rejected), each through the chat template, answers alone targets;
  stored as one Example (chosen then rejected, `split` between).
- unpaired_preference (KTO): a prompt, one completion and whether it is desirable; stored like a pair whose second
  sequence is the prompt with the previous record's completion (the mismatched sample of KTO's KL estimate).

For an encoder-decoder (model.task: seq2seq_lm) the instruction, alpaca, chat and sharegpt formats give two
sequences instead of one: seq2seq.py.

Templates are rendered to text and tokenized once; the split between prompt and answer is found by rendering the
conversation up to each assistant turn, which only needs the template to render prefixes of a conversation as
prefixes of its text. A template that does not is refused with a clear error instead of a silently wrong mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..distributed import watchdog
from .sources import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T], IGNORE where no loss; for classification a single class index
    is_classification: bool = False
    # A preference pair: input_ids and labels hold the chosen sequence, then the rejected one; `split` is the
    # chosen sequence's length (0: not a pair). An unpaired preference example (KTO) is stored the same way: its
    # own sequence, then the mismatched one, with `desirable` 1 or 0 (-1: not such an example).
    split: int = 0
    desirable: int = -1
    # An encoder-decoder's example: input_ids are the encoder's input, labels the decoder's targets (another length).
    seq2seq: bool = False


@dataclass
class FormatStats:
    """What tokenization did to the data; logged so that nothing is removed silently."""
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    dropped_no_assistant: int = 0
    dropped_empty: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.records} kept"]
        for name in ("truncated", "dropped_too_long", "dropped_no_target", "dropped_no_assistant", "dropped_empty"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')}: {getattr(self, name)}")
        return ", ".join(parts)


@dataclass
class FormatSpec:
    format: str
    max_length: int
    too_long: str
    columns: dict
    system_prompt: str | None
    use_chat_template: bool
    label_names: list[str] = field(default_factory=list)  # classification: index -> name
    num_labels: int | None = None
    sharegpt_roles: dict = field(default_factory=dict)  # speaker name -> user | assistant | system
    sharegpt_keys: tuple[str, str] = ("from", "value")  # a turn's speaker and text keys
    seq2seq: bool = False  # model.task seq2seq_lm: prompt to the encoder, answer to the decoder (seq2seq_example)


ALPACA_PROMPT = "{instruction}\n\n{input}"  # the user turn of an alpaca record whose input is not empty


def _column(record: dict, name: str, where: str, fmt: str) -> object:
    if name not in record:
        have = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: format {fmt!r} needs column {name!r} but the record has {have}; rename the "
                        f"column or set data.columns to point at it")
    return record[name]


def _as_text(value: object, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be text, got {type(value).__name__} {value!r:.60}")
    return value


_MARK = "\ue000dist-ft-answer\ue000"  # a private-use marker no real answer holds


def _opening(tok, turn: dict) -> str:
    """What the template renders before the answer of a conversation that opens with an assistant turn (its header,
    and any default system prompt): never a target, and not renderable as a generation prompt of no messages."""
    text = tok.apply_chat_template([{**turn, "content": _MARK}], tokenize=False)
    return text[:text.index(_MARK)] if _MARK in text else ""


def _chat_prefix_ids(tok, messages: list[dict], where: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole chat and the [start, end) token span of every assistant turn."""
    full = tok.apply_chat_template(messages, tokenize=False)
    cuts = []  # character offsets: (start, end) of each assistant turn in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else \
            _opening(tok, m)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise DataError(f"{where}: the tokenizer's chat template does not render a conversation's beginning "
                            "as the beginning of its text, so answer tokens cannot be located; use a template "
                            "without history rewriting or data.format: text")
        cuts.append((len(before), len(upto)))
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = encode(full)
    spans, aligned = [], True
    for a, b in cuts:
        head, upto = encode(full[:a]) if a else [], encode(full[:b])
        # Tokens may merge across a turn's edge (an answer starting with whitespace after the template's "\n"):
        # then the prefix's tokens are not the text's first tokens, and their count would shift the mask.
        aligned = aligned and ids[:len(head)] == head and ids[:len(upto)] == upto
        spans.append((len(head), len(upto)))
    if aligned:
        return ids, spans
    # Tokenize piece by piece at every turn edge: each answer's tokens are then exactly its own.
    edges = sorted({0, len(full), *(c for cut in cuts for c in cut)})
    ids, at = [], {}
    for a, b in zip(edges, edges[1:]):
        at[a] = len(ids)
        ids += encode(full[a:b])
    at[len(full)] = len(ids)
    return ids, [(at[a], at[b]) for a, b in cuts]


def _render_chat(tok, messages: list[dict], system: str | None, where: str) -> tuple[list[int], list[int]]:
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + messages
    ids, spans = _chat_prefix_ids(tok, messages, where)
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def _plain_instruction(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    # Without a chat template: "prompt\n" then the answer and EOS; BOS (if the tokenizer adds one) stays in front.
    p_ids = tok(prompt + "\n", add_special_tokens=True)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None
                                                                     else [])
    return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids


CHAT_ROLES = ("system", "user", "assistant", "tool")


def _messages(value: object, where: str, column: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                              and isinstance(m.get("content"), str) for m in value):
        raise DataError(f"{where}: column {column!r} must be a list of {{\"role\": ..., \"content\": ...}} turns")
    for i, m in enumerate(value, 1):
        # Only "assistant" turns carry the loss: an unknown role ("bot", "Assistant") would silently train on nothing.
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}: turn {i} of column {column!r} has role {m['role']!r}; roles are "
                            f"{', '.join(CHAT_ROLES)}: rename it in the data, or use data.format: sharegpt, whose "
                            "data.sharegpt maps any speaker name to a role")
    return value


def alpaca_prompt(instruction: str, input_: str) -> str:
    """The user turn of an alpaca record: ALPACA_PROMPT, or the instruction alone when the input is empty."""
    return ALPACA_PROMPT.format(instruction=instruction, input=input_) if input_.strip() else instruction


def _sharegpt_messages(value: object, spec: FormatSpec, where: str, column: str) -> list[dict]:
    """ShareGPT turns as {role, content} messages, each speaker mapped by data.sharegpt."""
    who, text = spec.sharegpt_keys
    if not isinstance(value, list):
        raise DataError(f"{where}: column {column!r} must be a list of {{{who!r}: ..., {text!r}: ...}} turns, got "
                        f"{type(value).__name__}")
    messages = []
    for i, turn in enumerate(value, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get(who), str) or not isinstance(turn.get(text), str):
            keys = ", ".join(map(str, turn)) if isinstance(turn, dict) else type(turn).__name__
            raise DataError(f"{where}: turn {i} of column {column!r} must have text keys {who!r} and {text!r} "
                            f"(it has {keys}); set data.sharegpt.role_key / content_key to the turns' keys, or use "
                            "data.format: chat for {role, content} turns")
        role = spec.sharegpt_roles.get(turn[who])
        if role is None:
            now = [name for name, r in spec.sharegpt_roles.items() if r == "assistant"]
            raise DataError(f"{where}: turn {i} has speaker {turn[who]!r}, which data.sharegpt does not map to a "
                            "role; add it to data.sharegpt.user, .assistant or .system, keeping the names listed "
                            f"there (e.g. data.sharegpt.assistant: [{', '.join(now + [str(turn[who])])}])")
        messages.append({"role": role, "content": turn[text]})
    return messages


def _instruction_sample(tok, prompt: str, response: str, spec: FormatSpec, where: str):
    """instruction and alpaca: one user turn and its answer; the answer alone carries the loss."""
    if not response.strip():
        return None
    if spec.use_chat_template and getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return _render_chat(tok, msgs, spec.system_prompt, where)
    return _plain_instruction(tok, prompt, response)


def _chat_sample(tok, msgs: list[dict], spec: FormatSpec, where: str):
    """chat and sharegpt: every assistant turn carries the loss."""
    if not any(m["role"] == "assistant" for m in msgs):
        return [], []  # signals "no assistant turn" to the caller, which counts it
    if not getattr(tok, "chat_template", None):
        raise DataError(f"{where}: format {spec.format!r} needs a tokenizer with a chat template; this one has none")
    return _render_chat(tok, msgs, spec.system_prompt, where)


def tokenize_record(tok, record: dict, spec: FormatSpec, where: str) -> tuple[list[int], list[int]] | None:
    """One record to (input_ids, labels); None when the record has nothing to learn from (counted by caller)."""
    c = spec.columns
    fmt = spec.format
    if fmt == "text":
        text = _as_text(_column(record, c["text"], where, fmt), where, c["text"])
        if not text.strip():
            return None
        ids = tok(text, add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        return ids, list(ids)
    if fmt == "instruction":
        prompt = _as_text(_column(record, c["prompt"], where, fmt), where, c["prompt"])
        response = _as_text(_column(record, c["response"], where, fmt), where, c["response"])
        return _instruction_sample(tok, prompt, response, spec, where)
    if fmt == "alpaca":
        instruction = _as_text(_column(record, c["instruction"], where, fmt), where, c["instruction"])
        input_ = record.get(c["input"])  # optional: absent, null (parquet) and "" all mean no input
        input_ = "" if input_ is None else _as_text(input_, where, c["input"])
        output = _as_text(_column(record, c["output"], where, fmt), where, c["output"])
        return _instruction_sample(tok, alpaca_prompt(instruction, input_), output, spec, where)
    if fmt == "chat":
        msgs = _messages(_column(record, c["messages"], where, fmt), where, c["messages"])
        return _chat_sample(tok, msgs, spec, where)
    if fmt == "sharegpt":
        msgs = _sharegpt_messages(_column(record, c["conversations"], where, fmt), spec, where, c["conversations"])
        return _chat_sample(tok, msgs, spec, where)
    raise AssertionError(f"unhandled format {fmt}")


def _answer_turns(value: object, where: str, column: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = _messages(value, where, column)
    if not turns or any(t["role"] != "assistant" for t in turns):
        raise DataError(f"{where}: column {column!r} must be a string or a list of assistant turns")
    return turns


def _preference_side(tok, prompt: object, answer: object, spec: FormatSpec, where: str, column: str):
    """(ids, labels) of the prompt followed by one answer, the answer alone carrying the loss; None if it is empty."""
    c = spec.columns
    if isinstance(prompt, list):  # the conversation so far, then the answer's assistant turn(s)
        msgs = _messages(prompt, where, c["prompt"])
        answer_turns = _answer_turns(answer, where, column)
        if not any(t["content"].strip() for t in answer_turns):
            return None
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{where}: a conversation prompt needs a tokenizer with a chat template; this one has none")
        if spec.system_prompt is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs = [{"role": "system", "content": spec.system_prompt}] + msgs
        ids, spans = _chat_prefix_ids(tok, msgs + answer_turns, where)
        labels = [IGNORE] * len(ids)
        for start, end in spans[len(spans) - len(answer_turns):]:  # earlier assistant turns are context only
            labels[start:end] = ids[start:end]
        return ids, labels
    text = _as_text(answer, where, column)
    return _instruction_sample(tok, _as_text(prompt, where, c["prompt"]), text, spec, where)


def preference_pair(tok, record: dict, spec: FormatSpec, where: str):
    """A preference record to ((chosen ids, labels), (rejected ids, labels)); None when an answer is empty."""
    c = spec.columns
    prompt = _column(record, c["prompt"], where, spec.format)
    sides = [_preference_side(tok, prompt, _column(record, c[k], where, spec.format), spec, where, c[k])
             for k in ("chosen", "rejected")]
    return None if any(s is None for s in sides) else tuple(sides)


def _fit(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Truncated to max_length; whether it was."""
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def _has_target(labels) -> bool:
    # A causal LM predicts token t+1 from t: the first label is never a target, so at least one later one must be.
    return any(lab != IGNORE for lab in labels[1:])


def _pair_example(tok, record: dict, spec: FormatSpec, where: str, stats: FormatStats) -> Example | None:
    """One preference pair as an Example (chosen then rejected, `split` between); None when dropped (counted)."""
    pair = preference_pair(tok, record, spec, where)
    if pair is None:
        stats.dropped_empty += 1
        return None
    (ci, cl), (ri, rl) = pair
    if spec.too_long == "drop" and max(len(ci), len(ri)) > spec.max_length:
        stats.dropped_too_long += 1
        return None
    (ci, cl, cut_c), (ri, rl, cut_r) = _fit(ci, cl, spec.max_length), _fit(ri, rl, spec.max_length)
    if not (_has_target(cl) and _has_target(rl)):
        stats.dropped_no_target += 1
        return None
    stats.truncated += cut_c or cut_r
    return Example(np.asarray(ci + ri, np.int32), np.asarray(cl + rl, np.int32), split=len(ci))


def desirable_label(value: object, where: str, column: str) -> int:
    """1 for a desirable completion, 0 for an undesirable one: true/false, 1/0, or those words as text."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return int(value.strip().lower() in ("true", "1"))
    raise DataError(f"{where}: column {column!r} must say whether the completion is desirable (true or false), "
                    f"got {value!r}")


def _unpaired_example(tok, record: dict, previous: dict, spec: FormatSpec, where: str,
                      stats: FormatStats) -> Example | None:
    """A KTO example: the record's prompt and completion, then its prompt with `previous`'s completion (KTO's
    mismatched pair, as TRL builds it: completions rotated by one); None when dropped (counted)."""
    c = spec.columns
    prompt = _column(record, c["prompt"], where, spec.format)
    label = desirable_label(_column(record, c["label"], where, spec.format), where, c["label"])
    own = _preference_side(tok, prompt, _column(record, c["completion"], where, spec.format), spec, where,
                           c["completion"])
    other = _preference_side(tok, prompt, _column(previous, c["completion"], where, spec.format), spec, where,
                             c["completion"])
    if own is None or other is None:
        stats.dropped_empty += 1
        return None
    if spec.too_long == "drop" and len(own[0]) > spec.max_length:
        stats.dropped_too_long += 1
        return None
    (oi, ol, cut), (mi, ml, _) = _fit(*own, spec.max_length), _fit(*other, spec.max_length)
    if not (_has_target(ol) and _has_target(ml)):
        stats.dropped_no_target += 1
        return None
    stats.truncated += cut
    return Example(np.asarray(oi + mi, np.int32), np.asarray(ol + ml, np.int32), split=len(oi), desirable=label)


def int_label(value: object) -> int | None:
    """An integer label written as an integer or as decimal digits ("3", " -1"); None otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdecimal():  # not isdigit: int("²") fails
        try:
            return int(value)
        except ValueError:
            return None
    return None


def class_index(value: object, spec: FormatSpec, where: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: label {value!r} is a boolean; use a class name or an integer")
    names = spec.label_names and spec.label_names != [str(i) for i in range(len(spec.label_names))]
    if names and int_label(value) is not None:
        # The training labels are class names: a number would silently pick the name at that index.
        raise DataError(f"{where}: label {value!r} is a number but the training data's labels are class names "
                        f"({', '.join(spec.label_names[:5])}{', ...' if len(spec.label_names) > 5 else ''}); "
                        "write the class name")
    if isinstance(value, (int, np.integer)) or (isinstance(value, str) and int_label(value) is not None
                                                 and not spec.label_names):
        idx = int(value)
        limit = spec.num_labels if spec.num_labels is not None else len(spec.label_names) or None
        if idx < 0 or (limit is not None and idx >= limit):
            raise DataError(f"{where}: label {idx} is outside 0..{(limit or 1) - 1}; fix the data or raise "
                            "model.num_labels")
        return idx
    if isinstance(value, str):
        if value not in spec.label_names:
            raise DataError(f"{where}: label {value!r} does not occur in the training data's labels "
                            f"({len(spec.label_names)} classes); fix the label")
        return spec.label_names.index(value)
    raise DataError(f"{where}: label must be a class name or an integer, got {type(value).__name__}")


def tokenize_records(tok, records: list[dict], spec: FormatSpec, source: str) -> tuple[list[Example], FormatStats]:
    stats = FormatStats(records=len(records))
    examples: list[Example] = []
    for n, record in enumerate(records):
        watchdog.beat()  # progress, for peers waiting on this rank (distributed/rendezvous.py)
        where = getattr(record, "origin", None) or f"{source} record {n + 1}"
        if spec.format == "classification":
            text = _as_text(_column(record, spec.columns["text"], where, "classification"), where,
                            spec.columns["text"])
            label = class_index(_column(record, spec.columns["label"], where, "classification"), spec, where)
            if not text.strip():
                stats.dropped_empty += 1
                continue
            ids = tok(text, add_special_tokens=True)["input_ids"]
            if len(ids) > spec.max_length:
                if spec.too_long == "drop":
                    stats.dropped_too_long += 1
                    continue
                stats.truncated += 1
                ids = ids[: spec.max_length]
            examples.append(Example(np.asarray(ids, np.int32), np.asarray([label], np.int32), True))
            continue
        if spec.format in ("preference", "unpaired_preference"):
            ex = (_pair_example(tok, record, spec, where, stats) if spec.format == "preference" else
                  _unpaired_example(tok, record, records[n - 1], spec, where, stats))
            if ex is not None:
                examples.append(ex)
            continue
        out = tokenize_record(tok, record, spec, where)
        if out is None:
            stats.dropped_empty += 1
            continue
        ids, labels = out
        if not ids:
            stats.dropped_no_assistant += 1
            continue
        if len(ids) > spec.max_length:
            if spec.too_long == "drop":
                stats.dropped_too_long += 1
                continue
            ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        # A causal LM predicts token t+1 from t: the first label is never a target, so at least one later one must be.
        if not any(lab != IGNORE for lab in labels[1:]):
            stats.dropped_no_target += 1
            continue
        if len(out[0]) > spec.max_length:  # counted once: a record truncated to no target is a dropped one
            stats.truncated += 1
        examples.append(Example(np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
    stats.kept = len(examples)
    return examples, stats
