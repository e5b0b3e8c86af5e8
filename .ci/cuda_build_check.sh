#!/usr/bin/env bash
# Builds the CUDA extension on a machine without a GPU and checks that it imports with the
# CUDA kernels registered. The main environment stays CPU-only: this uses a separate venv
# with torch 2.14.1, a CUDA 13.0 build that pip finds on local disk, and nvcc (CUDA_HOME).
#
#   RNNLM_CUDA_VENV  the venv (default /work/cudaenv if it exists, else a cache folder);
#                    created with torch==2.14.1 pybind11 ninja numpy setuptools if missing
#   CUDA_HOME        the toolkit with nvcc (default /usr/local/cuda)
#
# Copies the tree (no build outputs) to a temporary folder, builds there for sm_90 + PTX
# only (minutes on 2 cores), imports, and exits non-zero on any failure. No GPU code runs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RNNLM_CUDA_VENV:-}" ]]; then
  if [[ -d /work/cudaenv ]]; then
    RNNLM_CUDA_VENV=/work/cudaenv
  else
    RNNLM_CUDA_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/rnnlm_ext/cudaenv"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PY="$RNNLM_CUDA_VENV/bin/python"
start=$SECONDS

stage() { echo "== cuda_build_check [$((SECONDS - start))s]: $*"; }

stage "nvcc: $CUDA_HOME/bin/nvcc"
"$CUDA_HOME/bin/nvcc" --version | tail -n 1

if [[ ! -x "$PY" ]] || ! "$PY" -c "import torch, pybind11, ninja, setuptools" 2>/dev/null; then
  stage "creating the venv $RNNLM_CUDA_VENV (torch 2.14.1 from local disk)"
  python3 -m venv "$RNNLM_CUDA_VENV"
  "$PY" -m pip install --quiet torch==2.14.1 pybind11 ninja numpy setuptools
fi
"$PY" -c "import torch; assert torch.version.cuda, 'torch in $RNNLM_CUDA_VENV is a CPU build'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/rnnlm_cuda_build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
stage "copying the tree to $BUILD"
(cd "$ROOT" && tar --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.egg-info' \
  --exclude=__pycache__ -cf - .) | tar -xf - -C "$BUILD"

stage "building (TORCH_CUDA_ARCH_LIST=9.0+PTX, MAX_JOBS=$(nproc))"
(cd "$BUILD" && TORCH_CUDA_ARCH_LIST="9.0+PTX" MAX_JOBS="$(nproc)" \
  "$PY" setup.py --quiet build_ext --inplace) > "$BUILD/build.log" 2>&1 || {
  tail -n 60 "$BUILD/build.log"
  echo "cuda_build_check: FAILED to build (log above)" >&2
  exit 1
}

stage "importing and checking the CUDA registration"
(cd "$BUILD" && "$PY" - <<'EOF'
import torch

from rnnlm_ext import ops

info = ops.build_info()
assert info["cuda"] is True, f"build_info()['cuda'] is {info['cuda']!r}: the CPU extension was built"
CELLS = ("rnn", "lstm", "gru")
for cell in CELLS:
    for op in (f"rnnlm_ext::{cell}_forward", f"rnnlm_ext::{cell}_backward"):
        for key in ("CUDA", "CPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
assert torch._C._dispatch_has_kernel(
    "rnnlm_ext::cuda_path"
), "rnnlm_ext::cuda_path is not registered"
for cell in CELLS:
    for pass_ in ("forward", "backward"):
        op = getattr(torch.ops.rnnlm_ext, f"{cell}_{pass_}")
        assert 'str cuda_path="auto"' in str(op.default._schema), f"{op} takes no cuda_path argument"
print("the rnn, lstm and gru forward and backward ops have CPU and CUDA kernels and a cuda_path",
      "argument; cuda_path is registered")
print("build_info:", info)
EOF
)
stage "OK"
