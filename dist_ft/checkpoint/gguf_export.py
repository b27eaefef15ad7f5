"""`dist-ft export SOURCE OUT.gguf --format gguf [--quant q8_0]`: one GGUF file for llama.cpp and Ollama.

The model is rebuilt exactly as `dist-ft export` rebuilds it (a checkpoint, a run's final/, or a plain Hugging Face
folder), a LoRA adapter is merged into its base, and the result is written with the `gguf` package's writer under
llama.cpp's tensor names (`gguf.get_tensor_name_map`). Two things are ours, not the package's:

- llama.cpp's Llama graph applies rotary embeddings to interleaved pairs, Hugging Face's to the two halves of each
  head; its converter therefore reorders the rows of q_proj and k_proj per head (`_permute`), and every GGUF reader
  (transformers' included) undoes it. Qwen2 uses the halves layout in llama.cpp too, so its rows stay as they are.
- The tokenizer goes into the metadata as llama.cpp spells it: byte-level BPE (SmolLM2, Qwen2, the test models) as
  `gpt2` with its merges and the pre-tokenizer named, a sentencepiece-style BPE (Llama 2, Mistral) as `llama` with
  scores; special ids, add-BOS/EOS and the chat template with them.

Quantisation is the package's numpy reference code (`gguf.quants.quantize`): norms and other 1-D tensors stay F32,
as llama.cpp keeps them. Measured tolerances: docs/checkpoints.md ("GGUF"); tests/test_gguf_export.py reads every file
back with transformers' own GGUF loader and compares logits.

    dist-ft export runs/smollm2-lora runs/smollm2-lora.gguf --format gguf --quant q8_0
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # Hugging Face model_type -> GGUF architecture
QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # those gguf.quants can write
_WIDE = ("token_embd", "output")  # tensors kept at q8_0 under a q4/q5 type
_PERMUTED = {"llama"}  # GGUF architectures whose q/k rows llama.cpp's rotary layout reorders
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}
# Hugging Face pre-tokenizer regexes -> llama.cpp's `tokenizer.ggml.pre` names (llama.cpp's llama-vocab.cpp).
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+": "qwen2",
}


class GGUFExportError(ValueError):
    """A request this exporter cannot honour; raised before anything is loaded or written."""


@dataclass
class GGUFResult:
    path: Path
    arch: str
    quant: str
    tensors: int
    kept_f16: list[str] = field(default_factory=list)  # 2-D tensors whose rows do not split into quant blocks
    modelfile: Path | None = None


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant: {quant!r} is not supported; choose one of {', '.join(QUANTS)} (the types "
                              "the gguf package can quantise to; k-quants need llama.cpp's llama-quantize)")


def check_config(cfg: dict, *, where: str = "config.json") -> str:
    """The GGUF architecture for a model's config.json, or a GGUFExportError naming the field that rules it out."""
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        raise GGUFExportError(f"{where}: model_type {model_type!r} is not supported for GGUF export; supported: "
                              f"{', '.join(ARCHS)} (Llama-family decoders: SmolLM2, Llama, Qwen2, Mistral)")
    arch_names = cfg.get("architectures") or []
    if any(not a.endswith("ForCausalLM") for a in arch_names):
        raise GGUFExportError(f"{where}: architectures {arch_names} - only a causal LM (*ForCausalLM) can be exported "
                              "to GGUF, not a classifier head")
    rope = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise GGUFExportError(f"{where}: rope_scaling type {rope_type!r} is not supported for GGUF export yet; "
                              "supported: none (default rotary embeddings)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key) and model_type != "qwen2":
            raise GGUFExportError(f"{where}: {key}: true is not supported for {model_type} GGUF export; "
                                  "supported: false (llama.cpp's Llama graph reads no such biases)")
    return ARCHS[model_type]


def source_config(source: str | Path) -> tuple[dict, str]:
    """(config.json of the model `source` holds or trains, where it came from), without loading any weights."""
    from ..assets import resolve_model_path
    from .export import _recipe_for, resolve_source

    kind, folder = resolve_source(Path(source))
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text()), str(folder / "config.json")
    recipe = _recipe_for(kind, folder)
    if recipe.model.task != "causal_lm":
        raise GGUFExportError(f"model.task: {recipe.model.task!r} cannot be exported to GGUF; supported: causal_lm")
    path = resolve_model_path(recipe.model.path) / "config.json"
    return json.loads(path.read_text()), str(path)


