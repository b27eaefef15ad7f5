"""`dist-ft export`: a Hugging Face folder (or PEFT adapter folder) from any checkpoint or finished run.

One process, no process group: the model is rebuilt from the recipe stored with the checkpoint (base weights from
its model path, the method applied), the checkpoint's trained tensors are read into it (DCP's metadata says which
it holds; DeepSpeed's ZeRO files are consolidated by DeepSpeed's own reader), and the result is written with
`save_pretrained` (safetensors) under a temporary name, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from . import store as ckpt
from ..config import Recipe, recipe_from_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_source(source: Path) -> tuple[str, Path]:
    """("final", folder) for a saved model, ("checkpoint", folder) for a checkpoint."""
    if (source / ckpt.MANIFEST).is_file():
        return "checkpoint", source
    if (source / "config.json").is_file() or (source / "adapter_config.json").is_file():
        return "final", source
    if (source / "final").is_dir():
        return "final", source / "final"
    complete, incomplete = ckpt.list_checkpoints(ckpt.checkpoints_root(source))
    if complete:
        return "checkpoint", complete[0].path
    why = f" ({incomplete[0].problem})" if incomplete else ""
    raise ckpt.CheckpointError(f"{source}: neither a checkpoint (no {ckpt.MANIFEST}), a saved model, nor a run "
                               f"directory with final/ or a complete checkpoint{why}")


def _recipe_for(kind: str, folder: Path) -> Recipe:
    path = folder / "recipe.yaml" if kind == "checkpoint" else folder.parent / "config.yaml"
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path}: missing: the recipe that trained {folder} is needed to rebuild it")
    return recipe_from_dict(yaml.safe_load(path.read_text()) or {}, source=str(path))


def load_trained(source: str | Path) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) as the run trained them, on CPU, from a checkpoint or a finished run's folder."""
    from ..assets import resolve_model_path
    from ..distributed.precision import precision_plan
    from ..model import ModelBuilder, load_tokenizer

    kind, folder = resolve_source(Path(source))
    recipe = _recipe_for(kind, folder)
    if recipe.model.task == "image_classification":  # (no tokenizer to pair it with: an image processor)
        raise ckpt.CheckpointError(
            f"{folder}: dist-ft export does not handle image classifiers yet; a finished run's final/ is already a "
            "Hugging Face folder with its image processor (full and partial: AutoModelForImageClassification."
            "from_pretrained; LoRA: peft's PeftModel.from_pretrained on the base)")
    state = {}
    if kind == "checkpoint":
        manifest = ckpt.read_manifest(folder)
        bad = ckpt.size_problems(folder, manifest)
        if bad:
            raise ckpt.CheckpointError("; ".join(bad))
        state = json.loads((folder / "trainer_state.json").read_text())
        tok = load_tokenizer(folder / "tokenizer")
    else:
        tok = load_tokenizer(folder)
    model_path = resolve_model_path(recipe.model.path)
    build = state.get("model_build", {})
    num_labels, label_names = build.get("num_labels"), build.get("label_names") or []
    if kind == "final" and recipe.model.task == "sequence_classification" and num_labels is None:
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        label_names = [cfg["id2label"][k] for k in sorted(cfg.get("id2label", {}), key=int)]
        num_labels = len(label_names) or None
    builder = ModelBuilder(recipe, model_path, num_labels=num_labels, label_names=label_names,
                           pad_token_id=tok.pad_token_id, dtype=precision_plan(recipe.distributed.precision).param_dtype,
                           attn_implementation="sdpa")
    if kind == "final":
        return _load_final(builder, folder), tok
    # A qlora base is rebuilt in full precision: the adapter is the same, and merging into 4-bit would lose it.
    model = builder.build(quantize=False)
    lora = recipe.method.kind != "full"
    if manifest["state_format"] == "dcp":
        from ..distributed.dcp_state import load_model_only
        names = load_model_only(model, folder / "state", skip_quant_state=recipe.method.kind == "qlora")
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder / "state"), tag="ds",
                                                      exclude_frozen_parameters=lora)
        own = model.state_dict()
        strange = [k for k in sd if k not in own]
        if strange:
            raise ckpt.CheckpointError(f"{folder / 'state'}: holds tensors the model lacks: {strange[:5]}")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=not lora)
        names = list(sd)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n not in set(names)]
    if missing:
        raise ckpt.CheckpointError(f"{folder / 'state'}: lacks trained tensors {missing[:5]} (an empty adapter?)")
    return model.eval(), tok


def _load_final(builder, folder: Path) -> torch.nn.Module:
    cls = builder._auto_class()
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel
        base = cls.from_pretrained(builder.path, config=builder.config(), dtype=builder.dtype,
                                   attn_implementation="sdpa")
        return PeftModel.from_pretrained(base, folder).eval()
    return cls.from_pretrained(folder, dtype=builder.dtype, attn_implementation="sdpa").eval()


def export(source: str | Path, out: str | Path, *, merge_lora: bool = False, dtype: str | None = None) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; choose a new folder (nothing was written)")
    model, tok = load_trained(source)
    is_peft = hasattr(model, "peft_config")
    if merge_lora:
        if not is_peft:
            raise ckpt.CheckpointError(f"--merge-lora: {source} holds a fully fine-tuned model, not an adapter; "
                                       "leave --merge-lora out")
        model = model.merge_and_unload()
        is_peft = False
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    if not is_peft:
        model.config.use_cache = True  # training turned it off; generation wants it back
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out
