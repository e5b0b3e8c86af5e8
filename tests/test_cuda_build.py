"""The CUDA extension builds and registers its kernels, on a machine without a GPU.

Runs .ci/cuda_build_check.sh: a separate venv with the CUDA build of torch, nvcc, a build of a
copy of the tree, an import that checks the CUDA kernels are registered for every op (the Elman
RNN's, the LSTM's and the GRU's forward and backward). It takes
minutes, so it runs only when asked: RNNLM_EXT_CUDA_BUILD_CHECK=1.
"""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "cuda_build_check.sh"


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RNNLM_EXT_CUDA_BUILD_CHECK") != "1",
    reason="the CUDA build check takes minutes: set RNNLM_EXT_CUDA_BUILD_CHECK=1 to run it",
)
def test_cuda_extension_builds_and_registers_its_kernels():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{SCRIPT.name} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert "== cuda_build_check" in result.stdout and result.stdout.rstrip().endswith("OK")
    # the script asserts each registration; this line says the LSTM and GRU ops were among them,
    # on both devices
    assert "the rnn, lstm and gru forward and backward ops have CPU and CUDA kernels" in result.stdout
