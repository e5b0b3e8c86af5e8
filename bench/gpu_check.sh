#!/usr/bin/env bash
# The whole GPU check in one script, for the GPU machine (python3 with a CUDA torch, nvcc,
# ninja, pytest; no network): build the extension from source, run the CUDA tests, run the
# CUDA benchmarks (Elman, LSTM, GRU) and the grid-sync microbenchmark (bench/grid_sync.cu),
# and print a short summary table last. Not yet run on a GPU.
#
#   bash bench/gpu_check.sh           everything, within 400 s
#   bash bench/gpu_check.sh --quick   the rerun after a fix: the same tests (-x), three
#                                     benchmark shapes with 5 repeats, within 300 s
#
# Every stage's timeout is cut to what is left of that budget, so the whole run fits a
# 7-minute device slot. Results go to $OUT (else bench/results/gpu_check/) as at most 6 files:
# summary.txt, logs.tar.gz (every stage's log, the JUnit reports, the LSTM/GRU plots) and
# the benchmarks' rnn_cuda.{json,png}, lstm_cuda.json, gru_cuda.json.
#
# A failing stage does not stop the later ones (a test failure still leaves the timings to
# look at); the script exits non-zero if any stage failed. A build failure stops everything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK=0
case "${1:-}" in
  --quick) QUICK=1 ;;
  "") ;;
  *) echo "gpu_check.sh: the only option is --quick, got '$1'" >&2; exit 2 ;;
esac
DEST="${OUT:-$ROOT/bench/results/gpu_check}"
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # gathered into $DEST at the end
trap 'rm -rf "$LOGS"' EXIT
mkdir -p "$DEST"
BUDGET=$((QUICK ? 300 : 400))
PY="${PYTHON:-python3}"
start=$SECONDS
declare -a SUMMARY=()
failed=0

stage() { echo; echo "== gpu_check [$((SECONDS - start))s]: $*"; }

# run_stage NAME TIMEOUT_S CMD...: runs CMD with its output shown and logged to $LOGS/NAME.log,
# and records the outcome for the summary.
run_stage() {
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  local left=$((BUDGET - 15 - (SECONDS - start)))  # 15 s kept for gathering the results
  ((limit <= left)) || limit=$left
  if ((limit < 5)); then
    SUMMARY+=("$(printf '%-12s %-18s %5ss' "$name" "SKIPPED (budget)" 0)")
    failed=1
    return 1
  fi
  stage "$name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" || rc=$?
  local status="ok"
  if [[ $rc -eq 124 ]]; then status="TIMEOUT (${limit}s)"; elif [[ $rc -ne 0 ]]; then status="FAILED (rc=$rc)"; fi
  [[ $rc -eq 0 ]] || failed=1
  SUMMARY+=("$(printf '%-12s %-18s %5ss' "$name" "$status" "$((SECONDS - t0))")")
  return $rc
}


export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0+PTX}"

# finish: the summary table, and the results gathered into $DEST (at most 6 files)
finish() {
  {
    echo "== gpu_check summary ($((SECONDS - start))s in all, budget ${BUDGET}s, quick=$QUICK)"
    printf '%-12s %-18s %6s\n' stage status time
    printf '%s\n' "${SUMMARY[@]}"
  } | tee "$LOGS/summary.txt"
  cp "$LOGS/summary.txt" "$DEST/"
  for f in rnn_cuda.json rnn_cuda.png lstm_cuda.json gru_cuda.json; do
    [[ ! -f "$LOGS/$f" ]] || cp "$LOGS/$f" "$DEST/"
  done
  tar -czf "$DEST/logs.tar.gz" -C "$LOGS" .
  echo "results in $DEST"
}

export PY
run_stage machine 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nvcc --version | tail -n 1 || echo "nvcc not on PATH (torch looks in CUDA_HOME)"
"$PY" -c "import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"GPU:\", torch.cuda.is_available())"' || true
rm -rf build  # ninja's state from another torch or machine
if ! run_stage build 240 "$PY" setup.py build_ext --inplace; then
  echo "gpu_check: the build failed, nothing else can run (log: build.log in logs.tar.gz)" >&2
  finish
  exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

run_stage import 30 "$PY" -c "
import torch
from rnnlm_ext import ops
info = ops.build_info()
print(info)
assert info['cuda'], 'the extension was built without CUDA kernels'
assert torch.cuda.is_available(), 'no GPU visible to torch'
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')
" || true

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -x)
run_stage tests 90 "${PYTEST[@]}" tests/test_cuda.py --junitxml="$LOGS/test_cuda.xml" || true
run_stage cell_tests 60 "${PYTEST[@]}" tests/test_cuda_cells.py --junitxml="$LOGS/test_cuda_cells.xml" || true
run_stage op_tests 40 "${PYTEST[@]}" tests/test_op.py tests/test_op_edges.py tests/test_gru_op.py -k cuda || true

# quick: three shapes (small, wide, large batch), 5 repeats; else the full GPU grid, 10
# repeats (a benchmark writes its JSON at the end: one cut off by its timeout returns nothing)
BENCH=(--device cuda --out "$LOGS")
if ((QUICK)); then
  BENCH+=(--shapes "128,8,256;128,64,1024;128,256,512" --repeats 5)
else
  BENCH+=(--repeats 10)
fi
run_stage bench 90 "$PY" bench/bench_rnn.py "${BENCH[@]}" || true
run_stage bench_lstm 45 "$PY" bench/bench_rnn.py --cell lstm "${BENCH[@]}" || true
run_stage bench_gru 45 "$PY" bench/bench_rnn.py --cell gru "${BENCH[@]}" || true

# one grid-wide synchronisation of the persistent kernels' grid: the floor of their time per
# step (compare with the persistent fwd ms ÷ T in the bench table); a standalone tool
NVCC="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
mkdir -p build
run_stage grid_sync 30 bash -c "'$NVCC' -O3 -std=c++17 -arch=sm_90 bench/grid_sync.cu \
  -o build/grid_sync && build/grid_sync" || true

# which CUDA path each shape of the benchmark grid takes when left to choose
run_stage paths 15 "$PY" -c "
import torch
from rnnlm_ext import ops

Hs = [128, 256, 512, 1024, 2048]
for dtype in (torch.float32, torch.bfloat16):
    print(f'{str(dtype):16s}' + ''.join(f'H={H:<11d}' for H in Hs))
    for B in (1, 8, 32, 64, 256):
        print(f'  B={B:<12d}' + ''.join(f'{ops.cuda_path(B, H, dtype, \"auto\"):13s}' for H in Hs))
" || true

finish
exit $failed
