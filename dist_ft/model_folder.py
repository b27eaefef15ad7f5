"""Does the model folder fit the recipe? Checked before any work (preflight, so `dist-ft check` and `dist-ft train`
before a process group or a model exists), from config.json and the tokenizer alone: never the weights.

- every token id the data pipeline can produce (the tokenizer's vocabulary and added tokens, the EOS it appends,
  the pad id it fills batches with) is a row of the model's embedding (config vocab_size): else the first forward
  ends in "IndexError: index out of range in self";
- the special tokens the data format needs: an EOS for a causal LM or an encoder-decoder (each sample or answer ends
  with one, so that the model learns to stop); a chat template for chat and sharegpt data, and one that renders a
  conversation (not for an encoder-decoder, whose encoder reads the turns as plain lines);
- data.max_length within the model's positions (max_position_embeddings);
- model.task against the architecture: seq2seq_lm needs an encoder-decoder (config.json is_encoder_decoder), and
  causal_lm cannot take one.

    from dist_ft.model_folder import model_folder_problems
    model_folder_problems(recipe)  # [] when the folder fits
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Recipe, data_sources, eval_sources, source_format

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
_CHAT_FORMATS = ("chat", "sharegpt")


def _folder(recipe: Recipe) -> Path | None:
    """The local folder behind model.path, without converting anything (None: not there yet)."""
    from .assets import ALIASES, BUILT_ON_FIRST_USE, cache_root, is_alias

    name = recipe.model.path
    if not is_alias(name):
        return Path(name)
    if name in BUILT_ON_FIRST_USE:  # converted from GGUF (or built) on first use; checked once it has been
        folder = cache_root() / "models" / name
        return folder if (folder / ".complete").exists() else None
    try:
        return ALIASES[name]()
    except FileNotFoundError:
        return None


def _text_config(config: dict) -> dict:
    # Multimodal configs keep the language model's sizes under text_config.
    return config["text_config"] if isinstance(config.get("text_config"), dict) and "vocab_size" not in config \
        else config


def model_folder_problems(recipe: Recipe, tok=None) -> list[str]:
    """Each way the model folder and its tokenizer do not fit the recipe, with the fix; [] when they do."""
    folder = _folder(recipe)
    if folder is None or not (folder / "config.json").is_file():
        return []  # model_problems reports a missing folder or config
    where = f"model.path: {recipe.model.path}" + (f" ({folder})" if str(folder) != recipe.model.path else "")
    try:
        config = _text_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        return [f"{where}: config.json is not readable JSON ({exc}); restore it from the model's source"]
    problems = _task_problems(recipe, config, where)
    if recipe.model.task == "image_classification":  # no tokenizer: an image processor, and an image model
        return problems + _image_problems(folder, config, where)
    positions = next((config[k] for k in _POSITION_KEYS if isinstance(config.get(k), int)), None)
    if positions is not None and recipe.data.max_length > positions:
        problems.append(f"data.max_length: {recipe.data.max_length} is beyond the model's {positions} positions "
                        f"({where}, config.json max_position_embeddings); set data.max_length: {positions} or less")
    if tok is None:
        from .model import load_tokenizer
        try:
            tok = load_tokenizer(folder, trust_remote_code=recipe.model.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the folder's problem, named here
            return problems + [f"{where}: its tokenizer does not load ({type(exc).__name__}: {exc}); the folder "
                               "needs the tokenizer files saved with the model (tokenizer.json, tokenizer_config.json)"]
    problems += _id_problems(tok, config.get("vocab_size"), where)
    problems += _format_problems(recipe, tok, where)
    problems += _fused_loss_problems(recipe, config, where)
    return problems


def _fused_loss_problems(recipe: Recipe, config: dict, where: str) -> list[str]:
    """training.fused_loss returns the loss in place of the head's output: a model that transforms that output
    (soft-capping, scaling) before returning it cannot fuse."""
    from .train.fused_loss import LOGIT_TRANSFORMS

    if not recipe.training.fused_loss:
        return []
    found = [k for k in LOGIT_TRANSFORMS if config.get(k) not in (None, 1, 1.0)]
    return [f"training.fused_loss: {where} transforms its logits after the head (config.json {found[0]}: "
            f"{config[found[0]]}), which the fused loss does not reproduce; set training.fused_loss: false"] \
        if found else []


def _task_problems(recipe: Recipe, config: dict, where: str) -> list[str]:
    """seq2seq_lm needs an encoder-decoder folder, and a causal LM cannot be one (a classifier can: BART's)."""
    enc_dec = bool(config.get("is_encoder_decoder"))
    task = recipe.model.task
    if task == "seq2seq_lm" and not enc_dec:
        return [f"model.task: seq2seq_lm needs an encoder-decoder model (T5, BART, ...), and {where} is not one "
                f"(config.json model_type {config.get('model_type')!r}, no is_encoder_decoder); use causal_lm for a "
                "decoder-only model"]
    if task == "causal_lm" and enc_dec:
        return [f"model.task: {where} is an encoder-decoder model ({config.get('model_type')!r}); set model.task: "
                "seq2seq_lm"]
    return []


def _image_problems(folder: Path, config: dict, where: str) -> list[str]:
    """image_classification needs an image model (one AutoModelForImageClassification builds) and the folder's image
    processor, which says how its images are sized and normalised."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as IMAGE_MODELS

    kind = config.get("model_type")
    if kind not in IMAGE_MODELS:
        return [f"model.task: image_classification needs an image model (ViT, ResNet, ConvNeXt, ... any "
                f"AutoModelForImageClassification), and {where} is a {kind!r} model; choose an image model's folder"]
    if not (folder / "preprocessor_config.json").is_file():
        return [f"{where}: no preprocessor_config.json; the folder needs its image processor (how images are "
                "resized and normalised), saved with the model (image_processor.save_pretrained(folder))"]
    return []


def _id_problems(tok, rows, where: str) -> list[str]:
    if not isinstance(rows, int):
        return []
    ids = {"the largest token id": max(len(tok), max(tok.get_vocab().values(), default=-1) + 1) - 1}
    for name in ("eos", "pad", "bos"):
        i = getattr(tok, f"{name}_token_id", None)
        if isinstance(i, int):
            ids[f"its {name.upper()} token ({getattr(tok, f'{name}_token')!r}, appended by the data pipeline)"
                if name != "bos" else f"its BOS token ({tok.bos_token!r})"] = i
    over = {what: i for what, i in ids.items() if i >= rows}
    if not over:
        return []
    # Name the special token the pipeline appends when it is the one beyond (it is the id that will be looked up).
    what, i = max(over.items(), key=lambda kv: (kv[1], not kv[0].startswith("the largest")))
    return [f"{where}: the tokenizer has {len(tok)} tokens and {what} is id {i}, but the model's embedding has "
            f"{rows} rows (config.json vocab_size): training would end in 'index out of range' at the first forward; "
            f"use the tokenizer saved with the model, or resize the embedding to {max(over.values()) + 1} rows "
            "(model.resize_token_embeddings(len(tokenizer)), then save_pretrained) and train from that folder"]


def _format_problems(recipe: Recipe, tok, where: str) -> list[str]:
    problems = []
    d = recipe.data
    formats = {source_format(d, s) for s in data_sources(d) + eval_sources(d)}
    if recipe.model.task in ("causal_lm", "seq2seq_lm") and tok.eos_token_id is None \
            and formats - {"classification"}:
        problems.append(f"{where}: the tokenizer has no EOS token, which every {recipe.model.task} sample (or answer) "
                        "ends with (so that the model learns to stop); set eos_token in the folder's "
                        "tokenizer_config.json to the model's end-of-text token")
    if recipe.model.task == "seq2seq_lm":  # conversations go to the encoder as plain "role: content" lines
        return problems
    chat = sorted(formats & set(_CHAT_FORMATS))
    if not chat:
        return problems
    if not getattr(tok, "chat_template", None):
        problems.append(f"data.format: {chat[0]} renders conversations through the tokenizer's chat template, and "
                        f"{where} has none; use a model folder whose tokenizer_config.json has a chat_template, or "
                        "data.format: instruction (rendered without one)")
        return problems
    turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    try:
        whole = tok.apply_chat_template(turns, tokenize=False)
        start = tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render is the problem reported
        problems.append(f"{where}: its chat template cannot render a user turn and an assistant turn "
                        f"({type(exc).__name__}: {exc}); fix the template or use data.format: instruction")
        return problems
    if not whole.startswith(start) or "Hi" not in whole[len(start):]:
        problems.append(f"{where}: its chat template does not render a conversation's beginning as the beginning of "
                        "its text, so the answer tokens cannot be found for data.format: "
                        f"{chat[0]}; use a template without history rewriting or data.format: text")
    return problems
