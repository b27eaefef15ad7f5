"""Load the tokenizer and the model, choose the attention kernel, and apply the fine-tuning method.

Single-device code: nothing here knows about processes or sharding (the strategy does that).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Recipe
from .methods import add_neftune, apply_method, quantization_config


@dataclass
class ParamCounts:
    trainable: int
    total: int

    def describe(self) -> str:
        return f"trainable parameters {self.trainable:,} of {self.total:,} ({100 * self.trainable / self.total:.2f}%)"


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    seen, trainable, total = set(), 0, 0
    # 4-bit weights sharded by FSDP2 are DTensors of their packed storage (quantized.py): known by their module.
    packed = {id(m.weight) for m in model.modules() if hasattr(m, "packed_4bit")}
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        # ZeRO-3 partitions leave an empty tensor and record the real size in ds_numel; 4-bit weights pack
        # two values per stored byte.
        four_bit = p.__class__.__name__ == "Params4bit" or id(p) in packed
        n = getattr(p, "ds_numel", p.numel()) * (2 * p.element_size() if four_bit else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return ParamCounts(trainable, total)


def load_tokenizer(path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_image_processor(path: Path):
    """The model folder's image processor (preprocessor_config.json): how its images are resized and normalised.
    Saved with every checkpoint and final/ where a text model saves its tokenizer."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


# Files that hold weights, not the tokenizer or the model's code: left out of the tokenizer's fingerprint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".npz", ".onnx")


