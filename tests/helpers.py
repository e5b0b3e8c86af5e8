"""Shared test code: devices, tolerances, seeded inputs, and the op's correctness bodies that
every device runs (test_op.py on "cpu" and "cuda", the subprocess tests on other CPU paths)."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from rnnlm_ext import ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# float64: both sides compute the same sums in a different order (MKL vs ATen GEMMs, a fused
# bias); the differences are a few ulp of values of order 1, ~1e-15, so 1e-10 leaves room for
# the growth over many steps and still catches any real error (a wrong index is O(1e-2)).
# float32: the same rounding at 2^-24 ~ 6e-8 per op, grown over T steps and K-long dot
# products; 1e-5 of the tensor's scale, with inputs at nn.RNN's scale (make_inputs). A
# saturated tanh unit is ill-conditioned in float32: 1 - y² ~ 1e-3 at |z| ~ 4 carries y's ulp
# (two tanh implementations differ by one) as a relative error of ~1e-4 in its gradient.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _cuda_missing():
    """Why the "cuda" device cannot run here, or None where it can."""
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if not ops.build_info()["cuda"]:
        return "rnnlm_ext was built without CUDA kernels (a CPU-only torch or no nvcc)"
    return None


CUDA_MISSING = _cuda_missing()
needs_cuda = pytest.mark.skipif(CUDA_MISSING is not None, reason=CUDA_MISSING or "")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

GRAD_NAMES = ["dx", "dh0", "dw_ih", "dw_hh", "db"]

# odd sizes: T=1, B=1, H not a multiple of 32, B above the persistent CUDA kernel's limit of
# 64 (and a CPU time loop of one-step chunks), H split unevenly over the persistent grid (1501
# rows leave the last block one row on a 132-SM H200), B above the 8 warps of a CUDA block
OP_SHAPES = [  # T, B, I, H, bias
    (1, 1, 1, 1, True),
    (7, 3, 5, 3, True),
    (7, 3, 5, 33, True),
    (16, 4, 9, 33, False),
    (16, 4, 9, 100, False),
    (5, 1, 64, 17, True),
    (3, 64, 2, 70, True),
    (3, 65, 2, 70, True),
    (4, 9, 7, 1501, True),
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


def check_stateful_training_matches(fused, ref, vocab, penalty=None):
    """Three stateful batches of 7 steps through two language models holding the same float64
    weights (one on our layers, one on torch.nn's), the state carried between batches: each
    batch's loss (plus penalty(model), if given), the carried state (a tensor, or the LSTM's
    (h, c)) and every parameter's gradient agree to TOL. The same sums in another order: a few
    ulp, grown over 7 steps and the layers."""
    x = torch.randint(0, vocab, (5, 3 * 7 + 1))
    for i in range(0, 21, 7):
        losses = []
        for model in (fused, ref):
            model.zero_grad()
            out = model(x[:, i : i + 7])
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, vocab), x[:, i + 1 : i + 8].reshape(-1))
            if penalty is not None:
                loss = loss + penalty(model)
            loss.backward()
            losses.append(loss)
        assert_rel_close(losses[0], losses[1], TOL[torch.float64], f"loss of batch at {i}")
        for a, b in zip(*(m.h if isinstance(m.h, tuple) else (m.h,) for m in (fused, ref))):
            assert_rel_close(a, b, TOL[torch.float64], "carried state")
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert_rel_close(p.grad, q.grad, TOL[torch.float64], f"grad of {name}")


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


def cuda_paths(device, B, H, dtype):
    """What a correctness body runs under: on CUDA each implementation of the time loop in
    turn ("persistent" where it fits B, H and dtype on this GPU), on the CPU its one kernel
    (None: nothing forced)."""
    if device != "cuda":
        return [None]
    return [path for path in ops.CUDA_PATHS if ops.cuda_path(B, H, dtype, path) is not None]


def forced(path):
    """The context that runs the CUDA ops on `path` (from cuda_paths); None forces nothing."""
    return contextlib.nullcontext() if path is None else ops.force_cuda_path(path)


def poison_cuda_cache():
    """Fill the caching allocator's free blocks, large pool and small, with 0xFF bytes: NaN in
    every floating dtype. Tensors allocated next reuse them, so an element a kernel fails to
    write shows up."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    sizes = [64 << 20] * 2 + [1 << 20] * 8 + [64 << 10] * 64 + [2 << 10] * 256  # bytes
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in sizes]
    torch.cuda.synchronize()
    del blocks


def run_op(inputs, nonlinearity, reverse, dout):
    """out and the gradients of every input but a missing bias, on a poisoned cache on CUDA;
    every one must be finite (the inputs are)."""
    leaves = [t for t in inputs if t is not None]
    if leaves[0].is_cuda:
        poison_cuda_cache()
    out = ops.rnn_layer(*inputs, nonlinearity, reverse)
    grads = torch.autograd.grad(out, leaves, dout)
    for name, t in zip(["out"] + GRAD_NAMES, [out, *grads]):
        assert torch.isfinite(t).all(), (
            f"{name} has {(~torch.isfinite(t)).sum().item()} non-finite elements: unwritten?"
        )
    return out, grads


def check_op_against_reference(device, dtype, T, B, I, H, nonlinearity, reverse, bias):
    """Forward and every gradient of the op against the pure-PyTorch reference, under a
    random upstream gradient, on every path of `device`."""
    inputs, seed = live_inputs(T, B, I, H, dtype, device, nonlinearity, reverse, bias)
    dout = torch.randn(T, B, H, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
    expected = reference.rnn_layer(*inputs, nonlinearity, reverse)
    expected_grads = torch.autograd.grad(expected, [t for t in inputs if t is not None], dout)
    tol = TOL[dtype]
    for path in cuda_paths(device, B, H, dtype):
        with forced(path):
            out, grads = run_op(inputs, nonlinearity, reverse, dout)
        where = f"{device} {path or ''}".strip()
        assert_rel_close(out, expected, tol, f"{where}: out")
        for name, g, e in zip(GRAD_NAMES, grads, expected_grads):
            assert e.abs().max() > 0, f"{name} is all zeros: comparing it would test nothing"
            assert_rel_close(g, e, tol, f"{where}: {name}")


def check_float32_tanh():
    """The kernel's own vectorised float32 tanh (T=1, w_ih=1, w_hh=0: out = tanh(x)) within 3
    ulp of float64 tanh over a sweep that covers the small-|x| and saturated ranges; NaN stays
    NaN, ±inf give ±1."""
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.logspace(-30, 1, 10_001), -torch.logspace(-30, 1, 10_001)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")])])
    B = x.numel()
    out = ops.rnn_layer(x.view(1, B, 1), torch.zeros(B, 1), torch.ones(1, 1), torch.zeros(1, 1), None, "tanh")[0, :, 0]
    expected = torch.tanh(x.double())
    finite = ~x.isnan()
    y = expected[finite].abs().float()  # one ulp: the float32 spacing at the true value
    ulp = (torch.nextafter(y, torch.full_like(y, float("inf"))) - y).double()
    err = ((out[finite].double() - expected[finite]).abs() / ulp).max().item()
    assert err <= 3, f"float32 tanh is {err:.2f} ulp off"
    assert out[x.isnan()].isnan().all(), "a NaN pre-activation must stay NaN"
    assert torch.equal(out[-2:], torch.tensor([1.0, -1.0]))


def run_python(code, **env):
    """Run `code` in a fresh interpreter at the repository root, with tests/ importable and
    `env` added to the environment; returns its stdout, after asserting that it succeeded."""
    path = [ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p), **env)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout
