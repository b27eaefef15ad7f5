"""The model, never loaded: its config (a local folder, a config.json, a project alias, or `builtin:NAME` for the
configs in BUILTIN_MODELS) is built under `torch.device("meta")` and its parameters are counted exactly from that
meta model (tied embeddings once), each with its transformer block, its FSDP unit and the nn.Linear it belongs to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

from .constants import PlanError

# Published config.json values (the fields that shape the model).
BUILTIN_MODELS: dict[str, dict] = {
    "llama-3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       hidden_act="silu", attention_bias=False, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001),
    "llama-3-70b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                        hidden_act="silu", attention_bias=False, tie_word_embeddings=False, bos_token_id=128000,
                        eos_token_id=128001),
    # Llama-3.1-405B's shape (its rope_scaling left out: it changes no parameter)
    "llama-3.1-405b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=16384,
                           intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                           num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                           rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
                           tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       hidden_act="silu", sliding_window=131072, use_sliding_window=False, max_window_layers=28,
                       tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    "mistral-7b-v0.1": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                            rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=4096,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         hidden_act="silu", attention_bias=False, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=0),
    # sentence-transformers/all-MiniLM-L6-v2 (the project's minilm-l6-v2 alias)
    "minilm-l6-v2": dict(model_type="bert", architectures=["BertModel"], hidden_size=384, intermediate_size=1536,
                         num_hidden_layers=6, num_attention_heads=12, vocab_size=30522, max_position_embeddings=512,
                         type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, pad_token_id=0),
}
BUILTIN_ALIASES = {"meta-llama-3-8b": "llama-3-8b", "meta-llama-3-70b": "llama-3-70b", "llama-3-405b": "llama-3.1-405b",
                   "meta-llama-3.1-405b": "llama-3.1-405b", "qwen2.5-7b": "qwen2.5-7b",
                   "mistral-7b": "mistral-7b-v0.1", "smollm2-135m-instruct": "smollm2-135m"}
LM_TASKS = ("causal_lm", "seq2seq_lm")  # tasks whose head is the output embedding over the vocabulary
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo2", "granite")


@dataclass
class ParamInfo:
    name: str
    numel: int
    ndim: int
    block: Optional[int]        # index of the transformer block holding it (None: outside the blocks)
    unit: str                   # FSDP unit: "block:i", "embed", "head" or "root"
    linear: Optional[str]       # the nn.Linear whose weight this is
    in_features: int = 0
    out_features: int = 0
    head: bool = False
    embed: bool = False
    rows: int = 0               # size of dim 0, which FSDP2 splits over ranks (0: a scalar, or not known)


@dataclass
class ModelFacts:
    """What the plan needs from the model, read from a meta-device build of its config."""
    path: str
    source: str                 # where the config came from
    cls_name: str
    config: Any
    task: str
    params: list[ParamInfo]
    linears: dict[str, tuple[int, int, bool]]   # linear module name -> (in, out, has bias)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    num_labels: int
    gated: bool
    rms_fp32: bool
    dropout_hidden: float
    dropout_attn: float
    tied: bool
    head_modules: list[str]     # names of the output head module(s)
    model: Any = None           # the meta model (for methods.partial_trainable_names)

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _builtin_key(name: str) -> Optional[str]:
    key = name.strip().lower()
    key = BUILTIN_ALIASES.get(key, key)
    return key if key in BUILTIN_MODELS else None


def resolve_config(recipe) -> tuple[Any, str]:
    """(transformers config, where it came from) for recipe.model.path, without loading weights or converting."""
    from transformers import AutoConfig

    from .. import assets

    path = recipe.model.path
    trust = recipe.model.trust_remote_code

    def from_builtin(key: str, why: str):
        values = dict(BUILTIN_MODELS[key])
        return AutoConfig.for_model(values.pop("model_type"), **values), why

    if path.lower().startswith("builtin:"):
        key = _builtin_key(path.split(":", 1)[1])
        if key is None:
            raise PlanError(f"model.path: {path} is not a built-in config; known: "
                            + ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS))
        return from_builtin(key, f"built-in config {key}")
    if assets.is_alias(path):
        materialised = (assets.cache_root() / "models" / path / ".complete").exists() if path == \
            "smollm2-135m-instruct" else assets.alias_available(path) is None
        if materialised:
            folder = assets.resolve_model_path(path)  # already converted / installed: no work
            return AutoConfig.from_pretrained(folder, trust_remote_code=trust), f"{path} -> {folder}"
        key = _builtin_key(path)
        if key is None:
            raise PlanError(f"model.path: alias {path} is not materialised here and has no built-in config")
        return from_builtin(key, f"alias {path} not materialised here: built-in config {key}")
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PlanError(f"model.path: {p} has no config.json")
        return AutoConfig.from_pretrained(p, trust_remote_code=trust), str(p / "config.json")
    if p.is_file() and p.suffix == ".json":
        values = json.loads(p.read_text(encoding="utf-8"))
        if "model_type" not in values:
            raise PlanError(f"model.path: {p} has no model_type")
        return AutoConfig.for_model(values.pop("model_type"), **values), str(p)
    raise PlanError(f"model.path: {path} is neither a local model folder, a config.json, a built-in alias "
                    f"({', '.join(sorted(assets.ALIASES))}) nor builtin:NAME (" + ", ".join(BUILTIN_MODELS) + ")")


_FACTS_CACHE: dict[tuple, ModelFacts] = {}


def analyze_model(recipe) -> ModelFacts:
    """Build the recipe's model on the meta device and record every parameter (tied ones once)."""
    if recipe.model.task == "image_classification":
        # Its activations go by image size and patches or feature maps, which the per-token formulas here do not
        # model: said plainly rather than planned wrongly.
        raise PlanError("dist-ft plan does not model image classifiers yet (model.task: image_classification): its "
                        "activation and throughput formulas are per token; a short run reports the real peak memory "
                        "per rank (metrics.jsonl peak_memory_mb, the [dist_ft] peak memory line)")
    key = (recipe.model.path, recipe.model.task, recipe.model.num_labels, recipe.model.trust_remote_code)
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    model, config, source, num_labels = _meta_model(recipe)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ends = _ends(model, text, recipe.model.task)
    params, linears = _param_infos(model, ends, recipe.model.task)
    facts = _facts(recipe, model, config, text, source, num_labels, params, linears, ends)
    _FACTS_CACHE[key] = facts
    return facts


