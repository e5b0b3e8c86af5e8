"""What the CUDA LSTM and GRU kernels (csrc/cells_cuda.cu) need beyond the op tests that run
on every device: float64 parity of the raw LSTM ops with nn.LSTM (dc on every step included),
float16/bfloat16 against float64 nn.LSTM/nn.GRU within PyTorch's own error in that dtype, CUDA
against the CPU kernels, every output written (NaN-poisoned memory), the output mask,
inference, and the refused persistent path. The raw ops are called, not a module, so that
nothing here depends on the Python wrappers. Skips where there is no GPU or no CUDA kernels."""

import pytest
import torch
from helpers import CUDA_MISSING, TOL, assert_rel_close, poison_cuda_cache

pytestmark = pytest.mark.skipif(CUDA_MISSING is not None, reason=CUDA_MISSING or "")

OPS = torch.ops.rnnlm_ext
LSTM_NAMES = ["out", "c", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "dbias"]
GRU_NAMES = ["out", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]

# odd sizes: T = 1 and B = 1, H not a multiple of 32 (a warp) nor of 8 (a half-precision
# GEMM's alignment, so cuBLAS takes its unaligned kernels on the offset gate blocks), B·H
# above one pointwise block, I = 1
SHAPES = [  # T, B, I, H
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (13, 5, 3, 37),
    (5, 1, 9, 65),
    (9, 70, 16, 33),
]


def _draw(T, B, I, H, gates, dtype, device, bias, seed):
    """x [T,B,I], h0, c0 [B,H] standard normal; w_ih [gates·H,I], w_hh [gates·H,H] and two
    biases [gates·H] (or None) from nn.LSTM/nn.GRU's U(-1/√H, 1/√H). Drawn in float64 on the
    CPU from `seed`, then moved: the same numbers on every device and dtype."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) / H**0.5).to(device, dtype)

    shapes = [(T, B, I), (B, H), (B, H)]
    x, h0, c0 = (torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes)
    w_ih, w_hh = uniform(gates * H, I), uniform(gates * H, H)
    b_ih, b_hh = (uniform(gates * H), uniform(gates * H)) if bias else (None, None)
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh


def _upstream(T, B, H, dtype, device, seed=1):
    """Random gradients of two [T,B,H] outputs (LSTM: out and c; GRU: out and unused)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, B, H, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2)]


def _check_finite(names, tensors):
    for name, t in zip(names, tensors):
        bad = (~torch.isfinite(t)).sum().item()
        assert bad == 0, f"{name} has {bad} non-finite elements: unwritten?"


# ------------------------------------------------------------------------------------------
# LSTM


def lstm_inputs(T, B, I, H, dtype, device="cuda", bias=True, seed=0):
    """x, h0, c0, w_ih, w_hh, b_ih, b_hh: what nn.LSTM holds (the op takes b_ih + b_hh)."""
    return _draw(T, B, I, H, 4, dtype, device, bias, seed)