class LazyTokenizer:
    """The run's tokenizer, loaded the first time something reads it; otherwise a drop-in for it.

    A run whose data comes from the cache needs no tokenizer to train: the pad id is in the cache, and checkpoints
    copy the tokenizer files the cache kept (`save_pretrained`). Not loading it leaves its vocabulary and the
    transformers modules it imports (~8 MiB per rank for SmolLM2's) out of every rank's memory; generated answers,
    a stream or a cache miss load it when they first need it.
    """

    def __init__(self, path: Path, *, trust_remote_code: bool = False):
        self.path, self.trust_remote_code = Path(path), trust_remote_code
        self._tok = None
        self._saved: Path | None = None

    @property
    def loaded(self) -> bool:
        return self._tok is not None

    def get(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
        return self._tok

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy/pickle probes must not load it
            raise AttributeError(name)
        return getattr(self.get(), name)

    def __call__(self, *args, **kwargs):
        return self.get()(*args, **kwargs)

    def fingerprint(self) -> str:
        """A hash of the model folder's files other than weights: what the tokenizer is built from (its
        vocabulary, merges, special tokens, chat template, and any remote code), read without loading it."""
        h = hashlib.sha256(repr(self.trust_remote_code).encode())
        for f in sorted(self.path.iterdir()):
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.stat().st_size < 256 << 20:
                h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return "files-" + h.hexdigest()[:16]

    def saved_at(self, folder: Path) -> None:
        """`folder` holds this tokenizer as `save_pretrained` wrote it: later saves copy it instead of loading."""
        self._saved = folder

    def save_pretrained(self, folder, **kwargs):
        if self._tok is None and self._saved is not None and (self._saved / "tokenizer_config.json").is_file():
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copytree(self._saved, folder, dirs_exist_ok=True)
            return
        return self.get().save_pretrained(folder, **kwargs)


def flash_attention_problem(impl: str, *, precision: str, model_type: str | None = None) -> str | None:
    """Why `impl` (a flash-attention kernel) cannot run here; None when it can."""
    pkg = "flash_attn_interface" if impl == "flash_attention_3" else "flash_attn"
    if not torch.cuda.is_available():
        return (f"model.attn_implementation: {impl} needs a CUDA GPU and this machine has none; use sdpa (or auto)")
    if importlib.util.find_spec(pkg) is None:
        return (f"model.attn_implementation: {impl} needs the {pkg} package: pip install 'dist-ft[flash-attn]'; "
                "or use sdpa")
    major, _ = torch.cuda.get_device_capability()
    if major < 8 or (impl == "flash_attention_3" and major != 9):
        need = "Hopper (sm90)" if impl == "flash_attention_3" else "Ampere or newer (sm80+)"
        return f"model.attn_implementation: {impl} needs a {need} GPU; use sdpa"
    if precision == "fp32":
        return f"model.attn_implementation: {impl} runs in bf16/fp16 only; set distributed.precision: bf16-mixed"
    if model_type is not None and not architecture_supports_flash(model_type, impl):
        return f"model.attn_implementation: {impl} is not implemented for {model_type} models in transformers; use sdpa"
    return None


def architecture_supports_flash(model_type: str, impl: str) -> bool:
    """Whether transformers' class for this model type declares flash-attention support."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    if cls is None:
        return True  # unknown here: let transformers decide when it loads
    flag = "_supports_flash_attn_3" if impl == "flash_attention_3" else "_supports_flash_attn_2"
    return bool(getattr(cls, "_supports_flash_attn", False) or getattr(cls, flag, False))


def resolve_attention(requested: str, *, precision: str) -> tuple[str, str]:
    """(implementation, reason). `auto` prefers flash-attention where it can run, SDPA elsewhere."""
    if requested == "auto":
        why_not = flash_attention_problem("flash_attention_2", precision=precision)
        if why_not is None:
            return "flash_attention_2", "auto: flash-attn is installed and the GPU and dtype support it"
        return "sdpa", "auto: " + why_not.split(": ", 1)[1].split(";")[0]
    return requested, "set in the recipe"


# In 16 bits on a CPU, torch's flash SDPA kernel (the default there) runs its backward several times slower than the
# plain math path on short rows: forward + backward of 4 x 9 heads x 64 dims, causal mask, one thread, bf16:
# 64 tokens 6.8 ms flash / 4.6 math, 128 tokens 16.3 / 17.1, 512 tokens 114 / 221 (torch 2.13). The math path also
# materialises the [rows x rows] scores, so it is chosen only for short rows.
CPU_MATH_SDPA_MAX_LENGTH = 128


def choose_cpu_sdpa_kernel(attn: str, *, device: torch.device, compute_dtype: torch.dtype,
                           max_length: int) -> str | None:
    """On a CPU computing in 16 bits with rows of at most CPU_MATH_SDPA_MAX_LENGTH tokens, SDPA's math kernel instead
    of its flash kernel, for the whole process (forward, activation-checkpoint recompute and evaluation alike: the
    flag is global). Returns what was chosen and why, or None where nothing changes (GPUs keep their kernels)."""
    if attn != "sdpa" or device.type != "cpu" or compute_dtype == torch.float32 \
            or max_length > CPU_MATH_SDPA_MAX_LENGTH:
        return None
    torch.backends.cuda.enable_flash_sdp(False)  # (named for CUDA; CPU's kernel choice reads the same flag)
    return (f"SDPA math kernel: rows of <= {max_length} tokens in {str(compute_dtype).removeprefix('torch.')} on a "
            "CPU, where the flash kernel's backward is slower")


class ModelBuilder:
    """Builds the recipe's model (with its method applied) either whole, with pretrained weights, or on the meta
    device for a strategy that materialises only its shard. Parameters the checkpoint lacks (adapters, new heads)
    get name-seeded values either way (weights.py), so every strategy starts from identical weights."""

    def __init__(self, recipe: Recipe, path: Path, *, num_labels: int | None, label_names: list[str],
                 pad_token_id: int, dtype: torch.dtype, attn_implementation: str):
        self.recipe, self.path, self.dtype = recipe, Path(path), dtype
        self.num_labels, self.label_names, self.pad_token_id = num_labels, label_names, pad_token_id
        self.attn = attn_implementation
        self.created: set[str] = set()  # parameters the recipe creates (set when the model is built)
        # An image classifier's head from the folder, replaced (its classes are not the data's): canonical names.
        self.replaced_head: set[str] = set()
        self.load_report = None  # weights.LoadReport, once the weights are bound

    def _auto_class(self):
        from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSeq2SeqLM,
                                  AutoModelForSequenceClassification)
        return {"causal_lm": AutoModelForCausalLM, "seq2seq_lm": AutoModelForSeq2SeqLM,
                "sequence_classification": AutoModelForSequenceClassification,
                "image_classification": AutoModelForImageClassification}[self.recipe.model.task]

    def config(self):
        from transformers import AutoConfig

        kwargs = {}
        if self.recipe.model.task in ("sequence_classification", "image_classification"):
            id2label = dict(enumerate(self.label_names)) if self.label_names else None
            kwargs = dict(num_labels=self.num_labels, id2label=id2label,
                          label2id={n: i for i, n in (id2label or {}).items()} or None)
        cfg = AutoConfig.from_pretrained(self.path, trust_remote_code=self.recipe.model.trust_remote_code, **kwargs)
        # A KV cache during training makes transformers skip the per-sample masks of packed rows (samples would
        # attend to each other) and wastes memory: training never needs it.
        cfg.use_cache = False
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = self.pad_token_id
        return cfg

    def weights(self, model: torch.nn.Module):
        """The folder's weights, bound to `model` (built by `build_meta`) and audited: every parameter comes from the
        checkpoint or is one the recipe creates, else WeightsError. The audit is kept in `self.load_report`."""
        from .weights import ModelWeights
        weights = ModelWeights(self.path, seed=self.recipe.seed, skip=self.replaced_head,
                               init_std=getattr(self.config(), "initializer_range", 0.02)).bind(model)
        self.load_report = weights.audit(model, self.created)
        from .quantized import QuantizingWeights, is_packed_4bit
        if is_packed_4bit(model):
            return QuantizingWeights(weights, model, dtype=self.dtype)
        return weights

    def _apply_method(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the recipe's method (and NEFTune's hook) and record what the recipe creates: every parameter the
        method adds, and for classification the head outside the base model (canonical names, as weights.py compares
        them)."""
        from .weights import canonical_name
        base_names = {canonical_name(n) for n, _ in model.named_parameters()}
        created = set()
        prefix = getattr(model, "base_model_prefix", "")
        task = self.recipe.model.task
        if task in ("sequence_classification", "image_classification") and prefix and hasattr(model, prefix):
            created = {n for n in base_names if not n.startswith(prefix + ".")}
            if task == "image_classification" and not self._folder_head_fits():
                self.replaced_head = created
        model = apply_method(model, self.recipe, model_path=self.path)
        self.created = created | {canonical_name(n) for n, _ in model.named_parameters()} - base_names
        if self.recipe.training.neftune_alpha is not None:
            add_neftune(model, self.recipe.training.neftune_alpha)
        return model

    def _attention(self) -> str:
        """The attention implementation to ask for: an image model without attention (ResNet) refuses sdpa in
        transformers, and has no attention to run, so it is asked for eager."""
        if self.recipe.model.task != "image_classification" or self.attn != "sdpa":
            return self.attn
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as NAMES
        name = NAMES.get(self.config().model_type, "")
        cls = getattr(transformers, name if isinstance(name, str) else name[0], None)
        return self.attn if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"

    def _folder_head_fits(self) -> bool:
        """Whether the folder's classification head was trained on the data's classes (the same names, in the same
        order); else it is replaced by a new one, seeded like every other created parameter."""
        import json
        config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        theirs = config.get("id2label") or {}
        return [theirs.get(str(i)) for i in range(len(theirs))] == list(self.label_names)

    def build(self, *, quantize: bool = True) -> torch.nn.Module:
        """The whole model with its pretrained weights, on CPU (a quantised qlora base goes straight to this
        process's GPU, where bitsandbytes' kernels are; `quantize=False` loads it in full precision, for export)."""
        kwargs = {}
        quant = quantization_config(self.recipe) if quantize else None
        if quant is not None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            kwargs = {"quantization_config": quant, "device_map": {"": device}}
        if self.recipe.model.task == "image_classification":  # a head of other classes is replaced below
            kwargs["ignore_mismatched_sizes"] = True
        model = self._auto_class().from_pretrained(
            self.path, config=self.config(), dtype=self.dtype, attn_implementation=self._attention(),
            trust_remote_code=self.recipe.model.trust_remote_code, **kwargs)
        model = self._apply_method(model)
        # from_pretrained loaded what the checkpoint has (mapping names as weights.py does); the rest is what the
        # recipe creates, given the same name-seeded values as on the sharded paths.
        self.weights(model).reinit_missing(model)
        if quant is not None:
            keep_4bit_weights_trainable(model)
        return model

    def build_meta(self, context=None) -> torch.nn.Module:
        """The model's structure without its weights: parameters on the meta device (no memory) and buffers on
        CPU, or created inside `context` instead (DeepSpeed's zero.Init partitions them as they are created).
        Pretrained values are then filled by the strategy from `weights()`."""
        import contextlib

        from accelerate import init_empty_weights

        quantized = quantization_config(self.recipe) is not None
        if quantized:
            # Always on meta: a 4-bit base is made tensor by tensor as it is read (quantized.py), never in 16 bits,
            # not even partitioned (transformers then skips zero.Init, as for its own quantised models).
            from transformers.modeling_utils import set_quantized_state
            context = contextlib.ExitStack()
            context.enter_context(init_empty_weights(include_buffers=False))
            context.enter_context(set_quantized_state())
        with context if context is not None else init_empty_weights(include_buffers=False):
            model = self._auto_class().from_config(self.config(), dtype=self.dtype, attn_implementation=self._attention(),
                                                   trust_remote_code=self.recipe.model.trust_remote_code)
        if getattr(model.config, "tie_word_embeddings", False) or getattr(
                model.config.get_text_config(), "tie_word_embeddings", False):
            model.tie_weights()  # from_config under init_empty_weights leaves the output embedding untied
        if quantized:
            # QLoRA's base as packed, empty 4-bit layers; `weights()` quantises each tensor as a shard reads it.
            from .quantized import replace_with_packed_4bit
            replace_with_packed_4bit(model, self.recipe)
            keep_4bit_weights_trainable(model)
        if self.recipe.model.task == "image_classification":
            self._load_buffers(model)
        return self._apply_method(model)

    def _load_buffers(self, model: torch.nn.Module) -> None:
        """The checkpoint's buffers into a meta-built model, whose buffers are made on CPU with their initial values:
        BatchNorm's running statistics (ResNet) are state the forward reads, not values the model rebuilds."""
        from .weights import ModelWeights
        weights = ModelWeights(self.path, seed=self.recipe.seed).bind(model)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if buf.device.type != "meta" and weights.has(name):
                    n = buf.shape[0] if buf.dim() else 0
                    buf.copy_(weights.rows(name, buf.shape, 0, n, buf.dtype))


def keep_4bit_weights_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, the first forward in eval mode without grad (our evaluation before training)
    repacks every Linear4bit's weight, and from then on every forward, in training too, takes that kernel, which
    has no backward: gradients stop at each quantised layer, only the adapters nearest the loss learn, and a
    QLoRA run barely moves (measured on SmolLM2: held-out loss 4.08 -> 4.06 in 40 steps, against 3.86 -> 2.60 for
    LoRA). Returns how many layers were switched."""
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def is_quantized(model: torch.nn.Module) -> bool:
    """A bitsandbytes base: already on its device, and `.to()` is refused for it."""
    base = getattr(model, "base_model", model)
    base = getattr(base, "model", base)
    return bool(getattr(base, "is_quantized", False) or getattr(model, "is_quantized", False))
