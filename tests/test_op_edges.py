"""The op at the edges: non-finite inputs (as nn.RNN treats them) and the errors for missing
arguments, on the CPU kernel and the fake (meta) kernel torch.compile traces."""

import pytest
import torch
from helpers import GRAD_NAMES, make_inputs

from rnnlm_ext import ops


def nn_rnn_layer(x, h0, w_ih, w_hh, b, nonlinearity):
    """nn.RNN with these weights (b as b_ih, b_hh zero): out [T,B,H]."""
    T, B, I = x.shape
    rnn = torch.nn.RNN(I, w_hh.shape[0], nonlinearity=nonlinearity, dtype=x.dtype)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b, "bias_hh_l0": torch.zeros_like(b)}
    return torch.func.functional_call(rnn, weights, (x, h0.unsqueeze(0)))[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_relu_backward_with_non_finite_input_matches_nn_rnn(bad, T, dtype):
    """A NaN output passes its gradient through, as nn.RNN's relu backward does (0 only where
    h <= 0): a NaN or infinite input element gives the same out and gradients, NaN for NaN."""
    inputs = make_inputs(T, 4, 3, 5, dtype)
    with torch.no_grad():
        inputs[0][0, 1, 2] = bad  # one element of x; row 1 of the first step
    dout = torch.randn(T, 4, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out = ops.rnn_layer(*inputs, "relu")
    expected = nn_rnn_layer(*inputs, "relu")
    grads = torch.autograd.grad(out, inputs, dout)
    expected_grads = torch.autograd.grad(expected, inputs, dout)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for name, g, e in zip(["out", *GRAD_NAMES], [out, *grads], [expected, *expected_grads]):
        assert torch.equal(g.isnan(), e.isnan()), f"{name}: NaN at other positions than nn.RNN's"
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{name}: {m}")
