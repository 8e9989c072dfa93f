#!/usr/bin/env bash
# Set everything up, then run the model benchmark (the project's main job) on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.model_benchmark "$@"
