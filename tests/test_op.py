"""The fused op itself: parity with the reference, gradients, registration, threads, memory."""
import gc
import os
import subprocess
import sys
import threading

import pytest
import torch

from helpers import TOL, assert_rel_close, live_inputs, make_inputs
from rnnlm_ext import ops, reference


def _test_correctness(dtype, T, B, I, H, nonlinearity, reverse, bias):
    """Forward and every gradient of the op against the pure-PyTorch reference."""
    inputs, seed = live_inputs(T, B, I, H, dtype, "cpu", nonlinearity, reverse, bias)
    out = ops.rnn_layer(*inputs, nonlinearity, reverse)
    expected = reference.rnn_layer(*inputs, nonlinearity, reverse)
    tol = TOL[dtype]
    assert_rel_close(out, expected, tol, "out")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, leaves, dout)
    expected_grads = torch.autograd.grad(expected, leaves, dout)
    for name, g, e in zip(["dx", "dh0", "dw_ih", "dw_hh", "db"], grads, expected_grads):
        assert e.abs().max() > 0, f"{name} is all zeros: comparing it would test nothing"
        assert_rel_close(g, e, tol, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "T,B,I,H,bias",
    [(1, 1, 1, 1, True), (7, 3, 5, 3, True), (16, 4, 9, 33, False), (5, 1, 64, 17, True), (3, 65, 2, 70, True)],
)
def test_op_matches_reference(dtype, nonlinearity, reverse, T, B, I, H, bias):
    _test_correctness(dtype, T, B, I, H, nonlinearity, reverse, bias)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(nonlinearity, reverse, bias):
    inputs = make_inputs(4, 2, 3, 5, torch.float64, bias=bias)
    assert torch.autograd.gradcheck(lambda *a: ops.rnn_layer(*a, nonlinearity, reverse), inputs)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(requires_grad):
    for bias in (True, False):
        for nonlinearity, reverse in (("tanh", False), ("relu", True)):
            inputs = make_inputs(3, 2, 4, 5, torch.float64, bias=bias, requires_grad=requires_grad)
            torch.library.opcheck(torch.ops.rnnlm_ext.rnn_forward.default, (*inputs, nonlinearity, reverse))
    x, h0, w_ih, w_hh, b = make_inputs(3, 2, 4, 5, torch.float64, requires_grad=False)
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    for mask in ([True] * 5, [False, True, False, True, True]):
        torch.library.opcheck(
            torch.ops.rnnlm_ext.rnn_backward.default, (torch.randn_like(out), x, h0, w_ih, w_hh, out, "tanh", False, mask)
        )


