#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything the project needs, and install the project into it
# (editable, building the optional C++ CPU kernels). Safe to re-run.
#   TORCH_SPEC  torch requirement to install when the venv has none (default torch==2.13.0, the
#               CPU build on this project's machines; e.g. TORCH_SPEC=torch for a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  "$VPY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
echo "[setup] installing test / benchmark dependencies"
"$VPY" -m pip install -q triton numpy pytest pytest-benchmark matplotlib ninja setuptools wheel ruff==0.17.6
echo "[setup] installing transxnet-kernels (editable; builds the C++ CPU kernels)"
"$VPY" -m pip install -q --no-build-isolation -e .
"$VPY" - <<'PY'
import torch, transxnet_kernels
print(f"[setup] torch {torch.__version__}; backends: {transxnet_kernels.available_backends()}")
PY
