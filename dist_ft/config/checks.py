"""Cross-field checks: what one part of a recipe requires of another. Each message names the fields and the fix.

What a backend refuses is not here but in its spec (distributed/<backend>/__init__.py), read through spec_problems.
"""

from __future__ import annotations

import difflib

from ..distributed.spec import spec_problems
from .schema import PREFERENCE_FORMATS, PROMPT_FORMATS, PartialConfig, Recipe, data_sources, source_format


def _cross_checks(r: Recipe) -> list[str]:
    """Checks that need more than one field. Each message names the fields and the fix."""
    p = []
    if r.model.task == "sequence_classification" and r.data.format != "classification":
        p.append("data.format: model.task is sequence_classification, so data.format must be classification")
    if r.data.format == "classification" and r.model.task not in CLASSIFIER_TASKS:
        p.append("model.task: data.format is classification, so model.task must be sequence_classification (text) "
                 "or image_classification (images)")
    if r.data.packing and r.data.format == "classification":
        p.append("data.packing: packing applies to causal_lm data; set it to false for classification")
    if r.training.warmup_steps > r.training.max_steps:
        p.append(f"training.warmup_steps: {r.training.warmup_steps} is more than training.max_steps "
                 f"({r.training.max_steps}); lower it")
    if r.training.early_stopping_patience and not r.training.eval_every:
        p.append("training.early_stopping_patience: needs periodic evaluation; set training.eval_every > 0")
    if r.data.eval is None and r.data.eval_fraction == 0 and r.training.eval_every:
        p.append("training.eval_every: no evaluation data; set data.eval or data.eval_fraction > 0")
    p += _seq2seq_checks(r)
    p += _image_checks(r)
    p += _method_checks(r)
    p += _objective_checks(r)
    p += _fused_loss_checks(r)
    p += _compile_checks(r)
    p += _eval_checks(r)
    p += _data_checks(r)
    if r.method.kind in ("lora", "qlora") and isinstance(r.method.lora.target_modules, list) \
            and not r.method.lora.target_modules:
        p.append("method.lora.target_modules: empty list; name modules (e.g. [q_proj, v_proj]) or use all-linear")
    p += spec_problems(r)  # what the chosen backend refuses (distributed/<backend>/__init__.py)
    if r.training.stop_after_steps and not r.checkpoint.every_steps:
        p.append("training.stop_after_steps: the run would stop without a checkpoint to resume from; set "
                 "checkpoint.every_steps (the stop writes one too)")
    if r.checkpoint.every_steps and r.checkpoint.every_steps > r.training.max_steps:
        p.append(f"checkpoint.every_steps: {r.checkpoint.every_steps} is more than training.max_steps "
                 f"({r.training.max_steps}), so no checkpoint would be written; lower it")
    if r.model.attn_implementation in ("flash_attention_2", "flash_attention_3") \
            and r.distributed.precision == "fp32":
        p.append(f"model.attn_implementation: {r.model.attn_implementation} needs bf16 or fp16 weights; set "
                 "distributed.precision to bf16-mixed, or use sdpa")
    return p


SEQ2SEQ_METHODS = ("full", "lora")  # what seq2seq_lm is tested with (tests/test_seq2seq.py)


def _seq2seq_checks(r: Recipe) -> list[str]:
    """What an encoder-decoder (model.task: seq2seq_lm) needs: prompt/answer data, unpacked, and the methods it is
    tested with."""
    if r.model.task != "seq2seq_lm":
        return []
    p, d = [], r.data
    formats = sorted({source_format(d, s) for s in data_sources(d)} - set(PROMPT_FORMATS))
    if formats:
        p.append(f"data.format: model.task seq2seq_lm reads a prompt (the encoder's input) and an answer (the "
                 f"decoder's targets); {', '.join(formats)} data has no such pair: use "
                 + ", ".join(PROMPT_FORMATS))
    if d.packing:
        p.append("data.packing: an encoder-decoder's prompt and answer are two sequences, which are not packed; set "
                 "data.packing: false")
    if d.streaming:
        p.append("data.streaming: seq2seq_lm data is read in memory; set data.streaming: false")
    if r.method.kind not in SEQ2SEQ_METHODS:
        p.append(f"method.kind: {r.method.kind} is not supported with model.task seq2seq_lm yet; use "
                 + " or ".join(SEQ2SEQ_METHODS))
    if r.training.neftune_alpha is not None:
        p.append("training.neftune_alpha: NEFTune is not supported with model.task seq2seq_lm yet (an encoder-decoder "
                 "shares one embedding between encoder and decoder inputs); remove it")
    return p