def test_backward_honours_needs_input_grad(monkeypatch):
    """No dx when x needs none (an embedding that is frozen): the backward op is told so."""
    masks = []
    real = torch.ops.rnnlm_ext.rnn_backward

    def spy(*args, **kwargs):
        masks.append(list(args[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.rnnlm_ext, "rnn_backward", spy)
    x, h0, w_ih, w_hh, b = make_inputs(5, 3, 4, 6, torch.float64)
    x.requires_grad_(False)
    h0.requires_grad_(False)
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    grads = torch.autograd.grad(out.sum(), [w_ih, w_hh, b])
    assert masks == [[False, False, True, True, True]]
    expected = torch.autograd.grad(reference.rnn_layer(x, h0, w_ih, w_hh, b).sum(), [w_ih, w_hh, b])
    for g, e in zip(grads, expected):
        assert_rel_close(g, e, TOL[torch.float64])
    # the masked-off gradients come back empty from the op itself
    dx, dh0, *_ = real(torch.ones_like(out), x, h0, w_ih, w_hh, out.detach(), "tanh", False, masks[0])
    assert dx.numel() == 0 and dh0.numel() == 0


def test_torch_compile_fullgraph_equals_eager():
    x, h0, w_ih, w_hh, b = make_inputs(6, 3, 4, 5, torch.float32)

    def f(x, h0, w_ih, w_hh, b):
        out = ops.rnn_layer(x, h0, w_ih, w_hh, b, "tanh", False)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (x, h0, w_ih, w_hh, b)
    eager_loss, compiled_loss = f(*args), compiled(*args)
    assert_rel_close(compiled_loss, eager_loss, 1e-6, "loss")
    for g, e in zip(torch.autograd.grad(compiled_loss, args), torch.autograd.grad(eager_loss, args)):
        assert_rel_close(g, e, 1e-6, "grad")


def _other_device(t):
    return torch.zeros_like(t, device="meta" if t.device.type == "cpu" else "cpu")


BAD_FORWARD_ARGUMENTS = [
    (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
    (lambda a: {**a, "x": a["x"].long()}, "x must be a floating-point tensor, got"),
    (lambda a: {**a, "h0": a["h0"][:1]}, "h0 must have shape"),
    (lambda a: {**a, "w_ih": a["w_ih"][:, :2]}, "w_ih must have shape"),
    (lambda a: {**a, "w_hh": a["w_hh"][:, :2]}, "w_hh must have shape"),
    (lambda a: {**a, "bias": a["bias"][:2]}, "bias must have shape"),
    (lambda a: {**a, "w_hh": a["w_hh"].double()}, "w_hh has dtype"),
    (lambda a: {**a, "h0": _other_device(a["h0"])}, "h0 is on .* but x is on"),
    (lambda a: {**a, "bias": _other_device(a["bias"])}, "bias is on .* but x is on"),
    (lambda a: {**a, "x": a["x"][:0]}, "must all be >= 1"),
    (lambda a: {**a, "nonlinearity": "gelu"}, "nonlinearity must be 'tanh' or 'relu'"),
]


@pytest.mark.parametrize("change,message", BAD_FORWARD_ARGUMENTS)
@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: the fake kernel torch.compile traces
def test_op_rejects_bad_arguments(change, message, device):
    x, h0, w_ih, w_hh, b = (t.to(device) for t in make_inputs(3, 2, 4, 5, torch.float32, requires_grad=False))
    args = change(dict(x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, bias=b, nonlinearity="tanh", reverse=False))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.rnn_forward(*args.values())


def test_cpu_kernel_rejects_half():
    args = [t.half() for t in make_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)]
    with pytest.raises(RuntimeError, match="the CPU kernel takes float32 or float64"):
        torch.ops.rnnlm_ext.rnn_forward(*args, "tanh", False)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "dout": a["dout"][:2]}, "dout must have shape"),
        (lambda a: {**a, "out": a["out"][:, :1]}, "out must have shape"),
        (lambda a: {**a, "dout": a["dout"].double()}, "dout has dtype"),
        (lambda a: {**a, "out": a["out"].double()}, "out has dtype"),
        (lambda a: {**a, "out": _other_device(a["out"])}, "out is on .* but x is on"),
        (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
        (lambda a: {**a, "w_ih": a["w_ih"][:, :2]}, "w_ih must have shape"),
        (lambda a: {**a, "nonlinearity": "gelu"}, "nonlinearity must be 'tanh' or 'relu'"),
    ],
)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_op_rejects_bad_arguments(change, message, device):
    x, h0, w_ih, w_hh, b = make_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    args = dict(dout=torch.ones_like(out), x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, out=out)
    args = {k: v.to(device) for k, v in args.items()}
    args = change({**args, "nonlinearity": "tanh", "reverse": False, "output_mask": [True] * 5})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.rnn_backward(*args.values())


def test_concurrent_calls_from_two_threads():
    """Two threads call the op at once, each cycling through three shapes and both dtypes in
    its own order, so that the backward's shared workspace is taken, given back, outgrown and
    swapped between dtypes under contention. Every result equals the one-thread result bit
    for bit."""
    cases = [
        make_inputs(20, 8, 16, 32, torch.float32, seed=0),
        make_inputs(9, 5, 7, 70, torch.float64, seed=1),
        make_inputs(3, 300, 5, 20, torch.float32, seed=2),
    ]
    expected = []
    for inputs in cases:
        out = ops.rnn_layer(*inputs)
        expected.append((out.detach().clone(), torch.autograd.grad(out.sum(), inputs)))
    errors = []

    def worker(order):
        try:
            for i in range(300):
                k = order[i % len(order)]
                out = ops.rnn_layer(*cases[k])
                grads = torch.autograd.grad(out.sum(), cases[k])
                assert torch.equal(out, expected[k][0]), f"case {k}: the output differs"
                assert all(torch.equal(g, e) for g, e in zip(grads, expected[k][1])), f"case {k}: a gradient differs"
        except Exception as err:  # reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(order,)) for order in ([0, 1, 2], [2, 1, 0, 1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_workspace_reused_across_shapes(dtype):
    """The CPU backward keeps its dz workspace between calls. A call that leaves
    it full of NaN, then smaller and larger calls, in both dtypes: each must be exact, so no
    call reads what an earlier one left."""
    x, h0, w_ih, w_hh, b = make_inputs(6, 5, 4, 7, dtype, seed=1)
    poisoned = ops.rnn_layer(x * float("nan"), h0, w_ih, w_hh, b)
    (dx,) = torch.autograd.grad(poisoned, x, torch.ones_like(poisoned))
    assert dx.isnan().all()
    other = torch.float64 if dtype == torch.float32 else torch.float32
    for d, (T, B, I, H) in [(dtype, (2, 3, 4, 5)), (other, (3, 2, 2, 3)), (dtype, (9, 6, 3, 8)), (dtype, (1, 1, 1, 1))]:
        for reverse in (False, True):
            _test_correctness(d, T, B, I, H, "tanh", reverse, True)


def rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read the resident set size")
def test_memory_stays_flat_over_10000_calls():
    inputs = make_inputs(8, 4, 8, 16, torch.float32, seed=0)

    def step():
        out = ops.rnn_layer(*inputs)
        torch.autograd.grad(out.sum(), inputs)

    for _ in range(500):  # warm up allocator caches
        step()
    gc.collect()
    before = rss_bytes()
    for _ in range(10_000):
        step()
    gc.collect()
    grown = rss_bytes() - before
    # each call allocates ~4 KB of tensors: a leak of one per call would be ~40 MB
    assert grown < 4 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 10,000 calls"


def test_float32_tanh_within_3_ulp_and_nan_kept():
    """The kernel's own vectorised float32 tanh (T=1, w_ih=1, w_hh=0: out = tanh(x)) against
    float64 tanh, over a sweep that covers the small-|x| and saturated ranges."""
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


@pytest.mark.parametrize("capability,path", [("avx2", "avx2"), ("default", "scalar")])
def test_other_cpu_paths(capability, path):
    """The float32 activation has an AVX-512, an AVX2 and a scalar path, chosen by ATen's CPU
    capability. ATEN_CPU_CAPABILITY selects the lower ones here, in a subprocess: the tanh
    accuracy test and float32/float64 parity must hold on each."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import torch, test_op as t\n"
        "from rnnlm_ext import ops\n"
        f"assert ops.build_info()['cpu_activation'].startswith({path!r}), ops.build_info()\n"
        "t.test_float32_tanh_within_3_ulp_and_nan_kept()\n"
        "for dtype in (torch.float32, torch.float64):\n"
        "    for r in (False, True):\n"
        "        t._test_correctness(dtype, 7, 3, 5, 37, 'tanh', r, True)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_time_loop_across_threads(threads, dtype):
    """How the time loop uses threads depends on the shape. Two threads share the hidden
    columns from 512 each, three or more from 128 each (uneven slices here: H = 1100 splits
    560 + 540 on two threads, 368 + 368 + 364 on three; H = 400 splits 144 + 144 + 112 on
    three). Otherwise one thread runs the steps while a helper does the chunked GEMMs (chunks
    of 64 // B steps: several at B = 5, one step each at B = 64 and 300). The same numbers as
    the reference whatever the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for reverse in (False, True):
            _test_correctness(dtype, 4, 3, 7, 1100, "tanh", reverse, True)  # split on 2 and 3
            _test_correctness(dtype, 3, 4, 9, 400, "relu", reverse, False)  # split on 3, helper on 2
            _test_correctness(dtype, 30, 5, 7, 33, "tanh", reverse, True)  # helper, chunks 12+12+6
            _test_correctness(dtype, 5, 64, 7, 33, "relu", reverse, True)  # helper, 1-step chunks
            _test_correctness(dtype, 3, 300, 5, 20, "relu", reverse, True)  # helper, 1-step chunks
    finally:
        torch.set_num_threads(previous)


def test_time_loop_without_a_second_thread():
    """OMP_THREAD_LIMIT=1 gives the helper's parallel region a team of one thread while torch
    still asks for two: the calling thread must then do the helper's share itself."""
    code = (
        "import torch, sys; sys.path.insert(0, 'tests'); import test_op as t; torch.set_num_threads(2)\n"
        "for r in (False, True):\n"
        "    t._test_correctness(torch.float64, 10, 64, 7, 33, 'tanh', r, True)\n"
        "    t._test_correctness(torch.float32, 9, 32, 5, 48, 'relu', r, True)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_double_backward_is_refused_not_silently_zero():
    """The backward op has no derivative of its own: create_graph=True must fail loudly
    (nn.RNN would give a true second derivative, a silent zero would mislead)."""
    x, h0, w_ih, w_hh, b = make_inputs(4, 2, 3, 5, torch.float64)
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    with pytest.raises(RuntimeError, match="backward is not differentiable"):
        torch.autograd.grad(out.pow(2).sum(), w_hh, create_graph=True)
    (g,) = torch.autograd.grad(ops.rnn_layer(x, h0, w_ih, w_hh, b).pow(2).sum(), w_hh)  # first order still works
    assert g.abs().max() > 0
