"""The fused GRU op (rnnlm_ext::gru_forward / gru_backward, ops.gru_layer) on every device:
parity with torch.nn.GRU, gradients, registration, inference, argument checks, threads."""

import inspect

import pytest
import torch
from helpers import DEVICES, TOL, assert_rel_close, needs_cuda, run_python

from rnnlm_ext import ops

NAMES = ["out", "h_n", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]

# odd sizes: T = 1 and B = 1, I and H not multiples of a vector, H = 65 one unit past a
# multiple of 16 (the vector tail), B = 65 one-step chunks on the CPU's helper thread
SHAPES = [  # T, B, I, H
    (1, 1, 1, 1),
    (2, 3, 5, 7),
    (13, 5, 3, 37),
    (5, 1, 9, 65),
    (37, 4, 13, 13),
    (3, 65, 2, 11),
    (9, 6, 65, 37),
]


def make_gru_inputs(T, B, I, H, dtype, device="cpu", bias=True, requires_grad=True, seed=0):
    """x [T,B,I] and h0 [B,H] standard normal; w_ih [3H,I], w_hh [3H,H], b_ih, b_hh [3H] (or
    None) with nn.GRU's initialisation U(-1/√H, 1/√H). Drawn in float64 on the CPU from `seed`,
    then moved: the same numbers on every device and dtype."""
    g = torch.Generator().manual_seed(seed)

    def leaf(t):
        return t.to(device, dtype).requires_grad_(requires_grad)

    def uniform(*shape):
        return leaf((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) / H**0.5)

    x = leaf(torch.randn(T, B, I, generator=g, dtype=torch.float64))
    h0 = leaf(torch.randn(B, H, generator=g, dtype=torch.float64))
    w_ih, w_hh = uniform(3 * H, I), uniform(3 * H, H)
    b_ih, b_hh = (uniform(3 * H), uniform(3 * H)) if bias else (None, None)
    return x, h0, w_ih, w_hh, b_ih, b_hh


def upstream(T, B, H, dtype, device, seed=1):
    """Random gradients for out [T,B,H] and h_n [B,H]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype) for s in ((T, B, H), (B, H))]


def fused(inputs, reverse, dout, dh_n):
    """out, h_n and the gradients of every input that requires one, from ops.gru_layer."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    out = ops.gru_layer(*inputs, reverse=reverse)
    h_n = out[0] if reverse else out[-1]
    grads = torch.autograd.grad((out * dout).sum() + (h_n * dh_n).sum(), leaves)
    return [out, h_n, *grads]


