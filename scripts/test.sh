#!/usr/bin/env bash
# Set everything up, lint (ruff check + format check), then run the whole test suite (Triton kernels
# through the interpreter on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
echo "[test] ruff check / ruff format --check"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Every backend that exists on this machine must be tested, not skipped.
export TRANSXNET_REQUIRE_BACKENDS=${TRANSXNET_REQUIRE_BACKENDS:-triton,cpp}
exec .venv/bin/python -m pytest -q --durations=15 "$@"