def load_for_gguf(source: str | Path):
    """(model with any LoRA merged, tokenizer) on CPU; a plain Hugging Face folder needs no recipe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import load_trained, resolve_source

    kind, folder = resolve_source(Path(source))
    has_recipe = (folder / "recipe.yaml" if kind == "checkpoint" else folder.parent / "config.yaml").is_file()
    if kind == "final" and (folder / "config.json").is_file() and not has_recipe:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    model, tok = load_trained(source)
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    return model.eval(), tok


def export_gguf(source: str | Path, out: str | Path, *, quant: str = "f16", modelfile: bool = True) -> GGUFResult:
    """Check the request, rebuild and merge the model, write OUT (a .gguf file) and an Ollama Modelfile beside it."""
    out = Path(out)
    check_quant(quant)
    if out.suffix != ".gguf":
        raise GGUFExportError(f"OUT: {out} should be a file name ending in .gguf")
    if out.exists():
        raise FileExistsError(f"{out}: already exists; choose a new file name (nothing was written)")
    cfg, where = source_config(source)
    check_config(cfg, where=where)
    model, tok = load_for_gguf(source)
    result = write_gguf(model, tok, out, quant=quant, name=Path(source).resolve().name)
    if modelfile:
        result.modelfile = write_modelfile(out, tok)
    return result


def write_gguf(model, tokenizer, out: str | Path, *, quant: str = "f16", name: str | None = None) -> GGUFResult:
    """Write `model` (a transformers causal LM, LoRA already merged) and `tokenizer` to the GGUF file `out`."""
    import gguf

    check_quant(quant)
    cfg = model.config.to_dict()
    arch = check_config(cfg, where=f"{type(model).__name__}.config")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    name = name or out.stem
    # transformers' GGUF reader takes a file named exactly "mistral" for a separate architecture it cannot map
    writer.add_name(f"{name}-{quant}" if name.lower() == "mistral" else name)
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[quant]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, cfg)
    _add_vocab(writer, tokenizer, vocab_size=cfg["vocab_size"])
    count, kept = 0, []
    for gguf_name, array, dtype in _tensors(model, cfg, arch, quant, kept):
        writer.add_tensor(gguf_name, array, raw_dtype=dtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return GGUFResult(path=out, arch=arch, quant=quant, tensors=count, kept_f16=kept)


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def _add_hparams(writer, cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    if head_dim != cfg["hidden_size"] // heads:  # Mistral-Nemo-style heads wider than hidden/heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _permute(w, n_head: int):
    """llama.cpp's row order for one of q_proj/k_proj (`n_head` its own head count): per head, the two rotary halves
    interleaved. Its inverse is what transformers' GGUF loader applies when it reads the file back."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, cfg: dict, arch: str, quant: str, kept: list[str]):
    """(GGUF name, array, GGML type) for every weight, q/k permuted where the architecture needs it."""
    import gguf
    import numpy as np

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg["num_hidden_layers"])
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # a file with no output.weight is read as tied, by llama.cpp and by transformers
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise GGUFExportError(f"{hf_name}: no GGUF tensor name for it in gguf's {arch} map")
        data = tensor.detach().float().cpu().numpy()
        if arch in _PERMUTED and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            data = _permute(data, heads if base.endswith("q_proj") else kv_heads)
        # As llama.cpp's q4/q5 presets do: the embedding (and a tied head with it) keeps 8 bits
        own = gguf.GGMLQuantizationType.Q8_0 if quant[:2] in ("q4", "q5") and gguf_name in _WIDE else qtype
        yield f"{gguf_name}.{suffix}", *_encode(data, own, f"{gguf_name}.{suffix}", kept, np)


