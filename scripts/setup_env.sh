#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything the project needs, and install the project into it
# (editable, building the optional C++ CPU kernels). Safe to re-run.
#   TORCH_SPEC  torch (+ torchvision) requirement installed when the venv has no importable matching pair
#               (default torch==2.14.1 torchvision==0.29.1: a CUDA build that also runs on CPU; timm needs
#               torchvision, and PyPI's torchvision does not import beside the CPU-only torch 2.13 wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
# Test / benchmark dependencies, pinned: timm's and the ONNX exporter's APIs move between releases, and
# the static GPU audit's committed compile cache is keyed by the Triton version (torch 2.14.1 needs 3.8).
DEPS="timm==1.0.31 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 tqdm==4.70.1 triton==3.8.0 ruff==0.17.6
      numpy pytest pytest-benchmark matplotlib ninja setuptools wheel"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  # shellcheck disable=SC2086  # a list of requirements
  "$VPY" -m pip install -q $TORCH_SPEC
fi
echo "[setup] installing test / benchmark dependencies"
# shellcheck disable=SC2086
"$VPY" -m pip install -q $DEPS
echo "[setup] installing transxnet-kernels (editable; builds the C++ CPU kernels)"
"$VPY" -m pip install -q --no-build-isolation -e .
"$VPY" - <<'PY'
import timm, torch, torchvision, transxnet_kernels
print(f"[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}; "
      f"backends: {transxnet_kernels.available_backends()}")
PY
