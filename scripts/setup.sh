#!/usr/bin/env bash
# Create (or reuse) ./.venv with lightning-compress installed for development.
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0; a plain `torch`
# would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev,onnx,sweep]"
