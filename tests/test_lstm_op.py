"""The fused LSTM op (rnnlm_ext::lstm_forward / lstm_backward, ops.lstm_layer) on every device:
parity with torch.nn.LSTM, gradients, registration, inference, argument checks, threads."""

import pytest
import torch
from helpers import DEVICES, TOL, assert_rel_close, needs_cuda

from rnnlm_ext import ops

NAMES = ["out", "h_n", "c_n", "dx", "dh0", "dc0", "dw_ih", "dw_hh", "dbias"]

# the GRU op's odd sizes (tests/test_gru_op.py): T = 1 and B = 1, I and H not multiples of a
# vector, H = 65 one unit past a multiple of 16, B = 65 one-step chunks on the helper thread
SHAPES = [  # T, B, I, H
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (13, 5, 3, 37),
    (5, 1, 9, 65),
    (37, 4, 13, 13),
    (3, 65, 2, 11),
    (9, 6, 65, 37),
]


def make_lstm_inputs(T, B, I, H, dtype, device="cpu", bias=True, requires_grad=True, seed=0):
    """x [T,B,I], h0 and c0 [B,H] standard normal; w_ih [4H,I], w_hh [4H,H], bias [4H] (or None)
    with nn.LSTM's initialisation U(-1/√H, 1/√H). Drawn in float64 on the CPU from `seed`, then
    moved: the same numbers on every device and dtype."""
    g = torch.Generator().manual_seed(seed)

    def leaf(t):
        return t.to(device, dtype).requires_grad_(requires_grad)

    def uniform(*shape):
        return leaf((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) / H**0.5)

    x = leaf(torch.randn(T, B, I, generator=g, dtype=torch.float64))
    h0 = leaf(torch.randn(B, H, generator=g, dtype=torch.float64))
    c0 = leaf(torch.randn(B, H, generator=g, dtype=torch.float64))
    return x, h0, c0, uniform(4 * H, I), uniform(4 * H, H), uniform(4 * H) if bias else None


