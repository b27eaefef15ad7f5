"""Every rank's Python, NumPy and torch random streams, as JSON (nothing is unpickled to restore them)."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """This process's RNG states as JSON-able data (no pickle to load them back)."""
    py = random.getstate()
    n = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [n[0], n[1].tolist(), int(n[2]), int(n[3]), float(n[4])],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def restore_rng(folder: Path, rank: int) -> None:
    """Continue this rank's random streams from checkpoint `folder`; on a different number of ranks, new ranks
    take rank 0's."""
    path = folder / "rng" / f"rank-{rank}.json"
    set_rng_state(json.loads((path if path.is_file() else folder / "rng" / "rank-0.json").read_text()))
