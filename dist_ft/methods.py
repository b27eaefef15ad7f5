"""Fine-tuning methods: which weights train, and how.

    full            every weight
    lora, qlora     a LoRA/DoRA/rsLoRA adapter (peft); qlora puts it on a 4- or 8-bit bitsandbytes base
    ia3, prompt_tuning, prefix_tuning      the other peft methods
    partial         chosen parts: the last N blocks, the head, the embeddings, bias terms only (BitFit), and
                    optionally gradual unfreezing (one more block from the top every K steps or epochs)

and, with any of them, NEFTune (training.neftune_alpha): noise on the input embeddings in training forwards.

Single-device code like model.py: strategies see only `requires_grad` flags (and, for gradual unfreezing, a
gradient mask, below).
"""

from __future__ import annotations

import math

import torch

from .config import Recipe

PEFT_KINDS = ("lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")


def is_adapter(recipe: Recipe) -> bool:
    return recipe.method.kind in PEFT_KINDS


def quantization_config(recipe: Recipe):
    """The bitsandbytes config for qlora (None for every other method)."""
    if recipe.method.kind != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    q = recipe.method.quant
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = q.compute_dtype
    if compute == "auto":
        compute = "bf16" if recipe.distributed.precision.startswith("bf16") else "fp32"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=torch.bfloat16 if compute == "bf16" else torch.float32)


def apply_method(model: torch.nn.Module, recipe: Recipe, *, model_path: str | None = None) -> torch.nn.Module:
    m = recipe.method
    if m.kind == "full":
        model.requires_grad_(True)
        return model
    if m.kind == "partial":
        freeze_for_partial(model, recipe)
        return model
    import peft

    if recipe.model.task == "image_classification":
        return _image_lora(model, recipe)
    task = {"causal_lm": peft.TaskType.CAUSAL_LM, "seq2seq_lm": peft.TaskType.SEQ_2_SEQ_LM,
            "sequence_classification": peft.TaskType.SEQ_CLS}[recipe.model.task]
    save = list(m.modules_to_save) or None
    if m.kind in ("lora", "qlora"):
        if m.kind == "qlora" and not recipe.distributed.precision.endswith("-true"):
            # Mixed precision: peft's preparation keeps the 16-bit weights that are not quantised (embeddings, head,
            # norms) in fp32, as mixed precision keeps every weight. In bf16-true/fp16-true they stay 16-bit, as the
            # recipe asked and as TRL does for sharded QLoRA: peft's fp32 copies doubled the embedding and head's
            # memory and their FSDP2 all-gathers (13B: +0.6 GB per rank). No AC is switched on here: that is the
            # recipe's distributed.activation_checkpointing (get_peft_model freezes the base either way).
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        cfg = peft.LoraConfig(task_type=task, r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                              target_modules=m.lora.target_modules, use_rslora=m.lora.use_rslora,
                              use_dora=m.lora.use_dora, modules_to_save=save)
    elif m.kind == "ia3":
        cfg = peft.IA3Config(task_type=task, target_modules=m.ia3.target_modules,
                             feedforward_modules=m.ia3.feedforward_modules, modules_to_save=save)
    elif m.kind == "prompt_tuning":
        text = m.prompt.init_text
        cfg = peft.PromptTuningConfig(
            task_type=task, num_virtual_tokens=m.prompt.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text, tokenizer_name_or_path=str(model_path) if text else None)
    elif m.kind == "prefix_tuning":
        cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=m.prompt.num_virtual_tokens)
    else:
        raise ValueError(f"method.kind: {m.kind!r} is not supported")
    return _peft_model(model, cfg, recipe)


def _peft_model(model: torch.nn.Module, cfg, recipe: Recipe) -> torch.nn.Module:
    """peft's model, its trainable weights in the recipe's storage dtype. peft creates adapters in fp32 beside a
    16-bit base (autocast_adapter_dtype), right for mixed precision, whose masters are fp32. Under bf16-true it made
    the adapters, their gradients and optimizer state fp32 under DDP and FSDP2, where DeepSpeed (which casts its
    module to bf16) had them in bf16, and cost two casts per adapted Linear per pass: bf16-true is 16 bits
    throughout, as the plan counts it and as litgpt and torchtune train LoRA."""
    import peft

    true16 = recipe.distributed.precision.endswith("-true")
    model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=not true16)
    if true16:
        from .distributed.precision import precision_plan
        dtype = precision_plan(recipe.distributed.precision).param_dtype
        for p in model.parameters():  # what peft left fp32 (an adapter beside a 4-bit base, a prompt encoder)
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def image_head_modules(model: torch.nn.Module) -> list[str]:
    """The top-level modules of an image classifier outside its base model: the head (ViT's and ResNet's
    `classifier`)."""
    prefix = getattr(model, "base_model_prefix", "")
    return [n for n, _ in model.named_children() if n != prefix]


def image_lora_targets(model: torch.nn.Module, targets) -> list[str] | str:
    """LoRA's target modules on an image classifier: "all-linear" is every nn.Linear outside the head (ViT's query,
    key, value, attention output and MLP), named by full path so that the head is never adapted; a list is given to
    peft as it is (peft also adapts nn.Conv2d: ResNet's `convolution`)."""
    if targets != "all-linear":
        return targets
    head = tuple(image_head_modules(model))
    names = [n for n, mod in model.named_modules()
             if isinstance(mod, torch.nn.Linear) and not n.split(".")[0] in head]
    if not names:
        from .config import RecipeError
        convs = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Conv2d)})
        raise RecipeError([f"method.lora.target_modules: {type(model).__name__} has no linear layer outside its "
                           "head, so all-linear adapts nothing; name its convolutions (peft's LoRA adapts "
                           f"nn.Conv2d), e.g. method.lora.target_modules: [{', '.join(convs[:3])}]"])
    return names