def _meta_model(recipe) -> tuple[Any, Any, str, int]:
    """(the model built on the meta device, its config, where the config came from, the number of labels)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    config, source = resolve_config(recipe)
    config.use_cache = False
    num_labels = 0
    if recipe.model.task == "sequence_classification":
        num_labels = recipe.model.num_labels or 2
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    auto = {"causal_lm": AutoModelForCausalLM, "seq2seq_lm": AutoModelForSeq2SeqLM}.get(
        recipe.model.task, AutoModelForSequenceClassification)
    with torch.device("meta"):
        model = auto.from_config(config, attn_implementation="eager",
                                 trust_remote_code=recipe.model.trust_remote_code)
    return model, config, source, num_labels


class _Ends(NamedTuple):
    """The model's input embedding and output head: whether they are tied, and which parameters they hold."""
    tied: bool
    head_names: list[str]
    head_ids: set[int]
    embed_ids: set[int]


def _ends(model, text, task: str) -> _Ends:
    import torch

    tied = bool(getattr(text, "tie_word_embeddings", False))
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings() if task in LM_TASKS else None
    if tied and inp is not None and out is not None and out.weight is not inp.weight:
        out.weight = inp.weight
    tied = bool(inp is not None and out is not None and out.weight is inp.weight)

    head_mods: list[torch.nn.Module] = [out] if out is not None else []
    if not head_mods:
        for attr in ("score", "classifier"):
            mod = getattr(model, attr, None)
            if isinstance(mod, torch.nn.Module):
                head_mods = [mod]
                break
    head_names = [n for n, m in model.named_modules() if any(m is h for h in head_mods)]
    head_ids = {id(p) for m in head_mods for p in m.parameters()}
    embed_ids = {id(p) for p in inp.parameters()} if inp is not None else set()
    return _Ends(tied, head_names, head_ids, embed_ids)