def upstream(T, B, H, dtype, device, seed=1):
    """Random gradients for out [T,B,H], h_n [B,H] and c_n [B,H]."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((T, B, H), (B, H), (B, H))
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


def leaves_of(inputs):
    return [t for t in inputs if t is not None and t.requires_grad]


def loss(out, h_n, c_n, dout, dh_n, dc_n):
    return (out * dout).sum() + (h_n * dh_n).sum() + (c_n * dc_n).sum()


def fused(inputs, reverse, dout, dh_n, dc_n):
    """out, h_n, c_n and the gradients of every input that requires one, from ops.lstm_layer."""
    out, c = ops.lstm_layer(*inputs, reverse=reverse)
    h_n, c_n = (out[0], c[0]) if reverse else (out[-1], c[-1])
    grads = torch.autograd.grad(loss(out, h_n, c_n, dout, dh_n, dc_n), leaves_of(inputs))
    return [out, h_n, c_n, *grads]


def torch_lstm(inputs, reverse, dout, dh_n, dc_n):
    """The same from a single-layer torch.nn.LSTM holding the same weights (bias_ih = bias,
    bias_hh = 0); the reverse direction is nn.LSTM on the flipped sequence, flipped back."""
    x, h0, c0, w_ih, w_hh, bias = inputs
    lstm = torch.nn.LSTM(x.shape[2], h0.shape[1], bias=bias is not None, device=x.device, dtype=x.dtype)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}
    if bias is not None:
        weights.update(bias_ih_l0=bias, bias_hh_l0=torch.zeros_like(bias))
    state = (h0.unsqueeze(0), c0.unsqueeze(0))
    out, (h_n, c_n) = torch.func.functional_call(lstm, weights, (x.flip(0) if reverse else x, state))
    out, h_n, c_n = (out.flip(0) if reverse else out), h_n[0], c_n[0]
    grads = torch.autograd.grad(loss(out, h_n, c_n, dout, dh_n, dc_n), leaves_of(inputs))
    return [out, h_n, c_n, *grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,B,I,H", SHAPES)
def test_matches_torch_nn_lstm_float64(device, reverse, bias, T, B, I, H):
    """out, h_n, c_n and the gradients of x, h0, c0 and every parameter, under random upstream
    gradients on out, h_n and c_n, within 1e-10 of nn.LSTM's relative to each tensor's scale
    (float64 rounding of sums in another order is ~1e-15)."""
    inputs = make_lstm_inputs(T, B, I, H, torch.float64, device, bias=bias)
    grads = upstream(T, B, H, torch.float64, device)
    expected = torch_lstm(inputs, reverse, *grads)
    for name, actual, e in zip(NAMES, fused(inputs, reverse, *grads), expected):
        assert e.abs().max() > 0, f"{name} is all zeros: comparing it would test nothing"
        assert_rel_close(actual, e, TOL[torch.float64], name)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_c_alone_or_out_alone(device):
    """A loss on c alone (out's gradient undefined) or on out alone (c's undefined, the op gets
    an empty dc): both match nn.LSTM."""
    inputs = make_lstm_inputs(6, 3, 4, 5, torch.float64, device)
    dout, dh_n, dc_n = upstream(6, 3, 5, torch.float64, device)
    zero_out, zero_h, zero_c = (torch.zeros_like(t) for t in (dout, dh_n, dc_n))
    for grads in ((zero_out, zero_h, dc_n), (dout, dh_n, zero_c)):
        expected = torch_lstm(inputs, False, *grads)
        out, c = ops.lstm_layer(*inputs)
        used = (c[-1] * dc_n).sum() if grads[0] is zero_out else (out * dout).sum() + (out[-1] * dh_n).sum()
        actual = torch.autograd.grad(used, leaves_of(inputs))
        for name, a, e in zip(NAMES[3:], actual, expected[3:]):
            assert_rel_close(a, e, TOL[torch.float64], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", [*SHAPES, (16, 64, 64, 64), (20, 8, 16, 256)])
def test_float32_within_4x_of_torch_nn_lstm_own_error(device, reverse, T, B, I, H):
    """float32 against nn.LSTM in float64. The float32 rounding of nn.LSTM itself, measured on
    the same inputs, sets the scale: every tensor's error (relative to its scale) stays within
    4x of nn.LSTM's largest (as for the GRU op); a wrong index or a dropped term is O(1e-2)."""
    inputs64 = make_lstm_inputs(T, B, I, H, torch.float64, device)
    inputs32 = make_lstm_inputs(T, B, I, H, torch.float32, device)
    grads = upstream(T, B, H, torch.float64, device)
    expected = torch_lstm(inputs64, reverse, *grads)

    def errors(results):
        return [((r.double() - e).abs().max() / e.abs().max()).item() for r, e in zip(results, expected)]

    theirs = errors(torch_lstm(inputs32, reverse, *(g.float() for g in grads)))
    ours = errors(fused(inputs32, reverse, *(g.float() for g in grads)))
    bound = 4 * max(theirs)
    for name, mine, torch_err in zip(NAMES, ours, theirs):
        assert mine <= bound, (
            f"{name}: relative error {mine:.2e} > 4 x nn.LSTM's largest {bound / 4:.2e} ({torch_err:.2e} on it)"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, reverse, bias):
    inputs = leaves_of(make_lstm_inputs(4, 3, 3, 5, torch.float64, device, bias=bias))
    assert torch.autograd.gradcheck(lambda *a: ops.lstm_layer(*a, reverse=reverse), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(device, requires_grad):
    """torch.library.opcheck on both ops (schema, fake kernel, autograd registration): with and
    without bias, both directions, train on and off, and backward masks of every kind, with dc
    given and empty."""
    for bias, reverse in ((True, False), (False, True)):
        inputs = make_lstm_inputs(3, 2, 4, 37, torch.float64, device, bias=bias, requires_grad=requires_grad)
        for train in (True, False):
            if train or not requires_grad:  # train=False with grad required has no backward to check
                torch.library.opcheck(torch.ops.rnnlm_ext.lstm_forward.default, (*inputs, reverse, train))
    inputs = make_lstm_inputs(3, 2, 4, 37, torch.float64, device, requires_grad=False)
    out, c, gates = torch.ops.rnnlm_ext.lstm_forward(*inputs, False, True)
    x, h0, c0, w_ih, w_hh, _ = inputs
    for dc in (torch.randn_like(c), c.new_empty(0)):
        for mask in ([True] * 6, [False, True, False, True, True, False], [False] * 6):
            args = (torch.randn_like(out), dc, x, h0, c0, w_ih, w_hh, out, c, gates, False, mask)
            torch.library.opcheck(torch.ops.rnnlm_ext.lstm_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    args = leaves_of(make_lstm_inputs(6, 3, 4, 45, torch.float32, device))

    def f(x, h0, c0, w_ih, w_hh, bias):
        out, c = ops.lstm_layer(x, h0, c0, w_ih, w_hh, bias, reverse=True)
        return (out * out).sum() + c[0].sum()

    torch.compiler.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss, compiled_loss = f(*args), compiled(*args)
    assert_rel_close(compiled_loss, eager_loss, 1e-6, "loss")
    for name, g, e in zip(NAMES[3:], torch.autograd.grad(compiled_loss, args), torch.autograd.grad(eager_loss, args)):
        assert_rel_close(g, e, 1e-6, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_keeps_nothing_and_gives_the_same_out(device, dtype, monkeypatch):
    """Under no_grad, or with no input requiring grad, lstm_layer asks the op for inference
    (train=False): the op then returns an empty gates tensor, and out and c equal training's
    bit for bit (the same arithmetic, only nothing kept)."""
    inputs = make_lstm_inputs(7, 3, 5, 37, dtype, device)
    out_train, c_train, gates = torch.ops.rnnlm_ext.lstm_forward(*inputs, True, True)
    out_infer, c_infer, nothing = torch.ops.rnnlm_ext.lstm_forward(*inputs, True, False)
    assert gates.shape == (7, 3, 4 * 37) and nothing.shape == (0,)
    assert torch.equal(out_infer, out_train) and torch.equal(c_infer, c_train)

    trains = []
    real = torch.ops.rnnlm_ext.lstm_forward

    def spy(*args):
        trains.append(args[7])
        return real(*args)

    monkeypatch.setattr(torch.ops.rnnlm_ext, "lstm_forward", spy)
    with torch.no_grad():
        out, c = ops.lstm_layer(*inputs, reverse=True)
        assert torch.equal(out, out_train) and torch.equal(c, c_train)
    frozen = [t.detach() if t is not None else None for t in inputs]
    assert torch.equal(ops.lstm_layer(*frozen, reverse=True)[1], c_train)
    ops.lstm_layer(*inputs, reverse=True)
    assert trains == [False, False, True]


@pytest.mark.parametrize("device", DEVICES)
def test_backward_honours_needs_input_grad(device, monkeypatch):
    """No dx, dh0 or dc0 when x, h0 and c0 need none: the backward op is told so, and the
    gradients it is not asked for come back empty."""
    masks = []
    real = torch.ops.rnnlm_ext.lstm_backward

    def spy(*args):
        masks.append(list(args[11]))
        return real(*args)

    monkeypatch.setattr(torch.ops.rnnlm_ext, "lstm_backward", spy)
    inputs = make_lstm_inputs(5, 3, 4, 6, torch.float64, device)
    for t in inputs[:3]:
        t.requires_grad_(False)
    grads = upstream(5, 3, 6, torch.float64, device)
    expected = torch_lstm(inputs, False, *grads)
    actual = fused(inputs, False, *grads)
    assert masks == [[False, False, False, True, True, True]]
    for name, a, e in zip(NAMES[6:], actual[3:], expected[3:]):
        assert_rel_close(a, e, TOL[torch.float64], name)
    x, h0, c0, w_ih, w_hh, _ = (t.detach() for t in inputs)
    out, c, gates = torch.ops.rnnlm_ext.lstm_forward(*inputs, False, True)
    mask = [False, True, False, False, True, False]
    got = real(grads[0], c.new_empty(0), x, h0, c0, w_ih, w_hh, out.detach(), c.detach(), gates, False, mask)
    assert [g.shape for g, wanted in zip(got, mask) if not wanted] == [(0,)] * 4, "a masked-off gradient is not empty"


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused_not_silently_zero(device):
    inputs = make_lstm_inputs(4, 2, 3, 5, torch.float64, device)
    out, _ = ops.lstm_layer(*inputs)
    with pytest.raises(RuntimeError, match="backward is not differentiable"):
        torch.autograd.grad(out.pow(2).sum(), inputs[4], create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_an_inference_call_is_refused(device):
    """train=False keeps nothing: asking for its gradient must fail and say why."""
    inputs = make_lstm_inputs(4, 2, 3, 5, torch.float64, device)
    out, _, _ = torch.ops.rnnlm_ext.lstm_forward(*inputs, False, False)
    with pytest.raises(RuntimeError, match="train=False and kept nothing"):
        out.sum().backward()


def _other_device(t):
    return torch.zeros_like(t, device="meta" if t.device.type == "cpu" else "cpu")


# the op's own checks on the CPU (and CUDA) kernels, and on meta: the fake kernel torch.compile traces
CHECKED_DEVICES = ["cpu", "meta", pytest.param("cuda", marks=needs_cuda)]

BAD_FORWARD_ARGUMENTS = [
    (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
    (lambda a: {**a, "x": a["x"].long()}, "x must be a floating-point tensor, got"),
    (lambda a: {**a, "w_hh": a["w_hh"][0]}, r"w_hh must be 2-D \[4H,H\]"),
    (lambda a: {**a, "w_hh": a["w_hh"][:5]}, "w_hh must have shape"),
    (lambda a: {**a, "w_ih": a["w_ih"][:, :2]}, "w_ih must have shape"),
    (lambda a: {**a, "h0": a["h0"][:1]}, "h0 must have shape"),
    (lambda a: {**a, "c0": a["c0"][:, :2]}, "c0 must have shape"),
    (lambda a: {**a, "bias": a["bias"][:2]}, "bias must have shape"),
    (lambda a: {**a, "w_ih": a["w_ih"].double()}, "w_ih has dtype"),
    (lambda a: {**a, "c0": a["c0"].double()}, "c0 has dtype"),
    (lambda a: {**a, "bias": a["bias"].double()}, "bias has dtype"),
    (lambda a: {**a, "h0": _other_device(a["h0"])}, "h0 is on .* but x is on"),
    (lambda a: {**a, "c0": _other_device(a["c0"])}, "c0 is on .* but x is on"),
    (lambda a: {**a, "x": a["x"][:0]}, "must all be >= 1"),
]


@pytest.mark.parametrize("change,message", BAD_FORWARD_ARGUMENTS)
@pytest.mark.parametrize("device", CHECKED_DEVICES)
def test_forward_rejects_bad_arguments(change, message, device):
    x, h0, c0, w_ih, w_hh, bias = make_lstm_inputs(3, 2, 4, 5, torch.float32, device, requires_grad=False)
    args = change(dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, bias=bias, reverse=False, train=True))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.lstm_forward(*args.values())


BAD_BACKWARD_ARGUMENTS = [
    (lambda a: {**a, "dout": a["dout"][:2]}, "dout must have shape"),
    (lambda a: {**a, "dc": a["dc"][:2]}, "dc must have shape"),
    (lambda a: {**a, "out": a["out"][:, :1]}, "out must have shape"),
    (lambda a: {**a, "c": a["c"][:, :1]}, "c must have shape"),
    (lambda a: {**a, "gates": a["gates"][..., :5]}, "gates must have shape"),
    (lambda a: {**a, "gates": a["gates"][:0]}, "gates must have shape"),
    (lambda a: {**a, "dout": a["dout"].double()}, "dout has dtype"),
    (lambda a: {**a, "dc": a["dc"].double()}, "dc has dtype"),
    (lambda a: {**a, "gates": a["gates"].double()}, "gates has dtype"),
    (lambda a: {**a, "c": _other_device(a["c"])}, "c is on .* but x is on"),
    (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
    (lambda a: {**a, "w_hh": a["w_hh"][:5]}, "w_hh must have shape"),
    (lambda a: {**a, "h0": a["h0"][:1]}, "h0 must have shape"),
    (lambda a: {**a, "c0": a["c0"][:1]}, "c0 must have shape"),
]


@pytest.mark.parametrize("change,message", BAD_BACKWARD_ARGUMENTS)
@pytest.mark.parametrize("device", CHECKED_DEVICES)
def test_backward_rejects_bad_arguments(change, message, device):
    x, h0, c0, w_ih, w_hh, bias = make_lstm_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)
    out, c, gates = torch.ops.rnnlm_ext.lstm_forward(x, h0, c0, w_ih, w_hh, bias, False, True)
    args = dict(dout=torch.ones_like(out), dc=torch.ones_like(c), x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh)
    args = {k: v.to(device) for k, v in {**args, "out": out, "c": c, "gates": gates}.items()}
    args = change({**args, "reverse": False, "output_mask": [True] * 6})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.lstm_backward(*args.values())


def test_cpu_kernel_rejects_half():
    inputs = [t.half() for t in make_lstm_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)]
    with pytest.raises(RuntimeError, match="the CPU kernel takes float32 or float64"):
        torch.ops.rnnlm_ext.lstm_forward(*inputs, False, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,B,I,H", [(30, 5, 7, 33), (5, 64, 7, 33), (9, 6, 5, 400), (4, 3, 7, 1100)])
def test_one_two_and_three_threads_agree_bit_for_bit(dtype, T, B, I, H, num_threads):
    """The schedule (cpu_threads.h) depends on the thread count and the shape: one thread alone;
    a helper thread beside the loop (H = 33 at two and three threads, H = 400 at two); the
    hidden units split between the threads, each its slice of all four gate blocks (H = 400
    at three, H = 1100 at two and three). Outputs and every gradient must not depend on it,
    both directions."""
    for reverse in (False, True):
        inputs = make_lstm_inputs(T, B, I, H, dtype)
        grads = upstream(T, B, H, dtype, "cpu")
        results = []
        for threads in (1, 2, 3):
            num_threads(threads)
            results.append(fused(inputs, reverse, *grads))
        for n, other in zip((2, 3), results[1:]):
            for name, one, two in zip(NAMES, results[0], other):
                diff = (one - two).abs().max().item()
                assert torch.equal(one, two), f"reverse={reverse} {name} at {n} threads: max diff {diff:.2e}"


@pytest.mark.parametrize("T,B,I,H", [(4, 3, 7, 1100), (30, 5, 7, 33)])
def test_split_and_helper_schedules_match_torch_nn_lstm(T, B, I, H, num_threads):
    """Two threads: H = 1100 splits the hidden units, H = 33 runs the helper thread; float64
    parity with nn.LSTM on both."""
    num_threads(2)
    for reverse in (False, True):
        inputs = make_lstm_inputs(T, B, I, H, torch.float64)
        grads = upstream(T, B, H, torch.float64, "cpu")
        for name, a, e in zip(NAMES, fused(inputs, reverse, *grads), torch_lstm(inputs, reverse, *grads)):
            assert_rel_close(a, e, TOL[torch.float64], f"reverse={reverse} {name}")
