"""The recipe: a tree of typed sections, loaded strictly from YAML.

Every default lives here, in the schema, and nowhere else. Loading reports every problem at once (unknown keys
with a "did you mean", wrong types, values out of range, impossible combinations), each naming the field and the
fix, before any process group starts or any model loads.

    recipe = load_recipe("configs/demo.yaml", overrides=["training.max_steps=20"])
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .distributed.spec import names as backend_names, spec_problems


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **bounds: Any) -> Any:
    """A schema field: its default, a one-line description and optional numeric bounds (ge, gt, le)."""
    meta = {"help": help, **bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


Task = Literal["causal_lm", "sequence_classification"]
DataFormat = Literal["text", "instruction", "alpaca", "chat", "sharegpt", "classification"]
PROMPT_FORMATS = ("instruction", "alpaca", "chat", "sharegpt")  # formats whose samples have a prompt and an answer
MethodKind = Literal["full", "lora", "qlora", "partial", "prompt_tuning", "prefix_tuning", "ia3"]
# The backends: one spec each (distributed/spec.py); the recipe check reads their refusals there.
Strategy = Literal[tuple(backend_names())]
Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"]
Scheduler = Literal["cosine", "linear", "constant"]
AttnImpl = Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"]


@dataclass
class ModelConfig:
    path: str = _f("smollm2-135m-instruct", "A local Hugging Face model folder, or a built-in alias "
                   "(smollm2-135m-instruct, minilm-l6-v2).")
    task: Task = _f("causal_lm", "What the model learns: next-token prediction or sequence classification.")
    num_labels: Optional[int] = _f(None, "Number of classes for sequence_classification (None: taken from the "
                                   "data's labels).", ge=2)
    attn_implementation: AttnImpl = _f("auto", "Attention kernel; auto picks flash-attention on capable GPUs, "
                                       "SDPA elsewhere.")
    trust_remote_code: bool = _f(False, "Run the model folder's own Python code. Off unless you trust the folder.")


@dataclass
class DataColumns:
    text: str = _f("text", "Column holding the text (format: text, classification).")
    prompt: str = _f("prompt", "Column holding the instruction (format: instruction).")
    response: str = _f("response", "Column holding the answer (format: instruction).")
    messages: str = _f("messages", "Column holding the list of {role, content} turns (format: chat).")
    instruction: str = _f("instruction", "Column holding the instruction (format: alpaca).")
    input: str = _f("input", "Column holding the instruction's input, may be absent or empty (format: alpaca).")
    output: str = _f("output", "Column holding the answer (format: alpaca).")
    conversations: str = _f("conversations", "Column holding the list of {from, value} turns (format: sharegpt).")
    label: str = _f("label", "Column holding the class, a name or an integer (format: classification).")


@dataclass
class ShareGPTConfig:
    user: list[str] = _f(factory=lambda: ["human", "user"], help="Turn speakers (`from`) read as the user.")
    assistant: list[str] = _f(factory=lambda: ["gpt", "assistant", "chatgpt", "bing"],
                              help="Turn speakers read as the assistant (these turns carry the loss).")
    system: list[str] = _f(factory=lambda: ["system"], help="Turn speakers read as the system prompt.")
    role_key: str = _f("from", "Key of a turn's speaker.")
    content_key: str = _f("value", "Key of a turn's text.")


@dataclass
class SourceConfig:
    path: str = _f("", "A .jsonl/.json/.csv/.tsv/.parquet/.txt file, a folder of shards (streaming), or "
                   "builtin:NAME.")
    weight: float = _f(1.0, "Share of the mixture: sources are sampled in proportion to their weights.", gt=0.0)
    format: Optional[DataFormat] = _f(None, "This source's format (None: data.format).")
    columns: Optional[DataColumns] = _f(None, "This source's column names (None: data.columns).")
    name: Optional[str] = _f(None, "Its name in logs and per-source evaluation (None: from the path).")


@dataclass
class CleanConfig:
    strip: bool = _f(False, "Strip whitespace around every text field.")
    normalize_unicode: Optional[Literal["NFC", "NFKC"]] = _f(None, "Unicode normalisation of every text field.")
    drop_empty: bool = _f(False, "Drop records whose text fields are all empty (otherwise tokenization drops and "
                          "counts them).")
    max_chars: Optional[int] = _f(None, "Drop records longer than this many characters (all text fields).", ge=1)


@dataclass
class DataConfig:
    train: Union[str, list[SourceConfig]] = _f(
        "builtin:wordnet-definitions", "Training data: a .jsonl/.json/.csv/.tsv/.parquet/.txt file, builtin:NAME "
        "(wordnet-definitions, wordnet-categories, fortunes, pydoc), or a list of sources {path, weight, format, "
        "columns, name}: a mixture sampled by weight.")
    eval: Optional[Union[str, list[SourceConfig]]] = _f(
        None, "Held-out data in the same forms (a path, builtin:NAME, or a list of sources, each evaluated on its "
        "own as well as together); if unset, eval_fraction of each training source is held out.")
    eval_fraction: float = _f(0.05, "Fraction of train held out for evaluation when eval is unset.", ge=0.0, lt=1.0)
    format: DataFormat = _f("instruction", "How records become tokens.")
    columns: DataColumns = _f(factory=DataColumns, help="Column names in the data files.")
    sharegpt: ShareGPTConfig = _f(factory=ShareGPTConfig, help="How sharegpt turns name their speakers.")
    max_length: int = _f(256, "Longest sequence in tokens.", ge=8)
    too_long: Literal["truncate", "drop"] = _f("truncate", "What to do with samples longer than max_length "
                                               "(counted in the log either way).")
    packing: bool = _f(False, "Pack several samples into one max_length row (no attention across samples).")
    packing_strategy: Literal["bfd", "greedy"] = _f(
        "bfd", "bfd: best-fit decreasing, the fullest rows (as TRL); greedy: samples in their order, a new row when "
        "the next does not fit. Streaming data packs greedily.")
    max_train_samples: Optional[int] = _f(None, "Use only the first N training records after shuffling.", ge=1)
    max_eval_samples: Optional[int] = _f(None, "Use only the first N evaluation records.", ge=1)
    system_prompt: Optional[str] = _f(None, "System turn prepended to instruction/alpaca/chat/sharegpt samples "
                                      "(None: the chat template's own default).")
    use_chat_template: bool = _f(True, "Render instruction and alpaca data through the tokenizer's chat template "
                                 "when it has one.")
    shuffle: bool = _f(True, "Shuffle records (seeded) before the hold-out split and the order of samples in "
                       "each epoch; false keeps the files' order.")
    clean: CleanConfig = _f(factory=CleanConfig, help="Cleaning before tokenization (counts are logged).")
    dedup: Literal["none", "exact", "near"] = _f("none", "Remove duplicate training records: identical text "
                                                 "(exact), or also near-identical (MinHash, near_threshold).")
    near_threshold: float = _f(0.8, "Word-3-shingle Jaccard similarity from which records are near duplicates.",
                               gt=0.0, le=1.0)
    balance: Literal["none", "oversample", "undersample", "class_weights"] = _f(
        "none", "Classification: equalise class counts by repeating or dropping training records, or weight the "
        "loss by inverse class frequency.")
    streaming: bool = _f(False, "Read a large corpus (a folder or glob of .jsonl/.parquet shards) as a stream: "
                         "tokenized on the fly, each rank reading its own shards; needs data.eval.")


@dataclass
class LoraConfig:
    r: int = _f(16, "LoRA rank.", ge=1)
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r).", gt=0)
    dropout: float = _f(0.05, "Dropout on the LoRA input.", ge=0.0, lt=1.0)
    target_modules: Union[str, list[str]] = _f("all-linear", "Module names to adapt, or all-linear.")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")


@dataclass
class QuantConfig:
    bits: Literal[4, 8] = _f(4, "Base weights in 4-bit (QLoRA) or 8-bit (LLM.int8) through bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type.")
    double_quant: bool = _f(True, "Quantise the 4-bit quantisation constants too (~0.4 bit/parameter saved).")
    compute_dtype: Literal["auto", "fp32", "bf16"] = _f("auto", "dtype the 4-bit matmuls run in (auto: bf16 with "
                                                        "bf16 precisions, fp32 otherwise).")


@dataclass
class PromptConfig:
    num_virtual_tokens: int = _f(20, "Learned tokens (prompt_tuning) or per-layer prefix length (prefix_tuning).",
                                 ge=1)
    init_text: Optional[str] = _f(None, "prompt_tuning: start the virtual tokens from this text's embeddings "
                                  "(None: random).")


@dataclass
class IA3Config:
    target_modules: Optional[Union[str, list[str]]] = _f(None, "Modules to rescale (None: peft's defaults for the "
                                                         "architecture, e.g. k_proj, v_proj, down_proj).")
    feedforward_modules: Optional[list[str]] = _f(None, "Which of them are feed-forward (scaled on the input).")


@dataclass
class PartialConfig:
    last_blocks: int = _f(0, "Train the last N transformer blocks.", ge=0)
    head: bool = _f(True, "Train the output head (lm_head, or the classification head).")
    embeddings: bool = _f(False, "Train the input embeddings.")
    bias_only: bool = _f(False, "BitFit: train every bias term (and nothing else besides head/embeddings if set).")
    unfreeze_every_steps: int = _f(0, "Gradual unfreezing: one more block (from the top) every N steps (0: off).",
                                   ge=0)
    unfreeze_every_epochs: float = _f(0.0, "Gradual unfreezing every N epochs of the training data instead.", ge=0.0)
    unfreeze_floor: int = _f(0, "Lowest block index gradual unfreezing reaches (0: all blocks).", ge=0)


@dataclass
class MethodConfig:
    kind: MethodKind = _f("lora", "What is trained: every weight (full), a LoRA adapter (lora), LoRA on a 4/8-bit "
                          "base (qlora), chosen parts (partial), or another peft method (prompt_tuning, "
                          "prefix_tuning, ia3).")
    lora: LoraConfig = _f(factory=LoraConfig, help="LoRA settings (kind: lora, qlora).")
    quant: QuantConfig = _f(factory=QuantConfig, help="Quantised base (kind: qlora).")
    prompt: PromptConfig = _f(factory=PromptConfig, help="Virtual tokens (kind: prompt_tuning, prefix_tuning).")
    ia3: IA3Config = _f(factory=IA3Config, help="IA3 settings (kind: ia3).")
    partial: PartialConfig = _f(factory=PartialConfig, help="What to train (kind: partial).")
    modules_to_save: list[str] = _f(factory=list, help="Modules trained in full beside an adapter "
                                    "(the classification head is added automatically).")


@dataclass
class TrainingConfig:
    max_steps: int = _f(100, "Optimizer steps to take.", ge=1)
    micro_batch_size: int = _f(4, "Samples (or packed rows) per rank per forward pass.", ge=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    learning_rate: float = _f(2e-4, "Peak learning rate.", gt=0.0, le=1.0)
    lr_scheduler: Scheduler = _f("cosine", "Decay after warm-up.")
    warmup_steps: int = _f(0, "Linear warm-up steps.", ge=0)
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of the peak.", ge=0.0, le=1.0)
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (not applied to biases and norms).", ge=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0.0, lt=1.0)
    adam_eps: float = _f(1e-8, "AdamW epsilon.", gt=0.0)
    max_grad_norm: Optional[float] = _f(1.0, "Clip the global gradient norm to this (None: no clipping).", gt=0.0)
    eval_every: int = _f(0, "Evaluate every N steps (0: only before and after training).", ge=0)
    early_stopping_patience: int = _f(0, "Stop after N evaluations without a better eval_loss (0: never).", ge=0)
    log_every: int = _f(1, "Write a training record to metrics.jsonl every N steps.", ge=1)
    optimizer: Literal["adamw", "adamw_8bit"] = _f("adamw", "AdamW, or bitsandbytes' 8-bit AdamW (optimizer state "
                                                  "in 8 bits: ~75% less optimizer memory).")
    stop_after_steps: Optional[int] = _f(None, "End this invocation after N steps, with a checkpoint, while the "
                                         "schedule still runs to max_steps: for time-boxed jobs that resume.", ge=1)


@dataclass
class DistributedConfig:
    strategy: Strategy = _f("ddp", "How the model is spread over processes.")
    precision: Precision = _f("fp32", "Numeric precision of compute and weights.")
    offload: Literal["none", "optimizer", "params", "all"] = _f(
        "none", "Keep optimizer state (optimizer), parameters (params) or both (all) in CPU memory: fsdp offloads "
        "parameters with their optimizer state; zero1/zero2 the optimizer; zero3 either or both.")
    activation_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    deepspeed_config: Optional[str] = _f(None, "Your own DeepSpeed JSON for zero1/2/3 ('auto' values are filled "
                                         "from the recipe; None: the shipped template for the strategy).")
    timeout_seconds: int = _f(300, "Collective and progress timeout: a dead rank, or one stuck in any phase (a "
                              "collective, a step, a checkpoint, the final save, the exit), ends the job after this "
                              "long.", ge=10)
    threads_per_process: Optional[int] = _f(None, "CPU threads per process (None: cores / local processes).", ge=1)


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "Write a sharded, resumable checkpoint every N optimizer steps (0: none; the final "
                          "model is saved either way).", ge=0)
    keep_last: Optional[int] = _f(2, "Keep the newest N complete checkpoints (None: all). The newest complete one "
                                  "is never deleted.", ge=1)
    resume: Optional[str] = _f(None, "auto: continue from the newest complete checkpoint in output_dir (start "
                               "fresh if there is none); a path: continue from that checkpoint or run directory "
                               "(an error if it cannot load); None: never resume.")
    verify: Literal["size", "sha256"] = _f("sha256", "How a checkpoint is checked before resuming: file sizes "
                                           "only, or sizes and sha256 (the hashing split over ranks).")
    allow_pickle: list[str] = _f(factory=list, help="Checkpoint files you made and trust to be unpickled in full. Everything else "
                                 "is read by torch's weights-only unpickler, which refuses code (safe_load.py).")
    keep_best: Optional[str] = _f(None, "Keep the checkpoint with the best value of this evaluation metric "
                                  "(eval_loss, eval_accuracy, eval_rougeL, ...), apart from keep_last; it is written "
                                  "at the evaluation that found it (needs training.eval_every).")
    best_mode: Literal["auto", "min", "max"] = _f("auto", "Which way keep_best is better (auto: lower for "
                                                 "losses and perplexity, higher otherwise).")
    final: Literal["last", "best"] = _f("last", "What final/ holds: the model after the last step, or the "
                                        "keep_best checkpoint's (when the last is not better).")


@dataclass
class GenerationConfig:
    max_new_tokens: int = _f(32, "Tokens generated per answer (always this many; the answer is cut at EOS).",
                             ge=1, le=4096)
    do_sample: bool = _f(False, "Sample (with temperature and top_p) instead of greedy decoding.")
    temperature: float = _f(1.0, "Sampling temperature.", gt=0.0)
    top_p: float = _f(1.0, "Nucleus sampling mass.", gt=0.0, le=1.0)
    sample_size: Optional[int] = _f(64, "Answer the first N evaluation prompts (None: all of them).", ge=1)
    seed: int = _f(0, "Seed of each answer's sampling (plus the prompt's index).", ge=0)


@dataclass
class EvalConfig:
    metrics: list[str] = _f(factory=list, help="Beyond loss and perplexity (always): accuracy, f1 (macro and per "
                            "class), confusion for classification; exact_match, rouge, bleu on answers generated for "
                            "instruction or chat data.")
    generation: GenerationConfig = _f(factory=GenerationConfig, help="How answers are generated for exact_match, "
                                      "rouge and bleu.")
    forgetting: Optional[str] = _f(None, "General text (builtin:pydoc, or any text data) whose loss is measured "
                                   "before training and at every evaluation: the catastrophic-forgetting signal.")
    forgetting_samples: int = _f(64, "How many texts of eval.forgetting (a fixed, seeded choice).", ge=1)


@dataclass
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = _f("disabled", "online logs to W&B (offline, said so, when no "
                                                        "key is set); offline writes files for `wandb sync`.")
    project: str = _f("dist_ft", "W&B project.")
    entity: Optional[str] = _f(None, "W&B entity (team or user).")
    name: Optional[str] = _f(None, "Run name (None: the output_dir's name).")
    tags: list[str] = _f(factory=list, help="Run tags.")
    group: Optional[str] = _f(None, "Run group (None: the Slurm job id or the launcher's run id).")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = _f(factory=WandbConfig, help="Weights & Biases.")
    tensorboard: bool = _f(False, "Write TensorBoard events into output_dir/tensorboard.")
    mfu: bool = _f(True, "Report model FLOPs utilisation (CPU peak measured by a short matmul at start).")


@dataclass
class Recipe:
    output_dir: str = _f("runs/default", "Run directory: config.yaml, metrics.jsonl, final/.")
    seed: int = _f(0, "Seed for weights that start random, data order and dropout.", ge=0)
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty output_dir (its files are replaced).")
    model: ModelConfig = _f(factory=ModelConfig, help="What is fine-tuned.")
    data: DataConfig = _f(factory=DataConfig, help="What it learns from.")
    method: MethodConfig = _f(factory=MethodConfig, help="Which weights are trained.")
    training: TrainingConfig = _f(factory=TrainingConfig, help="The optimisation.")
    distributed: DistributedConfig = _f(factory=DistributedConfig, help="Sharding and precision.")
    eval: EvalConfig = _f(factory=EvalConfig, help="Held-out metrics, generation, forgetting.")
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig, help="Resumable checkpoints.")
    logging: LoggingConfig = _f(factory=LoggingConfig, help="Telemetry: W&B, TensorBoard, MFU.")


class RecipeError(ValueError):
    """Every problem found in a recipe, one line each."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


