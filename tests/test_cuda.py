"""The CUDA op on a GPU, both implementations of the time loop (per-step and persistent, forced
through ops.force_cuda_path): every output and gradient against the pure-PyTorch reference
and against torch.nn.RNN (cuDNN), gradcheck, opcheck, torch.compile, float16/bfloat16 within
PyTorch's own error, outputs checked for unwritten elements. Skips where there is no GPU.

Inputs are seeded (helpers.make_inputs: the same numbers as on the CPU), and every check first
fills the caching allocator's free memory with NaN, so an output or workspace element the
kernels fail to write shows up.
"""

import pytest
import torch

from helpers import TOL, assert_rel_close, live_inputs, make_inputs
from rnnlm_ext import ops, reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    pytest.mark.skipif(not ops.build_info()["cuda"], reason="rnnlm_ext was built without CUDA kernels"),
]

GRAD_NAMES = ["dx", "dh0", "dw_ih", "dw_hh", "db"]

# odd sizes: T=1, B=1, H not a multiple of 32, H split unevenly over the persistent grid
# (1501 rows leave the last block one row on a 132-SM H200), B above the 8 warps of a block
SHAPES = [  # T, B, I, H, bias
    (1, 1, 1, 1, True),
    (7, 3, 5, 33, True),
    (16, 4, 9, 100, False),
    (5, 1, 64, 17, True),
    (3, 64, 2, 70, True),
    (4, 9, 7, 1501, True),
]


@pytest.fixture(params=ops.CUDA_PATHS)
def path(request):
    with ops.force_cuda_path(request.param):
        yield request.param


