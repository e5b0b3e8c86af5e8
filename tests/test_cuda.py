"""What only the CUDA op has: the choice between its two implementations of the time loop
(per-step and persistent), float16/bfloat16 within PyTorch's own error, the caller's stream.
Parity, gradients, opcheck and torch.compile run on CUDA, on both paths, in test_op.py and
test_rnn.py (helpers.DEVICES). Skips where there is no GPU or no CUDA kernels."""

import pytest
import torch
from helpers import CUDA_MISSING, GRAD_NAMES, OP_SHAPES, TOL, assert_rel_close, make_inputs, run_op

from rnnlm_ext import ops, reference

pytestmark = pytest.mark.skipif(CUDA_MISSING is not None, reason=CUDA_MISSING or "")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("T,B,I,H", [(8, 4, 16, 33), (32, 16, 64, 256)])
def test_low_precision_within_pytorch_error(cuda_path, dtype, nonlinearity, T, B, I, H):
    """The op in float16/bfloat16 (float32 accumulation) is as close to the float64 result as
    PyTorch's own run of the reference loop in that dtype, within a factor of 4."""
    inputs = make_inputs(T, B, I, H, dtype, "cuda")
    dout = torch.randn(T, B, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to("cuda", dtype)
    out, grads = run_op(inputs, nonlinearity, False, dout)

    def run_reference(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in inputs]
        o = reference.rnn_layer(*leaves, nonlinearity)
        return [o, *torch.autograd.grad(o, leaves, dout.to(dt))]

    exact = run_reference(torch.float64)
    pytorch = run_reference(dtype)
    eps = torch.finfo(dtype).eps
    for name, ours, theirs, e in zip(["out"] + GRAD_NAMES, [out, *grads], pytorch, exact):
        scale = max(1.0, e.abs().max().item())
        ours_err = (ours.double() - e).abs().max().item()
        theirs_err = (theirs.double() - e).abs().max().item()
        assert ours_err <= max(4 * theirs_err, eps * scale), (
            f"{dtype} {name}: max error {ours_err:.3e} vs PyTorch's own {theirs_err:.3e} (scale {scale:.3g})"
        )


def test_runs_on_the_callers_stream(cuda_path):
    """Kernels are ordered on the caller's stream: a result read on that stream after the call
    is complete without a device-wide synchronisation."""
    inputs = make_inputs(12, 5, 8, 40, torch.float64, "cuda")
    expected = reference.rnn_layer(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.rnn_layer(*inputs)
        copy = out.clone()
    stream.synchronize()
    assert_rel_close(copy, expected, TOL[torch.float64], "out")


def test_path_choice():
    """Auto takes the persistent kernel for small batches whose w_hh slices fit on chip, the
    per-step path elsewhere; asking for persistent where it cannot run is refused clearly."""
    assert ops.cuda_path(8, 512, torch.float32, "auto") == "persistent"
    assert ops.cuda_path(8, 512, torch.bfloat16, "per_step") == "per_step"
    assert ops.cuda_path(65, 512, torch.float32, "auto") == "per_step"  # B above the limit
    assert ops.cuda_path(8, 100_000, torch.float32, "auto") == "per_step"  # too many rows per block
    assert ops.cuda_path(8, 100_000, torch.float32, "persistent") is None
    with ops.force_cuda_path("per_step"):
        assert ops.cuda_path(8, 512) == "per_step"
    with ops.force_cuda_path("persistent"):
        x, h0, w_ih, w_hh, b = (t.detach() for t in make_inputs(2, 65, 3, 8, torch.float32, "cuda"))
        with pytest.raises(RuntimeError, match="persistent CUDA path"):
            ops.rnn_layer(x, h0, w_ih, w_hh, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_persistent_path_takes_the_shared_shapes(dtype):
    """The parity tests run the persistent kernel only where cuda_path says it fits: every
    shape of theirs with B <= 64 must, or they would test the per-step path alone."""
    for _T, B, _I, H, _ in OP_SHAPES:
        if B <= 64:
            assert ops.cuda_path(B, H, dtype, "persistent") == "persistent", (B, H, dtype)