def torch_gru(inputs, reverse, dout, dh_n):
    """The same from a single-layer torch.nn.GRU holding the same weights; the reverse
    direction is nn.GRU on the flipped sequence, flipped back."""
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    gru = torch.nn.GRU(x.shape[2], h0.shape[1], bias=b_ih is not None, device=x.device, dtype=x.dtype)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}
    if b_ih is not None:
        weights.update(bias_ih_l0=b_ih, bias_hh_l0=b_hh)
    out, h_n = torch.func.functional_call(gru, weights, (x.flip(0) if reverse else x, h0.unsqueeze(0)))
    out, h_n = (out.flip(0) if reverse else out), h_n[0]
    grads = torch.autograd.grad((out * dout).sum() + (h_n * dh_n).sum(), leaves)
    return [out, h_n, *grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T,B,I,H", SHAPES)
def test_matches_torch_nn_gru_float64(device, reverse, bias, T, B, I, H):
    """out, h_n and the gradients of x, h0 and every parameter, under random upstream
    gradients on out and h_n, within 1e-10 of nn.GRU's relative to each tensor's scale."""
    inputs = make_gru_inputs(T, B, I, H, torch.float64, device, bias=bias)
    dout, dh_n = upstream(T, B, H, torch.float64, device)
    expected = torch_gru(inputs, reverse, dout, dh_n)
    for name, actual, e in zip(NAMES, fused(inputs, reverse, dout, dh_n), expected):
        assert e.abs().max() > 0, f"{name} is all zeros: comparing it would test nothing"
        assert_rel_close(actual, e, TOL[torch.float64], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T,B,I,H", [*SHAPES, (16, 64, 64, 64), (20, 8, 16, 256)])
def test_float32_within_4x_of_torch_nn_gru_own_error(device, reverse, T, B, I, H):
    """float32 against nn.GRU in float64. The float32 rounding of nn.GRU itself, measured on
    the same inputs, sets the scale: every tensor's error (relative to its scale) stays within
    4x of nn.GRU's largest. Seen: up to 2.5x (dh0 at 5,1,9,65, where both are ~1e-7 and sum
    K = 3H products in another order); a wrong index or a dropped term is O(1e-2)."""
    inputs64 = make_gru_inputs(T, B, I, H, torch.float64, device)
    inputs32 = make_gru_inputs(T, B, I, H, torch.float32, device)
    dout, dh_n = upstream(T, B, H, torch.float64, device)
    expected = torch_gru(inputs64, reverse, dout, dh_n)

    def errors(results):
        return [((r.double() - e).abs().max() / e.abs().max()).item() for r, e in zip(results, expected)]

    theirs = errors(torch_gru(inputs32, reverse, dout.float(), dh_n.float()))
    ours = errors(fused(inputs32, reverse, dout.float(), dh_n.float()))
    bound = 4 * max(theirs)
    for name, mine, torch_err in zip(NAMES, ours, theirs):
        assert mine <= bound, (
            f"{name}: relative error {mine:.2e} > 4 x nn.GRU's largest {bound / 4:.2e} ({torch_err:.2e} on it)"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, reverse, bias):
    inputs = [t for t in make_gru_inputs(4, 3, 3, 5, torch.float64, device, bias=bias) if t is not None]
    if bias:
        assert torch.autograd.gradcheck(lambda *a: ops.gru_layer(*a, reverse=reverse), inputs)
    else:
        assert torch.autograd.gradcheck(
            lambda x, h0, w_ih, w_hh: ops.gru_layer(x, h0, w_ih, w_hh, reverse=reverse), inputs
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(device, requires_grad):
    """torch.library.opcheck on both ops (schema, fake kernel, autograd registration): with and
    without bias, both directions, train on and off, and backward masks of every kind."""
    for bias, reverse in ((True, False), (False, True)):
        inputs = make_gru_inputs(3, 2, 4, 37, torch.float64, device, bias=bias, requires_grad=requires_grad)
        for train in (True, False):
            if train or not requires_grad:  # train=False with grad required has no backward to check
                torch.library.opcheck(torch.ops.rnnlm_ext.gru_forward.default, (*inputs, reverse, train))
    inputs = make_gru_inputs(3, 2, 4, 37, torch.float64, device, requires_grad=False)
    out, saved = torch.ops.rnnlm_ext.gru_forward(*inputs, False, True)
    x, h0, w_ih, w_hh, _, _ = inputs
    for mask in ([True] * 6, [False, True, False, True, True, False], [False] * 6):
        args = (torch.randn_like(out), x, h0, w_ih, w_hh, out, saved, False, mask)
        torch.library.opcheck(torch.ops.rnnlm_ext.gru_backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    args = [t for t in make_gru_inputs(6, 3, 4, 45, torch.float32, device) if t is not None]

    def f(x, h0, w_ih, w_hh, b_ih, b_hh):
        out = ops.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, reverse=True)
        return (out * out).sum()

    torch.compiler.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_loss, compiled_loss = f(*args), compiled(*args)
    assert_rel_close(compiled_loss, eager_loss, 1e-6, "loss")
    for name, g, e in zip(NAMES[2:], torch.autograd.grad(compiled_loss, args), torch.autograd.grad(eager_loss, args)):
        assert_rel_close(g, e, 1e-6, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_keeps_nothing_and_gives_the_same_out(device, dtype, monkeypatch):
    """Under no_grad, or with no input requiring grad, gru_layer asks the op for inference
    (train=False): the op then returns an empty saved tensor, and out equals training's bit
    for bit (the same arithmetic, only nothing kept)."""
    inputs = make_gru_inputs(7, 3, 5, 37, dtype, device)
    out_train, saved = torch.ops.rnnlm_ext.gru_forward(*inputs, True, True)
    out_infer, nothing = torch.ops.rnnlm_ext.gru_forward(*inputs, True, False)
    assert saved.shape == (7, 3, 4 * 37) and nothing.shape == (0,)
    assert torch.equal(out_infer, out_train)

    trains = []
    real = torch.ops.rnnlm_ext.gru_forward

    def spy(*args):
        trains.append(args[7])
        return real(*args)

    monkeypatch.setattr(torch.ops.rnnlm_ext, "gru_forward", spy)
    with torch.no_grad():
        assert torch.equal(ops.gru_layer(*inputs, reverse=True), out_train)
    frozen = [t.detach() if t is not None else None for t in inputs]
    assert torch.equal(ops.gru_layer(*frozen, reverse=True), out_train)
    ops.gru_layer(*inputs, reverse=True)
    assert trains == [False, False, True]


@pytest.mark.parametrize("device", DEVICES)
def test_backward_honours_needs_input_grad(device, monkeypatch):
    """No dx or dh0 when x and h0 need none: the backward op is told so, and the gradients it is
    not asked for come back empty."""
    masks = []
    real = torch.ops.rnnlm_ext.gru_backward

    def spy(*args):
        masks.append(list(args[8]))
        return real(*args)

    monkeypatch.setattr(torch.ops.rnnlm_ext, "gru_backward", spy)
    inputs = make_gru_inputs(5, 3, 4, 6, torch.float64, device)
    inputs[0].requires_grad_(False)
    inputs[1].requires_grad_(False)
    dout, dh_n = upstream(5, 3, 6, torch.float64, device)
    expected = torch_gru(inputs, False, dout, dh_n)
    actual = fused(inputs, False, dout, dh_n)
    assert masks == [[False, False, True, True, True, True]]
    for name, a, e in zip(["dw_ih", "dw_hh", "db_ih", "db_hh"], actual[2:], expected[2:]):
        assert_rel_close(a, e, TOL[torch.float64], name)
    x, h0, w_ih, w_hh, _, _ = (t.detach() for t in inputs)
    out, saved = torch.ops.rnnlm_ext.gru_forward(*inputs, False, True)
    grads = real(dout, x, h0, w_ih, w_hh, out.detach(), saved, False, [False, True, False, False, True, False])
    assert [g.shape for i, g in enumerate(grads) if i not in (1, 4)] == [(0,)] * 4, "a masked-off gradient is not empty"


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_refused_not_silently_zero(device):
    inputs = make_gru_inputs(4, 2, 3, 5, torch.float64, device)
    out = ops.gru_layer(*inputs)
    with pytest.raises(RuntimeError, match="backward is not differentiable"):
        torch.autograd.grad(out.pow(2).sum(), inputs[3], create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_an_inference_call_is_refused(device):
    """train=False keeps nothing: asking for its gradient must fail and say why."""
    inputs = make_gru_inputs(4, 2, 3, 5, torch.float64, device)
    out, _ = torch.ops.rnnlm_ext.gru_forward(*inputs, False, False)
    with pytest.raises(RuntimeError, match="train=False and kept nothing"):
        out.sum().backward()


def _other_device(t):
    return torch.zeros_like(t, device="meta" if t.device.type == "cpu" else "cpu")


# the op's own checks on the CPU (and CUDA) kernels, and on meta: the fake kernel torch.compile traces
CHECKED_DEVICES = ["cpu", "meta", pytest.param("cuda", marks=needs_cuda)]

BAD_FORWARD_ARGUMENTS = [
    (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
    (lambda a: {**a, "x": a["x"].long()}, "x must be a floating-point tensor, got"),
    (lambda a: {**a, "w_hh": a["w_hh"][0]}, r"w_hh must be 2-D \[3H,H\]"),
    (lambda a: {**a, "w_hh": a["w_hh"][:5]}, "w_hh must have shape"),
    (lambda a: {**a, "w_ih": a["w_ih"][:, :2]}, "w_ih must have shape"),
    (lambda a: {**a, "h0": a["h0"][:1]}, "h0 must have shape"),
    (lambda a: {**a, "b_ih": a["b_ih"][:2]}, "b_ih must have shape"),
    (lambda a: {**a, "b_hh": a["b_hh"][:2]}, "b_hh must have shape"),
    (lambda a: {**a, "b_hh": None}, "b_ih and b_hh must be both given or both None"),
    (lambda a: {**a, "w_ih": a["w_ih"].double()}, "w_ih has dtype"),
    (lambda a: {**a, "b_ih": a["b_ih"].double()}, "b_ih has dtype"),
    (lambda a: {**a, "h0": _other_device(a["h0"])}, "h0 is on .* but x is on"),
    (lambda a: {**a, "b_hh": _other_device(a["b_hh"])}, "b_hh is on .* but x is on"),
    (lambda a: {**a, "x": a["x"][:0]}, "must all be >= 1"),
]


@pytest.mark.parametrize("change,message", BAD_FORWARD_ARGUMENTS)
@pytest.mark.parametrize("device", CHECKED_DEVICES)
def test_forward_rejects_bad_arguments(change, message, device):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_gru_inputs(3, 2, 4, 5, torch.float32, device, requires_grad=False)
    args = change(dict(x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, reverse=False, train=True))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.gru_forward(*args.values())


BAD_BACKWARD_ARGUMENTS = [
    (lambda a: {**a, "dout": a["dout"][:2]}, "dout must have shape"),
    (lambda a: {**a, "out": a["out"][:, :1]}, "out must have shape"),
    (lambda a: {**a, "saved": a["saved"][..., :5]}, "saved must have shape"),
    (lambda a: {**a, "saved": a["saved"][:0]}, "saved must have shape"),
    (lambda a: {**a, "dout": a["dout"].double()}, "dout has dtype"),
    (lambda a: {**a, "saved": a["saved"].double()}, "saved has dtype"),
    (lambda a: {**a, "out": _other_device(a["out"])}, "out is on .* but x is on"),
    (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
    (lambda a: {**a, "w_hh": a["w_hh"][:5]}, "w_hh must have shape"),
    (lambda a: {**a, "h0": a["h0"][:1]}, "h0 must have shape"),
    (lambda a: {**a, "output_mask": [True] * 5}, "output_mask must have 6 entries"),
    (lambda a: {**a, "output_mask": [True] * 7}, "output_mask must have 6 entries"),
]


@pytest.mark.parametrize("change,message", BAD_BACKWARD_ARGUMENTS)
@pytest.mark.parametrize("device", CHECKED_DEVICES)
def test_backward_rejects_bad_arguments(change, message, device):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_gru_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)
    out, saved = torch.ops.rnnlm_ext.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False, True)
    args = dict(dout=torch.ones_like(out), x=x, h0=h0, w_ih=w_ih, w_hh=w_hh, out=out, saved=saved)
    args = {k: v.to(device) for k, v in args.items()}
    args = change({**args, "reverse": False, "output_mask": [True] * 6})
    with pytest.raises(RuntimeError, match=message):
        torch.ops.rnnlm_ext.gru_backward(*args.values())


def test_cpu_kernel_rejects_half():
    inputs = [t.half() for t in make_gru_inputs(3, 2, 4, 5, torch.float32, requires_grad=False)]
    with pytest.raises(RuntimeError, match="the CPU kernel takes float32 or float64"):
        torch.ops.rnnlm_ext.gru_forward(*inputs, False, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,B,I,H", [(30, 5, 7, 33), (5, 64, 7, 33), (4, 3, 7, 1100)])
def test_one_and_two_threads_agree_bit_for_bit(dtype, T, B, I, H, num_threads):
    """The thread scheme (cpu_threads.h) depends on the thread count and the shape: one thread
    alone; at two, a helper thread beside the loop (H = 33: chunks of 12 steps at B = 5, of
    one step at B = 64) or the hidden units split between the threads (H = 1100: 560 + 540).
    Results must not depend on it, outputs and every gradient, both directions."""
    for reverse in (False, True):
        inputs = make_gru_inputs(T, B, I, H, dtype)
        dout, dh_n = upstream(T, B, H, dtype, "cpu")
        results = []
        for threads in (1, 2):
            num_threads(threads)
            results.append(fused(inputs, reverse, dout, dh_n))
        for name, one, two in zip(NAMES, *results):
            assert torch.equal(one, two), f"reverse={reverse} {name}: max diff {(one - two).abs().max().item():.2e}"


@pytest.mark.parametrize("T,B,I,H", [(4, 3, 7, 1100), (30, 5, 7, 33)])
def test_split_and_helper_schedules_match_torch_nn_gru(T, B, I, H, num_threads):
    """Two threads: H = 1100 splits the hidden units (each thread its slice of all three gate
    blocks), H = 33 runs the helper thread; float64 parity with nn.GRU on both."""
    num_threads(2)
    for reverse in (False, True):
        inputs = make_gru_inputs(T, B, I, H, torch.float64)
        dout, dh_n = upstream(T, B, H, torch.float64, "cpu")
        for name, a, e in zip(NAMES, fused(inputs, reverse, dout, dh_n), torch_gru(inputs, reverse, dout, dh_n)):
            assert_rel_close(a, e, TOL[torch.float64], f"reverse={reverse} {name}")


def check_float32_sigmoid():
    """The kernel's vectorised float32 sigmoid, read from the op's saved r and z (T = 1, I = 1,
    w_ih = 1, w_hh = 0, no bias: r = z = σ(x)), within 3 ulp of float64 sigmoid wherever σ is
    a normal float, absolutely within 2e-38 below that; NaN stays NaN, σ(±inf) is 1 / ~0.
    Self-contained: a subprocess runs its source on the other CPU paths."""
    import torch

    x = torch.cat([torch.linspace(-100, 100, 400_001), torch.logspace(-30, 2, 10_001), -torch.logspace(-30, 2, 10_001)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")])])
    B = x.numel()
    _, saved = torch.ops.rnnlm_ext.gru_forward(
        x.view(1, B, 1), torch.zeros(B, 1), torch.ones(3, 1), torch.zeros(3, 1), None, None, False, True
    )
    r, z = saved[0, :, 0], saved[0, :, 1]
    assert torch.equal(r.nan_to_num(-1), z.nan_to_num(-1))
    expected = torch.sigmoid(x.double())
    normal = ~x.isnan() & (expected >= torch.finfo(torch.float32).tiny)
    y = expected[normal].float()
    ulp = (torch.nextafter(y, torch.full_like(y, float("inf"))) - y).double()
    err = ((r[normal].double() - expected[normal]).abs() / ulp).max().item()
    assert err <= 3, f"float32 sigmoid is {err:.2f} ulp off"
    tiny = ~x.isnan() & ~normal
    assert (r[tiny].double() - expected[tiny]).abs().max() <= 2e-38
    assert r[x.isnan()].isnan().all(), "a NaN pre-activation must stay NaN"
    assert r[-2] == 1.0 and r[-1] <= 2e-38


def test_float32_sigmoid_within_3_ulp_and_nan_kept():
    check_float32_sigmoid()


@pytest.mark.slow
@pytest.mark.parametrize("capability,path", [("avx2", "avx2"), ("default", "scalar")])
def test_other_cpu_paths(capability, path):
    """The float32 sigmoid has AVX-512, AVX2 and scalar paths, chosen by ATen's CPU capability:
    its accuracy on each lower one, in a subprocess."""
    code = (
        "import torch, rnnlm_ext.ops as ops\n"
        f"assert ops.build_info()['cpu_activation'].startswith({path!r}), ops.build_info()\n"
        + inspect.getsource(check_float32_sigmoid)
        + "check_float32_sigmoid()\nprint('ok')\n"
    )
    assert run_python(code, ATEN_CPU_CAPABILITY=capability).strip() == "ok"
