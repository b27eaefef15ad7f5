"""The recipe's schema: its typed sections (dataclasses), the Literal types of its choices, and each field's
default, one-line help and numeric bounds.

Every default lives here, and nowhere else. Checks that need more than one field are in checks.py; strict loading
from YAML and overrides in load.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..distributed.spec import names as backend_names


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **bounds: Any) -> Any:
    """A schema field: its default, a one-line description and optional numeric bounds (ge, gt, le)."""
    meta = {"help": help, **bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


Task = Literal["causal_lm", "sequence_classification", "seq2seq_lm", "image_classification"]
DataFormat = Literal["text", "instruction", "alpaca", "chat", "sharegpt", "classification", "preference",
                     "unpaired_preference"]
PREFERENCE_FORMATS = ("preference", "unpaired_preference")  # pairs (or labelled answers) of a preference objective
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
                   "(smollm2-135m-instruct, minilm-l6-v2, t5-mini-random, vit-small-random).")
    task: Task = _f("causal_lm", "What the model learns: next-token prediction (causal_lm), sequence classification, "
                    "or an encoder-decoder's answer to its input (seq2seq_lm: T5, BART; the prompt is the encoder's "
                    "input, the answer the decoder's targets), or image classification (image_classification: ViT, "
                    "ResNet, any AutoModelForImageClassification; data.format classification with an image column).")
    num_labels: Optional[int] = _f(None, "Number of classes for sequence or image classification (None: taken "
                                   "from the data's labels).", ge=2)
    attn_implementation: AttnImpl = _f("auto", "Attention kernel; auto picks flash-attention on capable GPUs, "
                                       "SDPA elsewhere.")
    trust_remote_code: bool = _f(False, "Run the model folder's own Python code. Off unless you trust the folder.")


@dataclass
class DataColumns:
    text: str = _f("text", "Column holding the text (format: text, classification).")
    image: str = _f("image", "Column holding the image (model.task image_classification): a file path, relative to "
                    "the data file's folder, or the image file's bytes (a {bytes, path} struct, as datasets' Image "
                    "feature writes parquet, works too).")
    prompt: str = _f("prompt", "Column holding the instruction (format: instruction).")
    response: str = _f("response", "Column holding the answer (format: instruction).")
    messages: str = _f("messages", "Column holding the list of {role, content} turns (format: chat).")
    instruction: str = _f("instruction", "Column holding the instruction (format: alpaca).")
    input: str = _f("input", "Column holding the instruction's input, may be absent or empty (format: alpaca).")
    output: str = _f("output", "Column holding the answer (format: alpaca).")
    conversations: str = _f("conversations", "Column holding the list of {from, value} turns (format: sharegpt).")
    label: str = _f("label", "Column holding the class, a name or an integer (format: classification); whether the "
                    "completion is desirable, true/false (format: unpaired_preference).")
    chosen: str = _f("chosen", "Column holding the preferred answer, a string or assistant message(s) (format: "
                     "preference; its prompt is in `prompt`: a string or the conversation so far).")
    rejected: str = _f("rejected", "Column holding the answer not preferred (format: preference).")
    completion: str = _f("completion", "Column holding the answer (format: unpaired_preference).")


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
class AugmentConfig:
    max_shift: int = _f(0, "Shift each training image by up to N pixels each way (after the image processor; "
                        "uncovered pixels 0, the normalised mean). 0: off.", ge=0)
    flip: bool = _f(False, "Mirror each training image left-right with probability 1/2 (not for digits or text).")


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
    augment: AugmentConfig = _f(factory=AugmentConfig, help="Image augmentations (model.task image_classification), "
                                "drawn from the seed and each sample's position in the run: the same on any number "
                                "of ranks and after a resume.")
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
    neftune_alpha: Optional[float] = _f(None, "NEFTune: add uniform noise in [-1, 1] x alpha/sqrt(L*d) (L the padded "
                                        "row length, d the hidden size) to the input embeddings in training "
                                        "forwards only, never in evaluation or generation; the paper uses 5, 10, "
                                        "15 (None: off).", gt=0.0)
    fused_loss: bool = _f(False, "Compute a causal LM's output head and cross-entropy together over chunks of "
                          "target rows, forward and backward, so the [targets x vocab] logits and their gradient "
                          "never exist whole (Liger Kernel's fused linear cross-entropy): the step's largest "
                          "tensor on 128k+ vocabularies. SFT and the preference objectives' policy log-probs; plain linear "
                          "heads.")
    compile: bool = _f(False, "torch.compile each transformer block before the backend wraps or shards the model "
                       "(ddp, fsdp); compile time is reported apart from step time.")


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
    shard_group_size: Optional[int] = _f(
        None, "Hybrid sharding: ranks per shard group, usually the GPUs of one node. Parameters, gradients and "
        "optimizer state are sharded within each group and replicated across groups, so the per-block gathers stay "
        "on the fast links inside a node and only a gradient all-reduce crosses nodes (fsdp: a 2-D device mesh; "
        "zero3: ZeRO++ hierarchical partitioning). Must divide the world size. None: shard over every rank.", ge=1)
    host_memory_trim: Literal["load", "blocks"] = _f(
        "load", "When freed host memory goes back to the OS (glibc's heaps keep it otherwise): load: while the "
        "weights load (always; costs nothing); blocks: also before every transformer block's forward, on CPU "
        "devices only, for CPU runs near the machine's memory (peak resident memory ~45% lower on a 1.1B QLoRA "
        "FSDP2 run, steps ~25% slower). See dist_ft/host_memory.py.")


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
class ObjectiveConfig:
    kind: Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto"] = _f(
        "sft", "What is optimised: sft, next-token loss on the answers; dpo, ipo, simpo, orpo on preference pairs "
        "(data.format: preference); kto on answers labelled desirable or not (data.format: unpaired_preference).")
    beta: Optional[float] = _f(None, "Strength of the preference term (None: the paper's default: dpo, ipo, orpo, "
                               "kto 0.1; simpo 2.0).", gt=0.0)
    label_smoothing: float = _f(0.0, "dpo: the assumed share of pairs whose labels are flipped (conservative DPO).",
                                ge=0.0, lt=0.5)
    simpo_gamma: float = _f(1.0, "simpo: the target margin between the length-normalised rewards.", ge=0.0)
    reference: Literal["auto", "adapter_off", "precomputed", "copy"] = _f(
        "auto", "dpo, ipo, kto: the reference policy. adapter_off: the model with its adapters switched off (no "
        "second copy; adapter methods). precomputed: the starting weights' log-probs of every pair, computed once "
        "and cached (full, partial). auto picks one of those two. copy: a frozen second model from the starting "
        "weights, sharded like the policy (twice the weights' memory). simpo and orpo need none.")
    kto_desirable_weight: float = _f(1.0, "kto: weight of desirable answers' losses.", gt=0.0)
    kto_undesirable_weight: float = _f(1.0, "kto: weight of undesirable answers' losses.", gt=0.0)

    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else (2.0 if self.kind == "simpo" else 0.1)


@dataclass
class Recipe:
    output_dir: str = _f("runs/default", "Run directory: config.yaml, metrics.jsonl, final/.")
    seed: int = _f(0, "Seed for weights that start random, data order and dropout.", ge=0)
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty output_dir (its files are replaced).")
    model: ModelConfig = _f(factory=ModelConfig, help="What is fine-tuned.")
    data: DataConfig = _f(factory=DataConfig, help="What it learns from.")
    method: MethodConfig = _f(factory=MethodConfig, help="Which weights are trained.")
    objective: ObjectiveConfig = _f(factory=ObjectiveConfig, help="What is optimised: SFT or a preference loss.")
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


# ---------------------------------------------------------------------------------- the data section's sources

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