CLASSIFIER_TASKS = ("sequence_classification", "image_classification")
IMAGE_METHODS = ("full", "lora", "partial")  # what image_classification is tested with (test_image_classification.py)


def _image_checks(r: Recipe) -> list[str]:
    """What an image classifier (model.task: image_classification) needs: one source of images and labels, read in
    memory, and the methods it is tested with."""
    from .schema import AugmentConfig
    if r.model.task != "image_classification":
        return [] if r.data.augment == AugmentConfig() else [
            f"data.augment: image augmentations apply to model.task image_classification (task is {r.model.task}); "
            "remove data.augment"]
    p, d = [], r.data
    if d.format != "classification":
        p.append("data.format: model.task image_classification reads an image and a label per record; set "
                 "data.format: classification")
    for name, value in (("data.train", d.train), ("data.eval", d.eval)):
        if isinstance(value, list):
            p.append(f"{name}: image_classification reads one source (a folder of class folders, or a file of "
                     "images and labels), not a mixture; give one path")
    if d.streaming:
        p.append("data.streaming: images are read in memory; set data.streaming: false")
    if d.packing:
        p.append("data.packing: images are not sequences to pack; set data.packing: false")
    if d.dedup != "none" or d.balance not in ("none", "class_weights"):
        p.append(f"data.dedup / data.balance: not supported for images yet (dedup {d.dedup}, balance {d.balance}); "
                 "set data.dedup: none and data.balance: none or class_weights")
    if r.method.kind not in IMAGE_METHODS:
        p.append(f"method.kind: {r.method.kind} is not supported with model.task image_classification; use "
                 + ", ".join(IMAGE_METHODS))
    if r.training.neftune_alpha is not None:
        p.append("training.neftune_alpha: NEFTune adds noise to token embeddings, which an image model has none "
                 "of; remove it")
    if r.eval.forgetting is not None:
        p.append("eval.forgetting: measures a language model's loss on general text; remove it for "
                 "image_classification")
    wanted = [m for m in r.eval.metrics if m not in ("accuracy", "f1", "confusion")]
    if wanted:
        p.append(f"eval.metrics: {', '.join(wanted)} score generated text; an image classifier reports accuracy, "
                 "f1 and confusion")
    return p


def _data_checks(r: Recipe) -> list[str]:
    p, d = [], r.data
    sources = data_sources(d)
    if isinstance(d.train, list):
        if not d.train:
            p.append("data.train: an empty list; give a path or at least one source {path: ..., weight: ...}")
        for i, s in enumerate(d.train):
            if not s.path:
                p.append(f"data.train[{i}].path: missing; give a file, folder or builtin:NAME")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            p.append("data.train: two sources have the same name; set data.train[i].name to tell them apart")
    formats = {source_format(d, s) for s in sources}
    if "classification" in formats and len(formats) > 1:
        p.append("data.train: classification sources cannot be mixed with text/instruction/alpaca/chat/sharegpt "
                 "sources")
    sg = d.sharegpt
    named = [(n, role) for role in ("user", "assistant", "system") for n in getattr(sg, role)]
    for name in sorted({n for n, _ in named}):
        roles = [role for n, role in named if n == name]
        if len(roles) > 1:
            p.append(f"data.sharegpt: {name!r} is listed under {' and '.join(roles)}; keep it under one")
    if d.balance != "none" and d.format != "classification":
        p.append(f"data.balance: {d.balance} balances classes, which only classification data has; set it to none")
    if d.streaming:
        if d.eval is None:
            p.append("data.streaming: a stream cannot hold out evaluation data; set data.eval to a file")
        if len(sources) > 1:
            p.append("data.streaming: one streamed source at a time; mix sources in memory (streaming: false)")
        if d.dedup != "none" or d.balance != "none":
            p.append("data.streaming: dedup and balance need every record at once; run them when writing the "
                     "shards, or set streaming: false")
        if d.format == "classification":
            p.append("data.streaming: for language-model data (text, instruction, alpaca, chat, sharegpt); "
                     "classification sets fit in memory")
    return p


