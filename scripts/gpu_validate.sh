#!/usr/bin/env bash
# GPU validation in one prepared run: CUDA kernel tests, op benchmarks, model benchmark.
#
#   bash scripts/gpu_validate.sh [--quick | --full] [--out DIR]
#
# --quick (default) takes at most 8 minutes (phase limits T_TESTS=200, T_OPS=120, T_MODEL=150 seconds,
#   overridable from the environment): the op, backend and accelerated-model tests on CUDA
#   (TRANSXNET_REQUIRE_BACKENDS=triton, no -x), the op benchmarks at the TransXNet-T stage shapes (eager,
#   Triton, SDPA/Flex for attention; torch.compile baselines at stage 1 only), and the model benchmark for T
#   in fp32 and AMP, inference and training step, eager / torch.compile / accelerated.
# --full: the whole test suite, every op benchmark shape and T/S/B in the model benchmark.
# Each phase writes its files into DIR (default benchmarks/results/gpu_<UTC stamp>) as soon as it ends, so a
# run cut short still leaves what it finished: env.txt, tests.log, tests.xml, ops.log, ops.jsonl (one line per
# benchmark case, appended as measured), model.log and the model benchmark's JSON and PNG (8 files). Uses the python that has CUDA torch and Triton (no install).
# The parity tests need ../shared/parity: copy it beside the repo or set TRANSXNET_PARITY_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=quick
OUT=benchmarks/results/gpu_$(date -u +%Y%m%d-%H%M%S)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --full) MODE=full ;;
    --out) OUT=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: bash scripts/gpu_validate.sh --$MODE --out $OUT"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda); \
print('device', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
} > "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 1; }
cat "$OUT/env.txt"
status=0

if [ "$MODE" = quick ]; then
  TESTS="tests/ops tests/test_backend.py tests/test_accelerated.py"
  OPS_FILTER="T-stage and ((not compiled and not flex and not sdpa-) or T-stage1)"
  MODEL_ARGS="--models t --modes infer,train --precisions fp32,amp --no-detection"
  T_TESTS=${T_TESTS:-200}; T_OPS=${T_OPS:-120}; T_MODEL=${T_MODEL:-150}
else
  TESTS="tests"; OPS_FILTER=""; MODEL_ARGS=""
  T_TESTS=3600; T_OPS=3600; T_MODEL=3600
fi

# Most of the tests' time on a GPU is Triton compiling kernels: spread them over the cores (pytest-xdist).
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n $(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))")
echo "== tests on CUDA ($TESTS) ${XDIST}"
# -v -rfE: each failure is named as it happens, so a phase cut short by its limit still says what failed.
TRANSXNET_REQUIRE_BACKENDS=triton timeout "$T_TESTS" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider $XDIST $TESTS \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
grep -E "(FAILED|ERROR)" "$OUT/tests.log" | tail -n 30; tail -n 3 "$OUT/tests.log"

echo "== op benchmarks"
TRANSXNET_BENCH_JSONL="$OUT/ops.jsonl" timeout "$T_OPS" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider benchmarks/bench_idconv.py benchmarks/bench_ms_ffn.py \
  benchmarks/bench_osra_attention.py ${OPS_FILTER:+-k "$OPS_FILTER"} > "$OUT/ops.log" 2>&1 || status=1
grep -E "(FAILED|ERROR)" "$OUT/ops.log" | tail -n 10; tail -n 3 "$OUT/ops.log"

echo "== model benchmark ($MODEL_ARGS)"
timeout "$T_MODEL" "$PY" -m benchmarks.model_benchmark $MODEL_ARGS --out "$OUT" > "$OUT/model.log" 2>&1 || status=1
tail -n 25 "$OUT/model.log"
exit $status
