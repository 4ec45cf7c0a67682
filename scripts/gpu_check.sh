#!/usr/bin/env bash
# The CUDA checks (tests/test_cuda.py), for a machine with an NVIDIA GPU: every plugin fits in fp32 and
# bf16-mixed, channel pruning shrinks, int8-converted models (10-class head included) run on the GPU
# and agree with the CPU; the weight rounding gives the CPU's grid; a compiled (inductor) QAT fit is one graph
# and converts; pruning and QAT on FSDP2 shards (NCCL, up to 2 GPUs, bf16-mixed) resume exactly; a Hugging
# Face Llama (needs transformers) prunes 2:4 and trains int8 QAT in fp32 and bf16-mixed, and converts.
# Prints the versions first; without a GPU it stops with status 1 (ALLOW_NO_GPU=1: every test is skipped,
# with the reason). PYTHON overrides the interpreter (default: ./.venv/bin/python if present, else python3);
# extra arguments go to pytest (e.g. -x, -k int8). On a machine without a package index, wheels that
# scripts/gpu_wheels.sh downloaded into .whl/ elsewhere are installed into a temporary folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    # only what the interpreter lacks: a carried wheel must not hide a package built for the machine's own torch
    mapfile -t MISSING < <("$PYTHON" - .whl/*.whl <<'PY'
import importlib.metadata as metadata, os, sys
for wheel in sys.argv[1:]:
    try:
        metadata.version(os.path.basename(wheel).split("-")[0])
    except metadata.PackageNotFoundError:
        print(wheel)
PY
)
    [ ${#MISSING[@]} -eq 0 ] || "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${MISSING[@]}"
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "PYTHONPATH=$PYTHONPATH (the wheels of .whl/)"
fi
"$PYTHON" - <<'PY'
import os, sys
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available: {cuda}")
if cuda:
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}), bf16: {torch.cuda.is_bf16_supported()}")
elif os.environ.get("ALLOW_NO_GPU") != "1":
    sys.exit("no CUDA GPU: these checks would all be skipped (ALLOW_NO_GPU=1 runs them anyway)")
PY
exec "$PYTHON" -m pytest tests/test_cuda.py tests/test_fsdp.py::test_fsdp2_prune_and_qat_on_cuda \
    tests/test_huggingface.py::test_a_llama_prunes_two_of_four_and_quantises_on_cuda -q -rs -p no:cacheprovider -n 0 "$@"