def reported_metrics(r: Recipe) -> set[str]:
    """The scalar metrics an evaluation of this recipe reports (what keep_best and sweeps may aim at)."""
    e, known = r.eval, {"eval_loss", "eval_perplexity"}
    if r.data.format == "classification":
        known |= {"eval_accuracy", "eval_f1"}
    if "exact_match" in e.metrics:
        known.add("eval_exact_match")
    if "rouge" in e.metrics:
        known |= {"eval_rouge1", "eval_rouge2", "eval_rougeL"}
    if "bleu" in e.metrics:
        known.add("eval_bleu")
    if e.forgetting is not None:
        known |= {"eval_forgetting_loss", "eval_forgetting_delta"}
    return known


def _eval_checks(r: Recipe) -> list[str]:
    from ..train.scores import CLASSIFICATION_METRICS, GENERATION_METRICS, METRICS

    p, e, c = [], r.eval, r.checkpoint
    for m in e.metrics:
        if m not in METRICS:
            close = difflib.get_close_matches(m, METRICS, n=1)
            p.append(f"eval.metrics: unknown metric {m!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                     + f" (known: {', '.join(METRICS)}; loss and perplexity are always reported)")
        elif m in CLASSIFICATION_METRICS and r.data.format != "classification":
            p.append(f"eval.metrics: {m} needs classification data (data.format is {r.data.format}); use "
                     "exact_match, rouge or bleu for generated answers")
        elif m in GENERATION_METRICS and r.data.format not in PROMPT_FORMATS:
            p.append(f"eval.metrics: {m} scores answers generated for prompts, which {r.data.format} data has not; "
                     "use data.format " + ", ".join(PROMPT_FORMATS) + (", or accuracy/f1 for classification"
                                                              if r.data.format == "classification" else ""))
    if e.forgetting is not None and r.model.task != "causal_lm":
        p.append("eval.forgetting: measures language-model loss on general text; model.task is "
                 f"{r.model.task}, so remove it")
    if c.keep_best is not None:
        known = reported_metrics(r)
        if c.keep_best not in known:
            p.append(f"checkpoint.keep_best: {c.keep_best} is not reported by this recipe; choose one of "
                     f"{', '.join(sorted(known))} (generation metrics need eval.metrics)")
        if not r.training.eval_every:
            p.append("checkpoint.keep_best: needs evaluations during training; set training.eval_every > 0")
    if c.final == "best" and c.keep_best is None:
        p.append("checkpoint.final: best needs checkpoint.keep_best (the metric that decides what is best)")
    return p


def _method_checks(r: Recipe) -> list[str]:
    """What a method needs of the rest of the recipe (what a backend refuses is in its spec)."""
    p, m = [], r.method
    if m.kind in ("prompt_tuning", "prefix_tuning"):
        if r.data.packing:
            p.append(f"data.packing: {m.kind} prepends virtual tokens to every row, which breaks the per-sample "
                     "positions of packed rows; set data.packing: false")
    if m.kind == "prefix_tuning" and r.distributed.activation_checkpointing:
        p.append("distributed.activation_checkpointing: prefix_tuning feeds past key/values that recomputation "
                 "does not replay; set it to false")
    pc = m.partial
    if m.kind == "partial":
        if not (pc.last_blocks or pc.head or pc.embeddings or pc.bias_only or pc.unfreeze_every_steps
                or pc.unfreeze_every_epochs):
            p.append("method.partial: nothing would be trained; set last_blocks, head, embeddings or bias_only")
        if pc.unfreeze_every_steps and pc.unfreeze_every_epochs:
            p.append("method.partial: set unfreeze_every_steps or unfreeze_every_epochs, not both")
    elif pc != PartialConfig():
        p.append(f"method.partial: only used with method.kind: partial (kind is {m.kind}); remove it")
    return p


PAIRED_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_OBJECTIVES = ("dpo", "ipo", "kto")
ADAPTER_OFF_METHODS = ("lora", "qlora", "ia3")  # peft switches these off in place: the base model is the reference


def _objective_checks(r: Recipe) -> list[str]:
    """What a preference objective needs of the data, the method and the rest of the recipe."""
    o, d, p = r.objective, r.data, []
    if o.kind == "sft":
        if d.format in PREFERENCE_FORMATS:
            p.append(f"objective.kind: data.format {d.format} holds answers to prefer, for a preference objective; "
                     "set objective.kind: " + ("kto" if d.format == "unpaired_preference" else "dpo (or ipo, simpo, "
                                               "orpo)"))
        return p
    if r.model.task != "causal_lm":
        p.append(f"objective.kind: {o.kind} trains a causal LM; set model.task: causal_lm")
    if o.kind == "kto":
        if d.format != "unpaired_preference":
            p.append("data.format: objective.kind kto trains on answers labelled desirable or not; set data.format: "
                     "unpaired_preference (records with prompt, completion and label true/false)"
                     + (", or use dpo for pairs" if d.format == "preference" else ""))
    elif d.format != "preference":
        p.append(f"data.format: objective.kind {o.kind} trains on preference pairs; set data.format: preference "
                 "(records with prompt, chosen and rejected)")
    if d.packing and o.kind == "kto":
        p.append("data.packing: kto examples are not packed (their KL sequences are batch-wise); set it to false")
    if d.streaming:
        p.append(f"data.streaming: objective.kind {o.kind} reads its pairs in memory; set data.streaming: false")
    if o.kind != "kto" and (o.kto_desirable_weight != 1.0 or o.kto_undesirable_weight != 1.0):
        p.append(f"objective.kto_desirable_weight, kto_undesirable_weight: only used with objective.kind kto (kind "
                 f"is {o.kind}); remove them")
    if o.label_smoothing and o.kind != "dpo":
        p.append(f"objective.label_smoothing: only used with objective.kind dpo (kind is {o.kind}); remove it")
    if o.kind in REFERENCE_OBJECTIVES:
        if o.reference == "adapter_off" and r.method.kind not in ADAPTER_OFF_METHODS:
            p.append(f"objective.reference: adapter_off needs an adapter method ({', '.join(ADAPTER_OFF_METHODS)}); "
                     f"method.kind is {r.method.kind}: use reference: precomputed (or auto)")
    elif o.reference != "auto":
        p.append(f"objective.reference: {o.kind} needs no reference policy; remove it")
    return p


def _fused_loss_checks(r: Recipe) -> list[str]:
    """training.fused_loss fuses a causal LM's output head with its token cross-entropy (train/fused_loss.py);
    whether the model's own head allows it is checked once it is built."""
    if not r.training.fused_loss:
        return []
    p = []
    if r.model.task != "causal_lm":
        p.append(f"training.fused_loss: fuses a causal LM's output head with its token loss; model.task "
                 f"{r.model.task} has none to fuse: set it to false")
    if r.method.kind in ("prompt_tuning", "prefix_tuning"):
        p.append(f"training.fused_loss: method.kind {r.method.kind} shifts the positions the fused head is given: "
                 "set it to false")
    return p


def _compile_checks(r: Recipe) -> list[str]:
    """training.compile (distributed/compile.py): per-block compile before the backend wraps the model (a backend
    that cannot says so in its spec's refusals)."""
    if not r.training.compile:
        return []
    p = []
    if r.method.kind == "qlora":
        p.append("training.compile: method.kind qlora is not supported: bitsandbytes' 4-bit weights are not "
                 "traceable by torch.compile; set training.compile: false")
    return p
