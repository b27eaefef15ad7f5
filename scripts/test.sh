#!/usr/bin/env bash
# Set up .venv/ (if needed) and run the test suite that CI runs: everything but the `slow` and `gpu` marks.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the slow suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu"; fi
exec .venv/bin/python -m pytest "$@"
