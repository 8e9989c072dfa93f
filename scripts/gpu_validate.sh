#!/usr/bin/env bash
# GPU validation in one call: tests on CUDA, op benchmarks, model benchmark.
# Uses the python that has torch with CUDA (no install); results land in benchmarks/results/.
# The parity tests need ../shared/parity; on a machine that has only the repository, copy it in
# (e.g. to an ignored ./parity_data) and set TRANSXNET_PARITY_DIR, or those test modules skip.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=benchmarks/results
stamp=$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
status=0
echo "== tests on CUDA"
"$PY" -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests_$stamp.log" || status=1
echo "== op benchmarks"
"$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_idconv.py benchmarks/bench_msdwconv.py benchmarks/bench_osra.py \
  --benchmark-json="$OUT/ops_$stamp.json" 2>&1 | tail -n 40 || status=1
echo "== model benchmark"
"$PY" -m benchmarks.model_benchmark "$@" || status=1
exit $status