def _image_lora(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """LoRA on an image classifier: peft's generic PeftModel (no task type: peft has none for images), the head
    trained in full beside the adapter, as peft's SEQ_CLS does for a text classifier's."""
    import peft

    m = recipe.method
    if m.kind != "lora":
        raise ValueError(f"method.kind: {m.kind!r} is not supported for image_classification")
    save = sorted(set(m.modules_to_save) | set(image_head_modules(model)))
    cfg = peft.LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                          target_modules=image_lora_targets(model, m.lora.target_modules),
                          use_rslora=m.lora.use_rslora, use_dora=m.lora.use_dora, modules_to_save=save)
    return _peft_model(model, cfg, recipe)


def add_neftune(model: torch.nn.Module, alpha: float):
    """NEFTune (Jain et al. 2023) through transformers' own hook, on the input embedding module (the base model's,
    under a peft wrapper): uniform noise in +-alpha/sqrt(L*d) on the embeddings of every forward made in training
    mode. Evaluation and generation switch the model to eval mode, so they see none. Registered on the module
    itself, before any strategy wraps the model: the hook stays on it inside DDP, FSDP2 and DeepSpeed engines.
    Returns the hook's handle."""
    from transformers.integrations.neftune import activate_neftune

    try:
        return activate_neftune(model, alpha)
    except (NotImplementedError, AttributeError) as e:
        from .config import RecipeError
        raise RecipeError([f"training.neftune_alpha: {type(model).__name__} has no input embedding module to add "
                           f"NEFTune's noise to ({e}); remove training.neftune_alpha"]) from e


# ------------------------------------------------------------------------------------------------ partial

def blocks_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the transformer blocks in order: the ModuleList that holds the decoder/encoder layers."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks found for method.partial")
    return [(f"{best[0]}.{i}", b) for i, b in enumerate(best[1])]


def _head_and_embedding_names(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    head, emb = set(), set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:  # classification heads are called score / classifier
        for attr in ("score", "classifier"):
            out = getattr(model, attr, None) or out
    if out is not None:
        head = {ids[id(p)] for p in out.parameters() if id(p) in ids}
    from .blocks import input_embeddings
    inp = input_embeddings(model)  # (None for a convolutional stem: ResNet's)
    if inp is not None:
        emb = {ids[id(p)] for p in inp.parameters() if id(p) in ids}
    return head, emb


def partial_trainable_names(model: torch.nn.Module, recipe: Recipe, blocks_open: int | None = None) -> set[str]:
    """Names of the parameters `partial` trains with `blocks_open` top blocks open (default: last_blocks)."""
    pc = recipe.method.partial
    n_open = pc.last_blocks if blocks_open is None else blocks_open
    blocks = blocks_of(model)
    names: set[str] = set()
    for prefix, _ in blocks[len(blocks) - n_open:] if n_open else []:
        names |= {n for n, _ in model.named_parameters() if n.startswith(prefix + ".")}
    if pc.bias_only:
        names |= {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    head, emb = _head_and_embedding_names(model)
    if pc.head:
        names |= head
    if pc.embeddings:
        names |= emb
    return names  # (with tied input/output embeddings, training the head trains the embeddings: one tensor)


def freeze_for_partial(model: torch.nn.Module, recipe: Recipe) -> None:
    pc = recipe.method.partial
    if pc.unfreeze_every_steps or pc.unfreeze_every_epochs:
        # Gradual unfreezing: every parameter that will ever train stays requires_grad (DDP and FSDP fix their
        # gradient reduction at wrap time); the ones not yet open have their gradients dropped before each step.
        model.requires_grad_(True)
        return
    names = partial_trainable_names(model, recipe)
    if not names:
        from .config import RecipeError
        raise RecipeError([f"method.partial: selects no parameter of {type(model).__name__} (bias_only: this model "
                           "has no bias terms?); choose last_blocks, head or embeddings"])
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


class UnfreezeSchedule:
    """Which parameters are open at each step of gradual unfreezing.

    Step s (1-based) has `last_blocks + (s - 1) // every` blocks open from the top, never below block
    `unfreeze_floor`; the head (and embeddings, bias terms) as configured are open from the start.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe, *, steps_per_epoch: int):
        pc = recipe.method.partial
        self.every = pc.unfreeze_every_steps or max(1, math.ceil(pc.unfreeze_every_epochs * steps_per_epoch))
        self.model, self.recipe = model, recipe
        self.n_blocks = len(blocks_of(model))
        self.max_open = self.n_blocks - pc.unfreeze_floor
        self.start = pc.last_blocks

    def open_blocks(self, step: int) -> int:
        return min(self.max_open, self.start + (step - 1) // self.every)

    def frozen_params(self, step: int) -> list[torch.nn.Parameter]:
        open_names = partial_trainable_names(self.model, self.recipe, self.open_blocks(step))
        return [p for n, p in self.model.named_parameters() if n not in open_names]