def lstm_forward(inputs, reverse, train=True):
    """The raw forward op: out, c, gates (empty unless train); it takes bias = b_ih + b_hh."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = inputs
    bias = None if b_ih is None else b_ih + b_hh
    return OPS.lstm_forward(x, h0, c0, w_ih, w_hh, bias, reverse, train)


def lstm_op(inputs, reverse, dout, dc, mask=None, train=True):
    """out, c and the six gradients (dx, dh0, dc0, dw_ih, dw_hh, dbias) from the raw ops, on a
    NaN-poisoned cache on CUDA: every result must be finite (the inputs are)."""
    x, h0, c0, w_ih, w_hh, b_ih, _ = inputs
    mask = mask or [True] * 5 + [b_ih is not None]
    if x.is_cuda:
        poison_cuda_cache()
    out, c, gates = lstm_forward(inputs, reverse, train)
    if not train:
        return [out, c, gates]
    grads = OPS.lstm_backward(dout, dc, x, h0, c0, w_ih, w_hh, out, c, gates, reverse, mask)
    results = [out, c, *grads]
    _check_finite(LSTM_NAMES, [t for t, m in zip(results, [True, True, *mask]) if m])
    return results


def lstm_loop(inputs, reverse, dout, dc):
    """out, c and the gradients of x, h0, c0, w_ih, w_hh and b_ih (= dbias) from a loop of
    torch ops over the steps (DESIGN.md's cell), autograd through it, in the inputs' dtype and
    device: every op rounded to that dtype, PyTorch's plainest run of the cell."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (None if t is None else t.detach().requires_grad_() for t in inputs)
    h, cell = h0, c0
    outs, cells = [None] * x.shape[0], [None] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        a = x[t] @ w_ih.T + h @ w_hh.T
        if b_ih is not None:
            a = a + b_ih + b_hh
        i, f, g, o = a.chunk(4, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(cell)
        outs[t], cells[t] = h, cell
    out, c = torch.stack(outs), torch.stack(cells)
    leaves = [x, h0, c0, w_ih, w_hh] + ([b_ih] if b_ih is not None else [])
    return [out, c, *torch.autograd.grad([out, c], leaves, [dout, dc])]


def nn_lstm(inputs, reverse, dout, dh_n, dc_n):
    """out, c_n and the gradients of x, h0, c0, w_ih, w_hh and b_ih (= dbias) from a
    single-layer torch.nn.LSTM holding the same weights, under upstream gradients on out, h_n
    and c_n; the reverse direction is nn.LSTM on the flipped sequence, flipped back."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (None if t is None else t.detach().requires_grad_() for t in inputs)
    lstm = torch.nn.LSTM(x.shape[2], h0.shape[1], bias=b_ih is not None, device=x.device, dtype=x.dtype)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}
    if b_ih is not None:
        weights.update(bias_ih_l0=b_ih, bias_hh_l0=b_hh)
    out, (h_n, c_n) = torch.func.functional_call(
        lstm, weights, (x.flip(0) if reverse else x, (h0.unsqueeze(0), c0.unsqueeze(0)))
    )
    out, h_n, c_n = (out.flip(0) if reverse else out), h_n[0], c_n[0]
    leaves = [x, h0, c0, w_ih, w_hh] + ([b_ih] if b_ih is not None else [])
    loss = (out * dout).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum()
    return [out, c_n, *torch.autograd.grad(loss, leaves)]


def _last(t, reverse):
    """The last step's [B,H] of a [T,B,H] sequence: where h_n, c_n sit."""
    return t[0] if reverse else t[-1]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,B,I,H", SHAPES)
def test_lstm_matches_torch_nn_lstm_float64(reverse, bias, T, B, I, H):
    """out, c_n and every gradient under random upstream gradients on out, h_n and c_n (folded
    into dout's and dc's last step, as the op's contract says), within 1e-10 of nn.LSTM's on
    the GPU relative to each tensor's scale (helpers.TOL: the same sums in another order)."""
    inputs = lstm_inputs(T, B, I, H, torch.float64, bias=bias)
    dout, _ = _upstream(T, B, H, torch.float64, "cuda")
    dh_n, dc_n = torch.randn(2, B, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).cuda()
    expected = nn_lstm(inputs, reverse, dout, dh_n, dc_n)
    dout_op, dc_op = dout.clone(), torch.zeros_like(dout)
    _last(dout_op, reverse).add_(dh_n)
    _last(dc_op, reverse).copy_(dc_n)
    out, c, *grads = lstm_op(inputs, reverse, dout_op, dc_op)
    for name, actual, e in zip(["out", "c_n", *LSTM_NAMES[2:]], [out, _last(c, reverse), *grads], expected):
        assert e.abs().max() > 0, f"{name} is all zeros: comparing it would test nothing"
        assert_rel_close(actual, e, TOL[torch.float64], name)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", SHAPES)
def test_lstm_gradient_on_every_steps_c_float64(reverse, T, B, I, H):
    """dc on every step (not only c_n, all nn.LSTM can take) and dc absent ([0]: zero), against
    the step loop's autograd in float64 within 1e-10 of each tensor's scale."""
    inputs = lstm_inputs(T, B, I, H, torch.float64)
    dout, dc = _upstream(T, B, H, torch.float64, "cuda")
    for dc_op, dc_ref in ((dc, dc), (torch.empty(0, dtype=torch.float64, device="cuda"), torch.zeros_like(dc))):
        expected = lstm_loop(inputs, reverse, dout, dc_ref)
        for name, actual, e in zip(LSTM_NAMES, lstm_op(inputs, reverse, dout, dc_op), expected):
            assert_rel_close(actual, e, TOL[torch.float64], f"{name} (dc {tuple(dc_op.shape)})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", [(8, 4, 16, 33), (32, 16, 64, 256)])
def test_lstm_low_precision_within_pytorch_error(dtype, reverse, T, B, I, H):
    """The op in float16/bfloat16 (stored in that dtype, computed in float32 inside its
    kernels and GEMMs) against float64 nn.LSTM on the GPU. PyTorch's own run of the cell in
    that dtype (the step loop: every op rounded) on the same inputs sets the scale: every
    tensor's error relative to its scale stays within 4x of the loop's largest, or one eps of
    the dtype. The op rounds less often than the loop, so it is expected below it; 4x is the
    margin the float32 tests use, and a wrong index or dropped term is an O(1) error, far
    above bfloat16's ~1e-2."""
    inputs64 = lstm_inputs(T, B, I, H, torch.float64)
    inputs = lstm_inputs(T, B, I, H, dtype)
    dout, _ = _upstream(T, B, H, torch.float64, "cuda")
    dh_n = torch.zeros(B, H, dtype=torch.float64, device="cuda")
    dc_n = torch.randn(B, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).cuda()
    dc = torch.zeros_like(dout)
    _last(dc, reverse).copy_(dc_n)
    expected = nn_lstm(inputs64, reverse, dout, dh_n, dc_n)
    expected[1] = None  # nn.LSTM gives c_n only; compared below against every step's c

    def errors(results):
        return [
            ((r.double() - e).abs().max() / e.abs().max()).item() for r, e in zip(results, expected) if e is not None
        ]

    exact_c = lstm_loop(inputs64, reverse, dout, dc)[1]
    loop = lstm_loop(inputs, reverse, dout.to(dtype), dc.to(dtype))
    ours = lstm_op(inputs, reverse, dout.to(dtype), dc.to(dtype))
    theirs = errors(loop) + [((loop[1].double() - exact_c).abs().max() / exact_c.abs().max()).item()]
    mine = errors(ours) + [((ours[1].double() - exact_c).abs().max() / exact_c.abs().max()).item()]
    bound = max(4 * max(theirs), torch.finfo(dtype).eps)
    names = [n for n in LSTM_NAMES if n != "c"] + ["c"]
    for name, m, t in zip(names, mine, theirs):
        assert m <= bound, f"{dtype} {name}: relative error {m:.2e} > bound {bound:.2e} (the loop's {t:.2e})"


# ------------------------------------------------------------------------------------------
# GRU


def gru_inputs(T, B, I, H, dtype, device="cuda", bias=True, seed=0):
    """x, h0, w_ih, w_hh, b_ih, b_hh, as nn.GRU holds them."""
    x, h0, _, w_ih, w_hh, b_ih, b_hh = _draw(T, B, I, H, 3, dtype, device, bias, seed)
    return x, h0, w_ih, w_hh, b_ih, b_hh


def gru_op(inputs, reverse, dout, mask=None, train=True):
    """out and the six gradients (dx, dh0, dw_ih, dw_hh, db_ih, db_hh) from the raw ops, on a
    NaN-poisoned cache on CUDA: every result must be finite."""
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    mask = mask or [True] * 4 + [b_ih is not None] * 2
    if x.is_cuda:
        poison_cuda_cache()
    out, saved = OPS.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, train)
    if not train:
        return [out, saved]
    grads = OPS.gru_backward(dout, x, h0, w_ih, w_hh, out, saved, reverse, mask)
    results = [out, *grads]
    _check_finite(GRU_NAMES, [t for t, m in zip(results, [True, *mask]) if m])
    return results


def gru_loop(inputs, reverse, dout):
    """out and the gradients of every input from a loop of torch ops over the steps
    (DESIGN.md's cell), autograd through it, in the inputs' dtype: every op rounded."""
    x, h0, w_ih, w_hh, b_ih, b_hh = (t.detach().requires_grad_() for t in inputs)
    h, outs = h0, [None] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        gi_r, gi_z, gi_n = (x[t] @ w_ih.T + b_ih).chunk(3, dim=1)
        gh_r, gh_z, gh_n = (h @ w_hh.T + b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(gi_r + gh_r), torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        h = (1 - z) * n + z * h
        outs[t] = h
    out = torch.stack(outs)
    return [out, *torch.autograd.grad(out, [x, h0, w_ih, w_hh, b_ih, b_hh], dout)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", [(8, 4, 16, 33), (32, 16, 64, 256)])
def test_gru_low_precision_within_pytorch_error(dtype, reverse, T, B, I, H):
    """As the LSTM's: the op in float16/bfloat16 against float64 nn.GRU on the GPU, every
    tensor within 4x of the largest relative error of PyTorch's step loop in that dtype (or
    one eps). Checks the float64 loop against nn.GRU first, so the two references agree."""
    inputs64 = gru_inputs(T, B, I, H, torch.float64)
    inputs = gru_inputs(T, B, I, H, dtype)
    dout, _ = _upstream(T, B, H, torch.float64, "cuda")
    x, h0, w_ih, w_hh, b_ih, b_hh = (t.detach().requires_grad_() for t in inputs64)
    gru = torch.nn.GRU(I, H, device="cuda", dtype=torch.float64)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    out, _ = torch.func.functional_call(gru, weights, (x.flip(0) if reverse else x, h0.unsqueeze(0)))
    out = out.flip(0) if reverse else out
    expected = [out, *torch.autograd.grad(out, [x, h0, w_ih, w_hh, b_ih, b_hh], dout)]
    for name, loop64, e in zip(GRU_NAMES, gru_loop(inputs64, reverse, dout), expected):
        assert_rel_close(loop64, e, TOL[torch.float64], f"float64 loop vs nn.GRU {name}")

    def errors(results):
        return [((r.double() - e).abs().max() / e.abs().max()).item() for r, e in zip(results, expected)]

    theirs = errors(gru_loop(inputs, reverse, dout.to(dtype)))
    mine = errors(gru_op(inputs, reverse, dout.to(dtype)))
    bound = max(4 * max(theirs), torch.finfo(dtype).eps)
    for name, m, t in zip(GRU_NAMES, mine, theirs):
        assert m <= bound, f"{dtype} {name}: relative error {m:.2e} > bound {bound:.2e} (the loop's {t:.2e})"


# ------------------------------------------------------------------------------------------
# Both cells


def _has_cpu_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnlm_ext::{op}", "CPU")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", SHAPES)
def test_cuda_agrees_with_the_cpu_kernel(cell, dtype, reverse, T, B, I, H):
    """The CUDA and CPU kernels, same inputs: every output, the saved gates and every gradient
    within helpers.TOL of the CPU's (the same math, sums in another order)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rnnlm_ext::{cell}_forward", "CPU"):
        pytest.skip(f"rnnlm_ext::{cell}_forward has no CPU kernel in this build")
    dout, dc = _upstream(T, B, H, dtype, "cpu")
    if cell == "lstm":
        names = [*LSTM_NAMES, "gates"]

        def run(device):
            inputs = lstm_inputs(T, B, I, H, dtype, device)
            upstream = [t.to(device) for t in (dout, dc)]
            return [*lstm_op(inputs, reverse, *upstream), lstm_forward(inputs, reverse)[2]]
    else:
        names = [*GRU_NAMES, "saved"]

        def run(device):
            inputs = gru_inputs(T, B, I, H, dtype, device)
            return [*gru_op(inputs, reverse, dout.to(device)), OPS.gru_forward(*inputs, reverse, True)[1]]

    for name, on_cuda, on_cpu in zip(names, run("cuda"), run("cpu")):
        assert_rel_close(on_cuda.cpu(), on_cpu, TOL[dtype], f"{cell} {name}")


@pytest.mark.parametrize("reverse", [False, True])
def test_output_mask_and_inference(reverse):
    """Each gradient asked for alone comes out bit for bit as in the full run (the kernels
    skip only the unasked outputs' writes), the others as empty [0] tensors; train=False gives
    the same out (and c) bit for bit and keeps nothing."""
    T, B, I, H = 6, 3, 5, 37
    dout, dc = _upstream(T, B, H, torch.float32, "cuda")
    lstm = lstm_inputs(T, B, I, H, torch.float32)
    full = lstm_op(lstm, reverse, dout, dc)
    for k in range(6):
        mask = [i == k for i in range(6)]
        part = lstm_op(lstm, reverse, dout, dc, mask)
        for i, (name, got) in enumerate(zip(LSTM_NAMES[2:], part[2:])):
            want = full[2 + i] if i == k else torch.empty(0, device="cuda")
            assert torch.equal(got, want), f"lstm mask {mask}: {name}"
    out, c, gates = lstm_op(lstm, reverse, dout, dc, train=False)
    assert torch.equal(out, full[0]) and torch.equal(c, full[1]) and gates.shape == (0,)

    gru = gru_inputs(T, B, I, H, torch.float32)
    full = gru_op(gru, reverse, dout)
    for k in range(6):
        mask = [i == k for i in range(6)]
        part = gru_op(gru, reverse, dout, mask)
        for i, (name, got) in enumerate(zip(GRU_NAMES[1:], part[1:])):
            want = full[1 + i] if i == k else torch.empty(0, device="cuda")
            assert torch.equal(got, want), f"gru mask {mask}: {name}"
    out, saved = gru_op(gru, reverse, dout, train=False)
    assert torch.equal(out, full[0]) and saved.shape == (0,)


def test_persistent_path_is_refused_for_the_gated_cells():
    """The LSTM and GRU have only the per-step kernels: "persistent" raises, naming the
    alternatives, and "auto" and "per_step" run (the same loop, the same bits)."""
    T, B, I, H = 3, 2, 4, 8
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = lstm_inputs(T, B, I, H, torch.float32)
    with pytest.raises(RuntimeError, match="only the per-step CUDA kernels"):
        OPS.lstm_forward(x, h0, c0, w_ih, w_hh, None, False, False, "persistent")
    runs = [OPS.lstm_forward(x, h0, c0, w_ih, w_hh, None, False, False, p)[0] for p in ("auto", "per_step")]
    assert torch.equal(*runs)
    x, h0, w_ih, w_hh, b_ih, b_hh = gru_inputs(T, B, I, H, torch.float32)
    with pytest.raises(RuntimeError, match="only the per-step CUDA kernels"):
        OPS.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False, False, "persistent")
    runs = [OPS.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False, False, p)[0] for p in ("auto", "per_step")]
    assert torch.equal(*runs)
