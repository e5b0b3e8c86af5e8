"""The fused op itself on every device: parity with the reference and with nn.RNN, gradients,
registration, argument checks; on the CPU also threads, the workspace and memory."""

import gc
import os
import threading

import pytest
import torch
from helpers import (
    DEVICES,
    OP_SHAPES,
    TOL,
    assert_rel_close,
    check_float32_tanh,
    check_op_against_reference,
    cuda_paths,
    forced,
    make_inputs,
    needs_cuda,
    poison_cuda_cache,
    run_python,
)

from rnnlm_ext import ops, reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H,bias", OP_SHAPES)
def test_op_matches_reference(device, dtype, nonlinearity, reverse, T, B, I, H, bias):
    check_op_against_reference(device, dtype, T, B, I, H, nonlinearity, reverse, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 3, 5), (6, 5, 7, 33), (9, 64, 16, 200)])
def test_op_matches_torch_nn_rnn(device, nonlinearity, reverse, T, B, I, H):
    """torch.nn.RNN (cuDNN on CUDA) with the same weights, in float64: out, h_n and the
    gradients of x, h0 and all four parameters (each bias gets db). The reverse direction is
    nn.RNN on the flipped sequence, flipped back."""
    x, h0, w_ih, w_hh, b_ih = make_inputs(T, B, I, H, torch.float64, device)
    g = torch.Generator().manual_seed(1)
    b_hh = (torch.randn(H, generator=g, dtype=torch.float64) / H**0.5).to(device).requires_grad_()
    leaves = [x, h0, w_ih, w_hh, b_ih, b_hh]
    dout = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(device)

    rnn = torch.nn.RNN(I, H, nonlinearity=nonlinearity, device=device, dtype=torch.float64)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    seq = x.flip(0) if reverse else x
    expected, expected_h_n = torch.func.functional_call(rnn, weights, (seq, h0.unsqueeze(0)))
    expected = expected.flip(0) if reverse else expected
    expected_grads = torch.autograd.grad(expected, leaves, dout)

    tol = TOL[torch.float64]
    for path in cuda_paths(device, B, H, torch.float64):
        if device == "cuda":
            poison_cuda_cache()
        with forced(path):
            out = ops.rnn_layer(x, h0, w_ih, w_hh, b_ih + b_hh, nonlinearity, reverse)
            grads = torch.autograd.grad(out, leaves, dout)
        h_n = out[0] if reverse else out[-1]
        assert_rel_close(out, expected, tol, f"{path} out")
        assert_rel_close(h_n, expected_h_n[0], tol, f"{path} h_n")
        for name, g, e in zip(["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"], grads, expected_grads):
            assert_rel_close(g, e, tol, f"{path} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, nonlinearity, reverse, bias):
    inputs = make_inputs(4, 3, 3, 5, torch.float64, device, bias=bias)
    for path in cuda_paths(device, 3, 5, torch.float64):
        with forced(path):
            assert torch.autograd.gradcheck(lambda *a: ops.rnn_layer(*a, nonlinearity, reverse), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(device, requires_grad):
    """torch.library.opcheck on both ops (schema, fake kernel, autograd registration), with
    and without bias, every nonlinearity and direction, and backward masks of every kind."""
    for path in cuda_paths(device, 2, 37, torch.float64):
        with forced(path):
            for bias in (True, False):
                for nonlinearity, reverse in (("tanh", False), ("relu", True)):
                    inputs = make_inputs(3, 2, 4, 37, torch.float64, device, bias=bias, requires_grad=requires_grad)
                    torch.library.opcheck(torch.ops.rnnlm_ext.rnn_forward.default, (*inputs, nonlinearity, reverse))
            x, h0, w_ih, w_hh, b = make_inputs(3, 2, 4, 37, torch.float64, device, requires_grad=False)
            out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
            for mask in ([True] * 5, [False, True, False, True, True], [False] * 5):
                args = (torch.randn_like(out), x, h0, w_ih, w_hh, out, "tanh", False, mask)
                torch.library.opcheck(torch.ops.rnnlm_ext.rnn_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_honours_needs_input_grad(device, monkeypatch):
    """No dx when x needs none (an embedding that is frozen): the backward op is told so, and
    the gradients it is not asked for come back empty."""
    masks = []
    real = torch.ops.rnnlm_ext.rnn_backward

    def spy(*args, **kwargs):
        masks.append(list(args[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.rnnlm_ext, "rnn_backward", spy)
    x, h0, w_ih, w_hh, b = make_inputs(5, 3, 4, 6, torch.float64, device)
    x.requires_grad_(False)
    h0.requires_grad_(False)
    expected = torch.autograd.grad(reference.rnn_layer(x, h0, w_ih, w_hh, b).sum(), [w_ih, w_hh, b])
    for path in cuda_paths(device, 3, 6, torch.float64):
        masks.clear()
        with forced(path):
            out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
            grads = torch.autograd.grad(out.sum(), [w_ih, w_hh, b])
            assert masks == [[False, False, True, True, True]]
            for name, g, e in zip(["dw_ih", "dw_hh", "db"], grads, expected):
                assert_rel_close(g, e, TOL[torch.float64], f"{path} {name}")
            mask = [False, False, True, False, True]
            dx, dh0, dw_ih, dw_hh, db = real(torch.ones_like(out), x, h0, w_ih, w_hh, out.detach(), "tanh", False, mask)
        assert [t.shape for t in (dx, dh0, dw_hh)] == [(0,), (0,), (0,)], "a masked-off gradient is not empty"
        assert_rel_close(dw_ih, expected[0], TOL[torch.float64], f"{path} dw_ih alone")
        assert_rel_close(db, expected[2], TOL[torch.float64], f"{path} db alone")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    args = make_inputs(6, 3, 4, 45, torch.float32, device)

    def f(x, h0, w_ih, w_hh, b):
        out = ops.rnn_layer(x, h0, w_ih, w_hh, b, "tanh", False)
        return (out * out).sum()

    for path in cuda_paths(device, 3, 45, torch.float32):
        torch.compiler.reset()  # a path read while tracing would otherwise stay in the compiled graph
        with forced(path):
            compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
            eager_loss, compiled_loss = f(*args), compiled(*args)
            assert_rel_close(compiled_loss, eager_loss, 1e-6, f"{path} loss")
            for g, e in zip(torch.autograd.grad(compiled_loss, args), torch.autograd.grad(eager_loss, args)):
                assert_rel_close(g, e, 1e-6, f"{path} grad")


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused_not_silently_zero(device):
    """The backward op has no derivative of its own: create_graph=True must fail loudly
    (nn.RNN would give a true second derivative, a silent zero would mislead)."""
    x, h0, w_ih, w_hh, b = make_inputs(4, 2, 3, 5, torch.float64, device)
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    with pytest.raises(RuntimeError, match="backward is not differentiable"):
        torch.autograd.grad(out.pow(2).sum(), w_hh, create_graph=True)
    (g,) = torch.autograd.grad(ops.rnn_layer(x, h0, w_ih, w_hh, b).pow(2).sum(), w_hh)  # first order still works
    (e,) = torch.autograd.grad(reference.rnn_layer(x, h0, w_ih, w_hh, b).pow(2).sum(), w_hh)
    assert_rel_close(g, e, TOL[torch.float64], "dw_hh")


def _other_device(t):
    return torch.zeros_like(t, device="meta" if t.device.type == "cpu" else "cpu")


# the op's own argument checks on the CPU and CUDA kernels, and on meta: the fake kernel
# torch.compile traces
CHECKED_DEVICES = ["cpu", "meta", pytest.param("cuda", marks=needs_cuda)]

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
@pytest.mark.parametrize("device", CHECKED_DEVICES)
def test_op_rejects_bad_arguments(change, message, device):
    x, h0, w_ih, w_hh, b = make_inputs(3, 2, 4, 5, torch.float32, device, requires_grad=False)
    args = change(dict(x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, bias=b, nonlinearity="tanh", reverse=False))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.rnn_forward(*args.values())


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
@pytest.mark.parametrize("device", CHECKED_DEVICES)
def test_backward_op_rejects_bad_arguments(change, message, device):
    x, h0, w_ih, w_hh, b = make_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)
    out = ops.rnn_layer(x, h0, w_ih, w_hh, b)
    args = dict(dout=torch.ones_like(out), x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, out=out)
    args = {k: v.to(device) for k, v in args.items()}
    args = change({**args, "nonlinearity": "tanh", "reverse": False, "output_mask": [True] * 5})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.rnn_backward(*args.values())


def test_cpu_kernel_rejects_half():
    args = [t.half() for t in make_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)]
    with pytest.raises(RuntimeError, match="the CPU kernel takes float32 or float64"):
        torch.ops.rnnlm_ext.rnn_forward(*args, "tanh", False)


def test_concurrent_calls_from_two_threads():
    """Two threads call the op at once, each cycling through three shapes and both dtypes in
    its own order, so that the CPU backward's shared workspace is taken, given back, outgrown
    and swapped between dtypes under contention. Every result equals the one-thread result
    bit for bit."""
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
    """The CPU backward keeps its dz workspace between calls. A call that leaves it full of
    NaN, then smaller and larger calls, in both dtypes: each must be exact, so no call reads
    what an earlier one left."""
    x, h0, w_ih, w_hh, b = make_inputs(6, 5, 4, 7, dtype, seed=1)
    poisoned = ops.rnn_layer(x * float("nan"), h0, w_ih, w_hh, b)
    (dx,) = torch.autograd.grad(poisoned, x, torch.ones_like(poisoned))
    assert dx.isnan().all()
    other = torch.float64 if dtype == torch.float32 else torch.float32
    for d, (T, B, I, H) in [(dtype, (2, 3, 4, 5)), (other, (3, 2, 2, 3)), (dtype, (9, 6, 3, 8)), (dtype, (1, 1, 1, 1))]:
        for reverse in (False, True):
            check_op_against_reference("cpu", d, T, B, I, H, "tanh", reverse, True)


def rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
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
    check_float32_tanh()


@pytest.mark.slow
@pytest.mark.parametrize("capability,path", [("avx2", "avx2"), ("default", "scalar")])
def test_other_cpu_paths(capability, path):
    """The float32 activation has an AVX-512, an AVX2 and a scalar path, chosen by ATen's CPU
    capability. ATEN_CPU_CAPABILITY selects the lower ones here, in a subprocess: the tanh
    accuracy check and float32/float64 parity must hold on each."""
    code = (
        "import torch, helpers\n"
        "from rnnlm_ext import ops\n"
        f"assert ops.build_info()['cpu_activation'].startswith({path!r}), ops.build_info()\n"
        "helpers.check_float32_tanh()\n"
        "for dtype in (torch.float32, torch.float64):\n"
        "    for r in (False, True):\n"
        "        helpers.check_op_against_reference('cpu', dtype, 7, 3, 5, 37, 'tanh', r, True)\n"
        "print('ok')\n"
    )
    assert run_python(code, ATEN_CPU_CAPABILITY=capability).strip() == "ok"


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_time_loop_across_threads(threads, dtype, num_threads):
    """How the time loop uses threads depends on the shape. Two threads share the hidden
    columns from 512 each, three or more from 128 each (uneven slices here: H = 1100 splits
    560 + 540 on two threads, 368 + 368 + 364 on three; H = 400 splits 144 + 144 + 112 on
    three). Otherwise one thread runs the steps while a helper does the chunked GEMMs (chunks
    of 64 // B steps: several at B = 5, one step each at B = 64 and 300). The same numbers as
    the reference whatever the count."""
    num_threads(threads)
    for reverse in (False, True):
        check_op_against_reference("cpu", dtype, 4, 3, 7, 1100, "tanh", reverse, True)  # split on 2 and 3
        check_op_against_reference("cpu", dtype, 3, 4, 9, 400, "relu", reverse, False)  # split on 3, helper on 2
        check_op_against_reference("cpu", dtype, 30, 5, 7, 33, "tanh", reverse, True)  # helper, chunks 12+12+6
        check_op_against_reference("cpu", dtype, 5, 64, 7, 33, "relu", reverse, True)  # helper, 1-step chunks
        check_op_against_reference("cpu", dtype, 3, 300, 5, 20, "relu", reverse, True)  # helper, 1-step chunks


@pytest.mark.slow
def test_time_loop_without_a_second_thread():
    """OMP_THREAD_LIMIT=1 gives the helper's parallel region a team of one thread while torch
    still asks for two: the calling thread must then do the helper's share itself."""
    code = (
        "import torch, helpers; torch.set_num_threads(2)\n"
        "for r in (False, True):\n"
        "    helpers.check_op_against_reference('cpu', torch.float64, 10, 64, 7, 33, 'tanh', r, True)\n"
        "    helpers.check_op_against_reference('cpu', torch.float32, 9, 32, 5, 48, 'relu', r, True)\n"
        "print('ok')\n"
    )
    assert run_python(code, OMP_THREAD_LIMIT="1").strip() == "ok"
