"""Shared test helpers: devices, tolerances, comparisons that say by how much they failed."""
import pytest
import torch

# float64: both sides compute the same sums in a different order (MKL vs ATen GEMMs, a fused
# bias); the differences are a few ulp of values of order 1, ~1e-15, so 1e-10 leaves room for
# the growth over many steps and still catches any real error (a wrong index is O(1e-2)).
# float32: the same rounding at 2^-24 ~ 6e-8 per op, grown over T steps and K-long dot
# products; 1e-5 of the tensor's scale.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ),
]


def assert_rel_close(actual, expected, tol, name="tensor"):
    """max|actual - expected| <= tol · max(1, max|expected|): absolute for values of order 1
    or below, relative to the tensor's scale above (per-element relative error means nothing
    next to zero)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    diff = (actual.detach() - expected.detach()).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.detach().abs().max().item() if expected.numel() else 0.0)
    assert diff <= tol * scale, f"{name}: max abs diff {diff:.3e} > {tol:.0e} x scale {scale:.3g}"
