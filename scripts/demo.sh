#!/usr/bin/env bash
# Set up .venv/ (if needed) and run the demo: a real LoRA fine-tune of the bundled SmolLM2-135M-Instruct on
# WordNet definitions, on 2 CPU processes (or every GPU). Extra arguments go to `dist-ft demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dist-ft demo "$@"
