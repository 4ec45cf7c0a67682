#!/usr/bin/env bash
# Create (or reuse) ./.venv with lightning-compress installed for development.
# TORCH_SPEC overrides the torch requirement (default: torch==2.13.0, the CPU build where the index serves
# one; a plain `torch` would pull a multi-GB CUDA build). TORCH_INDEX sets the index torch comes from, e.g.
# https://download.pytorch.org/whl/cpu, whose Linux wheels are CPU-only unlike PyPI's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev,onnx,sweep]"
