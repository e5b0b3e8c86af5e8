#!/usr/bin/env bash
# The whole GPU check in one script, for the GPU machine (python3 with a CUDA torch, nvcc,
# ninja, pytest; no network): build the extension from source, run the CUDA tests, run the
# CUDA benchmark and the grid-sync microbenchmark (bench/grid_sync.cu), and print a short
# summary table last. Sized to take about 6 minutes on an
# H200 (not yet run on one).
#
#   bash bench/gpu_check.sh    logs, the benchmark's rnn_cuda.{json,png} and the test report go to
#                              $OUT, else bench/results/gpu_check/
#
# A failing stage does not stop the later ones (a test failure still leaves the timings to
# look at); the script exits non-zero if any stage failed. A build failure stops everything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
LOGS="${OUT:-$ROOT/bench/results/gpu_check}"
mkdir -p "$LOGS"
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
  stage "$name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" || rc=$?
  local status="ok"
  if [[ $rc -eq 124 ]]; then status="TIMEOUT (${limit}s)"; elif [[ $rc -ne 0 ]]; then status="FAILED (rc=$rc)"; fi
  [[ $rc -eq 0 ]] || failed=1
  SUMMARY+=("$(printf '%-10s %-18s %5ss' "$name" "$status" "$((SECONDS - t0))")")
  return $rc
}

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -n 1 || echo "nvcc not on PATH (torch looks in CUDA_HOME)"
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'GPU available:', torch.cuda.is_available())"

export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0+PTX}"
rm -rf build  # ninja's state from another torch or machine
if ! run_stage build 420 "$PY" setup.py build_ext --inplace; then
  echo "gpu_check: the build failed, nothing else can run (log: $LOGS/build.log)" >&2
  exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

run_stage import 60 "$PY" -c "
import torch
from rnnlm_ext import ops
info = ops.build_info()
print(info)
assert info['cuda'], 'the extension was built without CUDA kernels'
assert torch.cuda.is_available(), 'no GPU visible to torch'
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')
" || true

run_stage tests 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
  --junitxml="$LOGS/test_cuda.xml" || true
run_stage op_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_op.py -k cuda || true
run_stage cell_tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_cells.py \
  --junitxml="$LOGS/test_cuda_cells.xml" || true
run_stage gru_op_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gru_op.py -k cuda || true

run_stage bench 300 "$PY" bench/bench_rnn.py --device cuda --out "$LOGS" || true

# one grid-wide synchronisation of the persistent kernels' grid: the floor of their time per
# step (compare with the persistent fwd ms ÷ T in the bench table); a standalone tool
NVCC="$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")"
run_stage grid_sync 120 bash -c "'$NVCC' -O3 -std=c++17 -arch=sm_90 bench/grid_sync.cu \
  -o build/grid_sync && build/grid_sync" || true

# which CUDA path each shape of the benchmark grid takes when left to choose
run_stage paths 60 "$PY" -c "
import torch
from rnnlm_ext import ops

Hs = [128, 256, 512, 1024, 2048]
for dtype in (torch.float32, torch.bfloat16):
    print(f'{str(dtype):16s}' + ''.join(f'H={H:<11d}' for H in Hs))
    for B in (1, 8, 32, 64, 256):
        print(f'  B={B:<12d}' + ''.join(f'{ops.cuda_path(B, H, dtype, \"auto\"):13s}' for H in Hs))
" || true

echo
echo "== gpu_check summary ($((SECONDS - start))s in all; logs in $LOGS)"
printf '%-10s %-18s %6s\n' stage status time
printf '%s\n' "${SUMMARY[@]}"
exit $failed
