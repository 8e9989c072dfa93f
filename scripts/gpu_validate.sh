#!/usr/bin/env bash
# GPU validation in one prepared run: op benchmarks, model benchmark, CUDA kernel tests.
#
#   bash scripts/gpu_validate.sh [--quick | --full] [--out DIR]
#
# On a GPU nearly all of a first run is Triton compiling kernels (measured on an H200, 2026-12-04: ~15 s of
# every ~16 s op-benchmark case; 164 test cases in 160 s on 8 processes). So the op benchmarks run twice:
# a compile-only pass over every core (pytest-xdist, TRANSXNET_BENCH_COMPILE_ONLY=1) fills the on-disk
# Triton and Inductor caches, then the timed pass runs serially on warm caches; and before the model benchmark,
# benchmarks.gpu_warmup replays the model's captured op calls over every core to compile its kernels.
# --quick (default) takes at most ~9 minutes (phase limits T_COMPILE=100, T_OPS=140, T_WARM=90, T_MODEL=120,
#   T_TESTS=70 seconds, overridable from the environment): the op benchmarks at the TransXNet-T stage shapes
#   (eager, Triton, SDPA for attention; torch.compile and FlexAttention baselines at stage 1 only; IDConv in bf16,
#   where its tensor-core passes run beside the Triton strips, at stage 1 only); the model
#   benchmark for T, fp32 and AMP, inference and training step, eager / accelerated (no torch.compile
#   variants: they do not finish compiling in the quick budget); then the OSRA op tests (first: the short
#   backward's in-kernel dk/dv sum rests on an arrival count that only a GPU runs concurrently), the
#   accelerated-model, backend and other op tests on CUDA in that order (TRANSXNET_REQUIRE_BACKENDS=triton, no
#   -x; a phase cut short names the failures it reached).
# --full: every op benchmark shape, T/S/B with torch.compile in the model benchmark, the whole test suite.
# Each phase writes its files into DIR (default benchmarks/results/gpu_<UTC stamp>) as soon as it ends, so a
# run cut short still leaves what it finished: env.txt, ops.log, ops.jsonl (one line per benchmark case,
# appended as measured), model.log, the model benchmark's JSON and PNG, tests.log, tests.xml (8 files). Uses
# the python that has CUDA torch and Triton (no install).
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
  TESTS="tests/ops/test_osra_attention.py tests/test_accelerated.py tests/test_backend.py tests/ops"
  OPS_FILTER="T-stage and ((not compiled and not flex and not sdpa-) or T-stage1) and not (idconv and bf16 and not stage1)"
  OPS_FILTER="$OPS_FILTER and (not tf32 or T-stage1)"
  MODELS="t"; MODEL_ARGS="--models t --modes infer,train --precisions fp32,amp --no-detection --no-compile"
  T_COMPILE=${T_COMPILE:-100}; T_OPS=${T_OPS:-140}; T_WARM=${T_WARM:-90}; T_MODEL=${T_MODEL:-120}
  T_TESTS=${T_TESTS:-70}
else
  TESTS="tests"; OPS_FILTER=""; MODELS="t s b"; MODEL_ARGS=""
  T_COMPILE=1800; T_OPS=3600; T_WARM=1800; T_MODEL=3600; T_TESTS=3600
fi

# Compiling is CPU work: one process per core (pytest-xdist), where it is installed.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n $(nproc)")
BENCHES="benchmarks/bench_idconv.py benchmarks/bench_ms_ffn.py benchmarks/bench_osra_attention.py"

echo "== op benchmarks: compile-only pass ${XDIST}"
TRANSXNET_BENCH_COMPILE_ONLY=1 timeout "$T_COMPILE" "$PY" -m pytest -q -p no:cacheprovider $XDIST $BENCHES \
  ${OPS_FILTER:+-k "$OPS_FILTER"} > "$OUT/ops_compile.log" 2>&1
tail -n 1 "$OUT/ops_compile.log"; rm -f "$OUT/ops_compile.log"  # 8 files come back from a lent machine

echo "== op benchmarks: timed"
TRANSXNET_BENCH_JSONL="$OUT/ops.jsonl" timeout "$T_OPS" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider $BENCHES \
  ${OPS_FILTER:+-k "$OPS_FILTER"} > "$OUT/ops.log" 2>&1 || status=1
grep -E "(FAILED|ERROR)" "$OUT/ops.log" | tail -n 10; tail -n 3 "$OUT/ops.log"

echo "== model kernels: parallel compile (benchmarks.gpu_warmup; models: $MODELS)"
for model in $MODELS; do
  timeout "$T_WARM" "$PY" -m benchmarks.gpu_warmup --model "$model" --input 128x224x224 --precisions fp32,amp \
    --jobs "$(nproc)" 2>&1 | tail -n 12 || status=1
done

echo "== model benchmark ($MODEL_ARGS)"
timeout "$T_MODEL" "$PY" -m benchmarks.model_benchmark $MODEL_ARGS --out "$OUT" > "$OUT/model.log" 2>&1 || status=1
tail -n 25 "$OUT/model.log"

echo "== tests on CUDA ($TESTS) ${XDIST}"
# -v -rfE: each failure is named as it happens, so a phase cut short by its limit still says what failed.
TRANSXNET_REQUIRE_BACKENDS=triton timeout "$T_TESTS" "$PY" -m pytest -v -rfE --tb=short -p no:cacheprovider $XDIST $TESTS \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
grep -E "(FAILED|ERROR)" "$OUT/tests.log" | tail -n 30; tail -n 3 "$OUT/tests.log"
exit $status
