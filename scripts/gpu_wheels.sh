#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels a GPU machine without one needs beside its own
# PyTorch, Lightning, transformers and onnxruntime to run scripts/gpu_check.sh and benchmarks/scale_gpu.py:
# this package's dependencies that such images rarely hold (jsonargparse and its signature readers, torchao)
# and the test plugins the suite's markers need. They land in .whl/ (git-ignored); gpu_check.sh installs
# them into a temporary folder when it finds them. PYTHON_VERSION (default 3.12) is the GPU machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
rm -rf .whl && mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "jsonargparse>=4.27.7" docstring_parser typeshed_client importlib_resources "torchao>=0.18" "pytest-rerunfailures>=14" "pytest-xdist>=3.5" execnet
ls -1 .whl
