"""Checkpoints that are either complete or invisible, and resumption that is exact or loud.

manager.py  CheckpointManager: what to resume from (chosen, verified, loaded), saving, keep-best, final/
store.py    the files: manifest, atomic writes, listing, hashing, keep-last (knows no backend)
rng.py      every rank's random streams as JSON
export.py   `dist-ft export`: a Hugging Face folder from any checkpoint
gguf_export.py  `dist-ft export --format gguf`: one GGUF file (LoRA merged) for llama.cpp and Ollama
"""

from .rng import restore_rng, rng_state, set_rng_state  # noqa: F401
from .store import *  # noqa: F401,F403
from .store import _sha256, _verify_adapter  # noqa: F401  (tests reach these)
