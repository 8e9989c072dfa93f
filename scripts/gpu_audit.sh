#!/usr/bin/env bash
# Static GPU audit (benchmarks/gpu_audit.py) under the newest Triton (./.venv, see setup_env.sh) and
# under triton==3.6.* (what the GPU machines run; ./.venv-triton36, created here when missing).
# Results: benchmarks/results/gpu_audit_<triton>.{json,md}, compile caches gpu_audit_cache_<triton>.json.
# Extra arguments go to the audit (e.g. --targets sm_90 --jobs 8). Then the op modules' docstring tables are
# rewritten from the newest results (benchmarks/audit_tables.py).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_env.sh
if [ ! -x .venv-triton36/bin/python ]; then
  echo "[gpu_audit] creating .venv-triton36"
  "${PYTHON:-python3}" -m venv .venv-triton36
  .venv-triton36/bin/python -m pip install -q --upgrade pip >/dev/null
  # The same torch as .venv, so that both audits replay the same captured op calls (their cache is keyed by
  # the torch version); that torch pins a newer Triton, replaced here without its dependency check.
  torch_spec="torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')"
  .venv-triton36/bin/python -m pip install -q "$torch_spec" numpy
  .venv-triton36/bin/python -m pip install -q --no-deps 'triton==3.6.*'
fi
for venv in .venv .venv-triton36; do
  echo "[gpu_audit] $("$venv/bin/python" -c 'import triton; print("triton", triton.__version__)') ($venv)"
  env -u TRITON_INTERPRET PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m benchmarks.gpu_audit "$@"
done
.venv/bin/python -m benchmarks.audit_tables