def _param_infos(model, ends: _Ends, task: str) -> tuple[list[ParamInfo], dict[str, tuple[int, int, bool]]]:
    """Every parameter once, with its block, FSDP unit and Linear; and every nn.Linear's shape."""
    import torch

    block_of: dict[int, int] = {}
    for i, b in enumerate(_blocks(model)):
        for p in b.parameters():
            block_of.setdefault(id(p), i)
    linears: dict[str, tuple[int, int, bool]] = {}
    linear_of: dict[int, tuple[str, int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            linears[name] = (m.in_features, m.out_features, m.bias is not None)
            linear_of[id(m.weight)] = (name, m.in_features, m.out_features)
    params, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        blk = block_of.get(id(p))
        is_embed, is_head = id(p) in ends.embed_ids, id(p) in ends.head_ids
        if blk is not None:
            unit = f"block:{blk}"
        elif is_embed and not ends.tied:
            unit = "embed"
        elif is_head and not ends.tied and task in LM_TASKS:
            unit = "head"
        else:
            unit = "root"
        lin = linear_of.get(id(p))
        params.append(ParamInfo(name=name, numel=p.numel(), ndim=p.dim(), block=blk, unit=unit,
                                linear=lin[0] if lin else None, in_features=lin[1] if lin else 0,
                                out_features=lin[2] if lin else 0, head=is_head, embed=is_embed,
                                rows=p.shape[0] if p.dim() else 0))
    return params, linears


def _facts(recipe, model, config, text, source: str, num_labels: int, params: list[ParamInfo],
           linears: dict, ends: _Ends) -> ModelFacts:
    """The shapes the formulas read, from the (text) config."""
    heads = text.num_attention_heads
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    model_type = getattr(text, "model_type", "")
    act = str(getattr(text, "hidden_act", "") or getattr(text, "hidden_activation", "") or "")
    return ModelFacts(
        path=recipe.model.path, source=source, cls_name=type(model).__name__, config=config,
        task=recipe.model.task, params=params, linears=linears, hidden=hidden,
        # An encoder-decoder's blocks are its encoder's and its decoder's (T5's num_hidden_layers counts the first).
        layers=(len({p.block for p in params if p.block is not None}) if recipe.model.task == "seq2seq_lm"
                else text.num_hidden_layers),
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * hidden, vocab=text.vocab_size,
        num_labels=num_labels, gated=act in ("silu", "swiglu", "gelu_pytorch_tanh") or model_type in LLAMA_LIKE,
        rms_fp32=model_type in LLAMA_LIKE,
        dropout_hidden=float(getattr(text, "hidden_dropout_prob", 0.0) or getattr(text, "resid_pdrop", 0.0) or 0.0),
        dropout_attn=float(getattr(text, "attention_probs_dropout_prob", 0.0) or getattr(text, "attn_pdrop", 0.0)
                           or 0.0),
        tied=ends.tied, head_modules=ends.head_names, model=model)


def _blocks(model) -> list:
    """FSDP's units (distributed/fsdp/strategy.py's rule), else the list of repeated blocks (methods.blocks_of)."""
    try:
        from ..distributed.fsdp.strategy import transformer_blocks
        return transformer_blocks(model)
    except Exception:  # noqa: BLE001 - no torch.distributed here, or no _no_split_modules
        from ..methods import blocks_of
        try:
            return [b for _, b in blocks_of(model)]
        except ValueError:
            return []