def _encode(data, qtype, name: str, kept: list[str], np):
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == Q.F32:
        return data.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return data.astype(np.float16), Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        kept.append(name)  # as llama.cpp's converter does: a row that does not split into blocks stays F16
        return data.astype(np.float16), Q.F16
    return gguf.quants.quantize(data, qtype), qtype


def _token_table(tok, vocab_size: int, *, sentencepiece: bool) -> tuple[list[str], list[int]]:
    """Every id's token and llama.cpp token type; ids the tokenizer lacks (a padded embedding) become [PADn]."""
    import gguf

    T = gguf.TokenType
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise GGUFExportError(f"tokenizer: {len(by_id)} tokens but the model's vocab_size is {vocab_size}")
    added = getattr(tok, "added_tokens_decoder", {})
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        tokens.append(token)
        if i == tok.unk_token_id and sentencepiece:
            types.append(T.UNKNOWN)
        elif i in added:
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    return tokens, [int(t) for t in types]


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer (how text is split before the merges)."""
    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]) or [None]
    kinds = [s.get("type") if s else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM's own tokenizer.json: digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and steps[0]["pattern"].get("Regex") in _SPLITS:
        return _SPLITS[steps[0]["pattern"]["Regex"]]
    raise GGUFExportError(f"tokenizer.json pre_tokenizer {kinds}: not a split llama.cpp names; supported: ByteLevel "
                          "(gpt2), Digits+ByteLevel (smollm), Split+ByteLevel with the llama-3 or qwen2 regex")


def _merge_list(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _add_vocab(writer, tok, *, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's metadata spells it, with special ids, add-BOS/EOS and the chat template."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or (spec.get("decoder") or {}).get(
        "type") == "ByteLevel"
    if model["type"] != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise GGUFExportError(f"tokenizer.json model {model['type']} (byte_fallback={model.get('byte_fallback')}): "
                              "supported: byte-level BPE (gpt2) or sentencepiece-style BPE with byte fallback (llama)")
    tokens, types = _token_table(tok, vocab_size, sentencepiece=not byte_level)
    merges = _merge_list(model)
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    writer.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer")) if byte_level else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if not byte_level:  # llama.cpp's sentencepiece tokenizer ranks merges by the score of the token they make
        rank: dict[str, float] = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), -float(r))
        writer.add_token_scores([rank.get(t, -float(len(merges) + i)) for i, t in enumerate(tokens)])
        writer.add_add_space_prefix("Prepend" in json.dumps(spec.get("normalizer")) or
                                    (spec.get("pre_tokenizer") or {}).get("prepend_scheme") in ("first", "always"))
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tok, attr, None) is not None:
            add(getattr(tok, attr))
    probe = tok("a")["input_ids"]  # what the tokenizer really adds, whatever its config claims
    writer.add_add_bos_token(bool(probe) and probe[0] == tok.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tok.eos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_modelfile(gguf_path: Path, tok) -> Path:
    """An Ollama Modelfile beside the file. Ollama takes the chat template from the GGUF's metadata itself."""
    lines = [f"FROM ./{gguf_path.name}"]
    if tok.eos_token:
        lines.append(f'PARAMETER stop "{tok.eos_token}"')
    path = gguf_path.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def how_to_run(result: GGUFResult) -> str:
    out = [f"llama.cpp:  llama-cli -m {result.path} -cnv"]
    if result.modelfile is not None:
        out.append(f"Ollama:     cd {result.modelfile.parent} && ollama create {result.path.stem} "
                   f"-f {result.modelfile.name} && ollama run {result.path.stem}")
    return "\n".join(out)