def poison_cuda_cache():
    """Fill the caching allocator's free blocks, large pool and small, with 0xFF bytes: NaN in
    every floating dtype. Tensors allocated next reuse them."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    sizes = [64 << 20] * 2 + [1 << 20] * 8 + [64 << 10] * 64 + [2 << 10] * 256  # bytes
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in sizes]
    torch.cuda.synchronize()
    del blocks


def run_op(inputs, nonlinearity, reverse, dout):
    """out and every gradient (None for a missing bias) of the op, on a poisoned cache."""
    leaves = [t for t in inputs if t is not None]
    poison_cuda_cache()
    out = ops.rnn_layer(*inputs, nonlinearity, reverse)
    grads = torch.autograd.grad(out, leaves, dout)
    for name, t in zip(["out"] + GRAD_NAMES, [out, *grads]):
        assert torch.isfinite(t).all(), f"{name} has {(~torch.isfinite(t)).sum().item()} non-finite elements: unwritten?"
    return out, grads


def _test_correctness(dtype, T, B, I, H, nonlinearity, reverse, bias):
    inputs, seed = live_inputs(T, B, I, H, dtype, "cuda", nonlinearity, reverse, bias)
    dout = torch.randn(T, B, H, generator=torch.Generator().manual_seed(seed), dtype=dtype).cuda()
    out, grads = run_op(inputs, nonlinearity, reverse, dout)
    expected = reference.rnn_layer(*inputs, nonlinearity, reverse)
    expected_grads = torch.autograd.grad(expected, [t for t in inputs if t is not None], dout)
    assert_rel_close(out, expected, TOL[dtype], "out")
    for name, g, e in zip(GRAD_NAMES, grads, expected_grads):
        assert e.abs().max() > 0, f"{name} is all zeros: comparing it would test nothing"
        assert_rel_close(g, e, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H,bias", SHAPES)
def test_matches_reference(path, dtype, nonlinearity, reverse, T, B, I, H, bias):
    _test_correctness(dtype, T, B, I, H, nonlinearity, reverse, bias)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 3, 5), (6, 5, 7, 33), (9, 64, 16, 200)])
def test_matches_cudnn_float64(path, nonlinearity, reverse, T, B, I, H):
    """torch.nn.RNN (cuDNN) with the same weights: out, h_n and the gradients of x, h0 and all
    four parameters (each bias gets db). The reverse direction is nn.RNN on the flipped
    sequence, flipped back."""
    x, h0, w_ih, w_hh, b_ih = make_inputs(T, B, I, H, torch.float64, "cuda")
    b_hh = (torch.randn(H, dtype=torch.float64, device="cuda") / H**0.5).requires_grad_()
    leaves = [x, h0, w_ih, w_hh, b_ih, b_hh]
    dout = torch.randn(T, B, H, dtype=torch.float64, device="cuda")

    poison_cuda_cache()
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b_ih + b_hh, nonlinearity, reverse)
    h_n = out[0] if reverse else out[-1]
    grads = torch.autograd.grad(out, leaves, dout)

    rnn = torch.nn.RNN(I, H, nonlinearity=nonlinearity, device="cuda", dtype=torch.float64)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    seq = x.flip(0) if reverse else x
    expected, expected_h_n = torch.func.functional_call(rnn, weights, (seq, h0.unsqueeze(0)))
    expected = expected.flip(0) if reverse else expected
    expected_grads = torch.autograd.grad(expected, leaves, dout)

    tol = TOL[torch.float64]
    assert_rel_close(out, expected, tol, "out")
    assert_rel_close(h_n, expected_h_n[0], tol, "h_n")
    for name, g, e in zip(["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"], grads, expected_grads):
        assert_rel_close(g, e, tol, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("T,B,I,H", [(8, 4, 16, 33), (32, 16, 64, 256)])
def test_low_precision_within_pytorch_error(path, dtype, nonlinearity, T, B, I, H):
    """The op in float16/bfloat16 (float32 accumulation) is as close to the float64 result as
    PyTorch's own run of the reference loop in that dtype, within a factor of 4."""
    inputs = make_inputs(T, B, I, H, dtype, "cuda")
    dout = torch.randn(T, B, H, dtype=dtype, device="cuda")
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


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(path, nonlinearity, reverse, bias):
    inputs = make_inputs(4, 3, 3, 5, torch.float64, "cuda", bias=bias)
    assert torch.autograd.gradcheck(lambda *a: ops.rnn_layer(*a, nonlinearity, reverse), inputs)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(path, requires_grad):
    for bias in (True, False):
        for nonlinearity, reverse in (("tanh", False), ("relu", True)):
            inputs = [t.detach().requires_grad_(requires_grad) if t is not None else None
                      for t in make_inputs(3, 2, 4, 37, torch.float64, "cuda", bias=bias)]
            torch.library.opcheck(torch.ops.rnnlm_ext.rnn_forward.default, (*inputs, nonlinearity, reverse, path))
    x, h0, w_ih, w_hh, b = (t.detach() for t in make_inputs(3, 2, 4, 37, torch.float64, "cuda"))
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    for mask in ([True] * 5, [False, True, False, True, True], [False] * 5):
        torch.library.opcheck(
            torch.ops.rnnlm_ext.rnn_backward.default,
            (torch.randn_like(out), x, h0, w_ih, w_hh, out, "tanh", False, mask, path)
        )


def test_masked_gradients_are_empty(path):
    x, h0, w_ih, w_hh, b = (t.detach() for t in make_inputs(5, 3, 4, 6, torch.float32, "cuda"))
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    grads = torch.ops.rnnlm_ext.rnn_backward(torch.randn_like(out), x, h0, w_ih, w_hh, out, "tanh", False,
                                             [False, False, True, False, True], path)
    assert [g.shape for g in grads] == [(0,), (0,), w_ih.shape, (0,), b.shape]


def test_torch_compile_fullgraph_equals_eager(path):
    torch._dynamo.reset()  # compiling takes the CUDA path as a constant: trace again for each
    args = make_inputs(6, 3, 4, 45, torch.float32, "cuda")

    def f(x, h0, w_ih, w_hh, b):
        out = ops.rnn_layer(x, h0, w_ih, w_hh, b, "tanh", False)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss, compiled_loss = f(*args), compiled(*args)
    assert_rel_close(compiled_loss, eager_loss, 1e-6, "loss")
    for g, e in zip(torch.autograd.grad(compiled_loss, args), torch.autograd.grad(eager_loss, args)):
        assert_rel_close(g, e, 1e-6, "grad")


def test_runs_on_the_callers_stream(path):
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
