"""Reading the pickles inside checkpoints without running code from them.

Two libraries we build on unpickle checkpoint files: torch.distributed.checkpoint reads its `.metadata` with
`pickle.load`, and DeepSpeed reads `*_states.pt` with `torch.load(weights_only=False)`. A crafted file in either
place runs arbitrary code the moment a resume starts, and a checkpoint folder is exactly what people copy between
clusters and download. The manifest's checksums do not help here: whoever can write the files can write it too.

So both are read with torch's weights-only unpickler, which builds tensors, containers and the classes listed
below and refuses everything else. The lists hold what those files legitimately contain (the metadata dataclasses
of DCP; DeepSpeed's enums, configs and loss scaler state); a file that needs anything more is refused with the
file and the global named. A user who made the file and trusts it can list it in `checkpoint.allow_pickle`.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Iterable

import torch


_TORCH_LOAD = torch.load  # the real one, whatever a guard below has put in its place meanwhile


class UnsafePickleError(RuntimeError):
    """A checkpoint file asked the unpickler for something other than data."""


# Files the recipe's `checkpoint.allow_pickle` trusts, for this process (set once by the trainer and export).
ALLOWED: set[str] = set()


def allow(paths: Iterable[str]) -> None:
    ALLOWED.update(str(Path(p).resolve()) for p in paths)


def _allowed(path: Path, extra: Iterable[str]) -> bool:
    return str(path.resolve()) in ALLOWED | {str(Path(a).resolve()) for a in extra}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` (protocol 4, which torch's weights-only unpickler does not read): only the classes DCP
    defines for it, paths, and torch's size, dtype, layout and memory-format values."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        import importlib

        if module in self.MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:  # defined there, not merely imported
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout  # a string to a torch.layout
        elif module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            import pathlib
            return getattr(pathlib, name)
        elif (module, name) == ("collections", "OrderedDict"):
            import collections
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"the file asks for {module}.{name}, which is not data")


def _deepspeed_globals() -> list:
    """What DeepSpeed 0.14-0.19 writes into model and optimizer state files, besides tensors and containers."""
    import argparse
    import collections
    import enum

    out: list = [argparse.Namespace, collections.OrderedDict, enum.Enum]
    for module, names in (
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.runtime.zero.offload_config", ("OffloadDeviceEnum",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out


def _refusal(path: Path, exc: Exception) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused to unpickle it: {exc}. A checkpoint needs only tensors and plain data, so this file was "
        "changed or made by something else. If you made it and trust it, list it in checkpoint.allow_pickle.")


def load_weights_only(path: Path, extra_globals: Iterable = (), *, allow: Iterable[str] = (), **kwargs):
    """`torch.load` that never runs code from the file (unless `path` is in `allow`)."""
    path = Path(path)
    if _allowed(path, allow):
        return _TORCH_LOAD(path, weights_only=False, **kwargs)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return _TORCH_LOAD(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None


def load_dcp_metadata(path: Path, *, allow: Iterable[str] = ()):
    """A DCP `.metadata` pickle, read without running code (unless `path` is allowed)."""
    path = Path(path)
    data = path.read_bytes()
    if _allowed(path, allow):
        return pickle.loads(data)
    try:
        return _DcpMetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, AttributeError, TypeError, EOFError) as exc:
        raise _refusal(path, exc) from None


def dcp_reader(folder: Path, *, allow: Iterable[str] = ()):
    """A DCP FileSystemReader whose metadata is read without running code."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    allow = tuple(allow)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            metadata = load_dcp_metadata(Path(self.path) / name, allow=allow)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


@contextlib.contextmanager
def deepspeed_loads_weights_only(allow: Iterable[str] = ()):
    """While DeepSpeed loads a checkpoint, its `torch.load(..., weights_only=False)` calls become weights-only."""
    real = _TORCH_LOAD
    allow = tuple(allow)
    extra = _deepspeed_globals()

    def guarded(f, map_location=None, *, weights_only=None, **kwargs):
        kwargs.pop("pickle_module", None)
        if isinstance(f, (str, Path)):
            return load_weights_only(Path(f), extra, allow=allow, map_location=map_location, **kwargs)
        with torch.serialization.safe_globals(extra):
            return real(f, map_location=map_location, weights_only=True, **kwargs)

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = real


def run_module_weights_only(module: str, argv: list[str], trusted: Iterable[str] = ()) -> None:
    """Run a library's command-line module (DeepSpeed's checkpoint converter) with the guard on; `trusted`: the
    files checkpoint.allow_pickle lists."""
    import runpy
    import sys

    allow(trusted)
    sys.argv = [module, *argv]
    with deepspeed_loads_weights_only():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def _main(argv: list[str]) -> None:
    """python -m dist_ft.safe_load [--allow FILE]... MODULE [ARGS...]"""
    trusted = []
    while argv[:1] == ["--allow"]:
        trusted.append(argv[1])
        argv = argv[2:]
    run_module_weights_only(argv[0], argv[1:], trusted)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
