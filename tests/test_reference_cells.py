"""rnnlm_ext.reference.lstm_layer and gru_layer, the readable definitions the fused LSTM and
GRU are held to, against torch.nn.LSTM and GRU: every output and every gradient."""

import pytest
import torch
from helpers import DEVICES, TOL, assert_rel_close
from torch import nn

from rnnlm_ext import reference

SHAPES = [(1, 1, 1, 1), (7, 3, 5, 3), (13, 5, 3, 37), (4, 2, 9, 65)]  # T, B, I, H: odd sizes


def nn_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    """One layer of torch.nn's cell with these weights: (out, h_n, c_n or None). reverse runs
    it on the time-flipped input and flips the output back (a layer's reverse direction)."""
    module = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](
        x.shape[2], h0.shape[1], bias=b_ih is not None, device=x.device, dtype=x.dtype
    )
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}
    if b_ih is not None:
        weights.update(bias_ih_l0=b_ih, bias_hh_l0=b_hh)
    hx = (h0[None], c0[None]) if cell == "lstm" else h0[None]
    xs = x.flip(0) if reverse else x
    out, final = torch.func.functional_call(module, weights, (xs, hx))
    h_n, c_n = final if cell == "lstm" else (final, None)
    return (out.flip(0) if reverse else out), h_n[0], None if c_n is None else c_n[0]


def reference_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    """The reference's layer, its outputs laid out as nn_layer's."""
    last = 0 if reverse else -1
    if cell == "lstm":
        out, c = reference.lstm_layer(x, h0, c0, w_ih, w_hh, None if b_ih is None else b_ih + b_hh, reverse)
        return out, out[last], c[last]
    out = reference.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, reverse)
    return out, out[last], None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,B,I,H", SHAPES)
def test_reference_matches_torch_nn(device, cell, dtype, reverse, bias, T, B, I, H):
    """out, h_n, c_n and the gradients of x, h0, c0 and every weight, under random upstream
    gradients on every output, equal torch.nn's (TOL: see helpers)."""
    G = 4 if cell == "lstm" else 3
    g = torch.Generator().manual_seed(T * 1000 + H)

    def leaf(t):
        return t.to(device, dtype).requires_grad_()

    def uniform(*shape):  # torch.nn's initialisation
        return leaf((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) / H**0.5)

    x, h0, c0 = (leaf(torch.randn(*s, generator=g, dtype=torch.float64)) for s in ((T, B, I), (B, H), (B, H)))
    w_ih, w_hh = uniform(G * H, I), uniform(G * H, H)
    b_ih, b_hh = (uniform(G * H), uniform(G * H)) if bias else (None, None)
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
    leaves = [t for t in (x, h0, c0 if cell == "lstm" else None, w_ih, w_hh, b_ih, b_hh) if t is not None]
    names = ["out", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    results = []
    for layer in (reference_layer, nn_layer):
        outputs = [t for t in layer(cell, *args) if t is not None]
        ups = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=ups, dtype=torch.float64).to(t)).sum() for t in outputs)
        results.append(outputs + list(torch.autograd.grad(loss, leaves)))
    present = [n for n in names if (cell == "lstm" or n not in ("c_n", "dc0")) and (bias or not n.startswith("db"))]
    assert len(present) == len(results[0]) == len(results[1])
    for name, actual, expected in zip(present, *results):
        assert_rel_close(actual, expected, TOL[dtype], name)


def test_gru_reference_refuses_one_bias_of_two():
    x, h0, w = torch.randn(2, 1, 3), torch.randn(1, 4), torch.randn(12, 3)
    with pytest.raises(ValueError, match="b_ih and b_hh must be both given or both None"):
        reference.gru_layer(x, h0, w, torch.randn(12, 4), torch.randn(12), None)