# ---------------------------------------------------------------------------------------------- strict loading

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the (lightly coerced) value or record a problem."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a section (mapping), got {value!r}")
            return tp()
        return _build(tp, value, path, problems)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        listed = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, list) and listed:
            return _convert(value, listed[0], path, problems)
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            out = _convert(value, arg, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            fix = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}: {value!r} is not one of {' | '.join(map(str, choices))}{fix}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-4 (no dot) as a string: accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            problems.append(f"{path}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"schema type {tp} at {path} is not supported")  # a bug in the schema, not in the recipe


def _check_bounds(value: Any, meta: dict, path: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if key in meta and not ok(value, meta[key]):
            problems.append(f"{path}: must be {word} {meta[key]}, got {value!r}")


def _build(cls: type, data: dict, prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(fields)}"
            problems.append(f"{path}: unknown key ({fix})")
            continue
        before = len(problems)
        converted = _convert(value, hints[key], path, problems)
        if len(problems) == before:
            _check_bounds(converted, dict(fields[key].metadata), path, problems)
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - all fields have defaults
        problems.append(f"{prefix or 'recipe'}: {exc}")
        return cls()


def _cross_checks(r: Recipe) -> list[str]:
    """Checks that need more than one field. Each message names the fields and the fix."""
    p = []
    if r.model.task == "sequence_classification" and r.data.format != "classification":
        p.append("data.format: model.task is sequence_classification, so data.format must be classification")
    if r.data.format == "classification" and r.model.task != "sequence_classification":
        p.append("model.task: data.format is classification, so model.task must be sequence_classification")
    if r.data.packing and r.data.format == "classification":
        p.append("data.packing: packing applies to causal_lm data; set it to false for classification")
    if r.training.warmup_steps > r.training.max_steps:
        p.append(f"training.warmup_steps: {r.training.warmup_steps} is more than training.max_steps "
                 f"({r.training.max_steps}); lower it")
    if r.training.early_stopping_patience and not r.training.eval_every:
        p.append("training.early_stopping_patience: needs periodic evaluation; set training.eval_every > 0")
    if r.data.eval is None and r.data.eval_fraction == 0 and r.training.eval_every:
        p.append("training.eval_every: no evaluation data; set data.eval or data.eval_fraction > 0")
    p += _method_checks(r)
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


def data_sources(d: "DataConfig") -> list[SourceConfig]:
    """data.train as a list of sources (one, weight 1, for a plain path)."""
    if isinstance(d.train, str):
        return [SourceConfig(path=d.train, name=d.train)]
    return [dataclasses.replace(s, name=s.name or s.path) for s in d.train]


def eval_sources(d: "DataConfig") -> list[SourceConfig]:
    """data.eval as a list of sources ([] when unset)."""
    if d.eval is None:
        return []
    if isinstance(d.eval, str):
        return [SourceConfig(path=d.eval, name=d.eval)]
    return [dataclasses.replace(s, name=s.name or s.path) for s in d.eval]


def source_format(d: "DataConfig", s: SourceConfig) -> str:
    return s.format or d.format


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
    from .train.scores import CLASSIFICATION_METRICS, GENERATION_METRICS, METRICS

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


def _set_dotted(tree: dict, dotted: str, value: Any, problems: list[str]) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(f"override {dotted}: {part} is not a section")
            return
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str], problems: list[str]) -> dict:
    """`section.key=value` strings to a nested dict; values are read as YAML (so 3e-4, true, [a, b] work)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value, problems)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_from_dict(data: dict, source: str = "recipe") -> Recipe:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(data).__name__}"], source)
    recipe = _build(Recipe, data, "", problems)
    if not problems:
        problems.extend(_cross_checks(recipe))
    if problems:
        raise RecipeError(problems, source)
    return recipe


def load_recipe(path: Union[str, Path, None], overrides: Optional[list[str]] = None) -> Recipe:
    """Read a YAML recipe (or only defaults when path is None), apply overrides, and validate everything."""
    problems: list[str] = []
    data: dict = {}
    source = str(path) if path else "recipe"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError([f"{p}: no such recipe file"], source)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RecipeError([f"{p}: not valid YAML ({exc})"], source) from None
        if not isinstance(data, dict):
            raise RecipeError([f"{p}: the top level must be a mapping of sections"], source)
    extra = parse_overrides(overrides or [], problems)
    if problems:
        raise RecipeError(problems, source)
    return recipe_from_dict(_merge(data, extra), source)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def describe_schema(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf: used by `dist-ft check --schema` and the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe_schema(hints[f.name], key + "."))
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((key, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows
