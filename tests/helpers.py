"""Shared test helpers: devices, tolerances, comparisons that say by how much they failed."""
import pytest
import torch

from rnnlm_ext import reference

# float64: both sides compute the same sums in a different order (MKL vs ATen GEMMs, a fused
# bias); the differences are a few ulp of values of order 1, ~1e-15, so 1e-10 leaves room for
# the growth over many steps and still catches any real error (a wrong index is O(1e-2)).
# float32: the same rounding at 2^-24 ~ 6e-8 per op, grown over T steps and K-long dot
# products; 1e-5 of the tensor's scale, with inputs at nn.RNN's scale (make_inputs). A
# saturated tanh unit is ill-conditioned in float32: 1 - y² ~ 1e-3 at |z| ~ 4 carries y's ulp
# (two tanh implementations differ by one) as a relative error of ~1e-4 in its gradient.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ),
]


def assert_rel_close(actual, expected, tol, name="tensor"):
    """max|actual - expected| <= tol · max|expected|: relative to the tensor's scale (a
    per-element relative error means nothing next to zero), absolute only when expected is
    all zeros."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    diff = (actual.detach() - expected.detach()).abs().max().item() if actual.numel() else 0.0
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    assert diff <= tol * scale, f"{name}: max abs diff {diff:.3e} > {tol:.0e} x scale {scale:.3g}"


def make_inputs(T, B, I, H, dtype, device="cpu", bias=True, requires_grad=True, seed=0):
    """x [T,B,I] and h0 [B,H] standard normal; w_ih, w_hh, bias with nn.RNN's initialisation
    U(-1/√H, 1/√H), so that pre-activations stay of order 1 (states neither vanish nor
    saturate). Drawn on the CPU from `seed`, then moved: the same numbers on every device."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)

    def uniform(*shape):
        t = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) / H**0.5
        return t.to(device, dtype).requires_grad_(requires_grad)

    return randn(T, B, I), randn(B, H), uniform(H, I), uniform(H, H), uniform(H) if bias else None


def live_inputs(T, B, I, H, dtype, device, nonlinearity, reverse, bias):
    """make_inputs of the first seed whose reference output has a nonzero unit at every step,
    with that seed: with relu and a few units, a dead layer would make every tensor a test
    compares zero."""
    for seed in range(100):
        inputs = make_inputs(T, B, I, H, dtype, device, bias=bias, seed=seed)
        with torch.no_grad():
            out = reference.rnn_layer(*inputs, nonlinearity, reverse)
        if (out != 0).flatten(1).any(1).all():
            return inputs, seed
    raise AssertionError(f"no seed below 100 gives a live layer at T,B,I,H = {T},{B},{I},{H}")
