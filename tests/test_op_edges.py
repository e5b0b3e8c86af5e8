"""The op at the edges: non-finite inputs (as nn.RNN treats them) and the errors for missing
arguments, on the CPU kernel and the fake (meta) kernel torch.compile traces."""

import pytest
import torch
from helpers import GRAD_NAMES, make_inputs, needs_cuda

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


CHECKED_DEVICES = ["cpu", "meta", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("device", CHECKED_DEVICES)
@pytest.mark.parametrize("name", ["x", "h0", "w_ih", "w_hh"])
def test_forward_names_a_missing_tensor(name, device):
    x, h0, w_ih, w_hh, b = make_inputs(3, 2, 4, 5, torch.float32, device, requires_grad=False)
    args = dict(x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, bias=b, nonlinearity="tanh", reverse=False)
    args[name] = None
    with pytest.raises(RuntimeError, match=f"rnnlm_ext: {name} is required, got None"):
        torch.ops.rnnlm_ext.rnn_forward(*args.values())


def backward_args(device):
    x, h0, w_ih, w_hh, b = make_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    args = dict(dout=torch.ones_like(out), x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, out=out)
    return {**{k: v.to(device) for k, v in args.items()}, "nonlinearity": "tanh", "reverse": False}


@pytest.mark.parametrize("device", CHECKED_DEVICES)
@pytest.mark.parametrize("name", ["dout", "x", "h0", "w_ih", "w_hh", "out"])
def test_backward_names_a_missing_tensor(name, device):
    args = {**backward_args(device), "output_mask": [True] * 5}
    args[name] = None
    with pytest.raises(RuntimeError, match=f"rnnlm_ext: {name} is required, got None"):
        torch.ops.rnnlm_ext.rnn_backward(*args.values())


@pytest.mark.parametrize("device", CHECKED_DEVICES)
@pytest.mark.parametrize("length", [0, 4, 6])
def test_backward_names_a_wrong_length_output_mask(length, device):
    args = {**backward_args(device), "output_mask": [True] * length}
    with pytest.raises(RuntimeError, match="output_mask must have 5 entries"):
        torch.ops.rnnlm_ext.rnn_backward(*args.values())
