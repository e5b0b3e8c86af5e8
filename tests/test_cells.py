"""rnnlm_ext.LSTM and GRU as drop-ins for torch.nn.LSTM and GRU (outputs, every gradient,
state_dict, API, errors), and weight_drop on all three layers."""

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, TOL, assert_rel_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rnnlm_ext import GRU, LSTM, RNN

CELLS = {"lstm": (LSTM, nn.LSTM), "gru": (GRU, nn.GRU)}
ALL_CELLS = {**CELLS, "rnn": (RNN, nn.RNN)}
IMPLS = ["fused", "reference"]


def make_pair(cell, I, H, device="cpu", dtype=torch.float64, impl="fused", cells=CELLS, **kwargs):
    """Ours and torch.nn's module of `cell`, holding the same weights."""
    ours_cls, their_cls = cells[cell]
    ours = ours_cls(I, H, device=device, dtype=dtype, impl=impl, **kwargs)
    theirs = their_cls(I, H, device=device, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_hx(module, B, device, dtype, gen=None):
    """A random initial state for `module`: h_0, or (h_0, c_0) for an LSTM; B=None: unbatched."""
    shape = (module.num_layers * module.num_directions, *(() if B is None else (B,)), module.hidden_size)
    states = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(2)]
    return tuple(states) if isinstance(module, (LSTM, nn.LSTM)) else states[0]


def run(module, x, hx):
    """Every output (output, h_n, c_n) and the gradient of x, each initial state and every
    parameter, under random upstream gradients on every output (a fixed seed: both modules
    get the same)."""
    x = x.detach().requires_grad_()
    states = [] if hx is None else [h.detach().requires_grad_() for h in (hx if isinstance(hx, tuple) else (hx,))]
    given = None if hx is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    out, final = module(x, given)
    outputs = {"output": out, **dict(zip(["h_n", "c_n"], final if isinstance(final, tuple) else (final,)))}
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)).sum() for t in outputs.values())
    leaves = [x, *states, *module.parameters()]
    names = ["dx", *["dh0", "dc0"][: len(states)], *("d" + n for n, _ in module.named_parameters())]
    return {**outputs, **dict(zip(names, torch.autograd.grad(loss, leaves)))}


def compare(a, b, tol):
    assert a.keys() == b.keys()
    for name in b:
        assert_rel_close(a[name], b[name], tol, name)


CONFIGS = [  # T, B, I, H, kwargs
    (1, 1, 1, 1, {}),
    (5, 1, 4, 3, {"bias": False}),
    (7, 3, 5, 3, {"num_layers": 2}),
    (6, 4, 6, 10, {"num_layers": 3, "bidirectional": True}),
    (4, 2, 3, 7, {"bidirectional": True, "bias": False}),
    (6, 5, 8, 4, {"batch_first": True, "num_layers": 2}),
    (3, 2, 5, 33, {"batch_first": True, "bidirectional": True}),
    (8, 3, 7, 6, {"num_layers": 2, "dropout": 0.3}),  # eval mode: dropout off
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("T,B,I,H,kwargs", CONFIGS)
def test_matches_torch_nn(device, cell, impl, dtype, with_hx, T, B, I, H, kwargs):
    """Every output and every gradient equal torch.nn's (TOL: see helpers), fused and reference."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, I, H, device, dtype, impl, **kwargs)
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(2)
    shape = (B, T, I) if kwargs.get("batch_first") else (T, B, I)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    hx = make_hx(ours, B, device, dtype, g) if with_hx else None
    compare(run(ours, x, hx), run(theirs, x, hx), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [True, False])
def test_zero_batch_gives_empty_outputs_as_torch_nn_does(device, cell, batch_first, with_hx):
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 4, 6, device, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn((0, 5, 4) if batch_first else (5, 0, 4), dtype=torch.float64, device=device)
    hx = make_hx(ours, 0, device, torch.float64) if with_hx else None
    compare(run(ours, x, hx), run(theirs, x, hx), TOL[torch.float64])
    assert ours(x, hx)[0].shape == x.shape[:2] + (12,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_hx", [True, False])
def test_unbatched_input(device, cell, with_hx):
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 3, 5, device, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    hx = make_hx(ours, None, device, torch.float64) if with_hx else None
    compare(run(ours, x, hx), run(theirs, x, hx), TOL[torch.float64])
    assert ours(x, hx)[0].shape == (6, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_through_the_module(device, cell):
    torch.manual_seed(0)
    m = CELLS[cell][0](3, 4, num_layers=2, bidirectional=True, device=device, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    if cell == "lstm":
        c0 = torch.randn(4, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, h0, c0: (lambda out, s: (out, *s))(*m(x, (h0, c0))), (x, h0, c0))
    else:
        assert torch.autograd.gradcheck(lambda x, h0: m(x, h0), (x, h0))


@pytest.mark.parametrize("cell", CELLS)
def test_same_constructor_parameters_and_initialisation(cell):
    ours_cls, their_cls = CELLS[cell]
    kwargs = dict(num_layers=2, bias=True, batch_first=True, dropout=0.1, bidirectional=True)
    torch.manual_seed(3)
    ours = ours_cls(7, 11, **kwargs)
    torch.manual_seed(3)
    theirs = their_cls(7, 11, **kwargs)
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert list(ours_params) == list(their_params)
    for name, p in their_params.items():
        assert torch.equal(ours_params[name], p), name
    assert [[p.shape for p in layer] for layer in ours.all_weights] == [
        [p.shape for p in layer] for layer in theirs.all_weights
    ]
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert repr(ours).replace("rnnlm_ext.", "") == repr(theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_moves_both_ways(device, cell):
    """torch.nn's weights loaded into ours, then new weights of ours loaded into torch.nn's:
    each time the same outputs, final states and gradients."""
    ours_cls, their_cls = CELLS[cell]
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, device=device, dtype=torch.float64)
    theirs, ours = their_cls(4, 6, **kwargs), ours_cls(4, 6, **kwargs)
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    hx = make_hx(ours, 3, device, torch.float64)
    ours.load_state_dict(theirs.state_dict())
    compare(run(ours, x, hx), run(theirs, x, hx), TOL[torch.float64])
    ours.reset_parameters()
    theirs.load_state_dict(ours.state_dict())
    compare(run(ours, x, hx), run(theirs, x, hx), TOL[torch.float64])


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_in_train_mode_draws_what_torch_nn_draws(cell):
    """Dropout acts on every layer's output but the last, as in torch.nn: the same seed gives
    the same masks and results; another seed other masks; eval mode drops nothing."""
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 8, 32, num_layers=3, dropout=0.5, bidirectional=True)
    x = torch.randn(10, 4, 8, dtype=torch.float64)
    torch.manual_seed(42)
    a = run(ours, x, None)
    torch.manual_seed(42)
    compare(a, run(theirs, x, None), TOL[torch.float64])
    torch.manual_seed(43)
    assert (run(ours, x, None)["output"] - a["output"]).abs().max() > 1e-3, "masks do not change with the seed"
    ours.eval(), theirs.eval()
    evaluated = ours(x)[0]
    assert_rel_close(evaluated, theirs(x)[0], TOL[torch.float64], "eval-mode output")
    assert (evaluated - a["output"]).abs().max() > 1e-3, "eval mode still drops units"


# ----------------------------------------------------------------------------------------
# weight_drop


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ALL_CELLS)
@pytest.mark.parametrize("impl", IMPLS)
def test_weight_drop_gives_the_ops_masked_hidden_weights(device, cell, impl):
    """In training, every weight_hh is multiplied by a fresh DropConnect mask (F.dropout, drawn
    layer by layer, direction by direction): torch.nn holding the masked weights gives the
    same outputs and input gradients, and each weight_hh's gradient is torch.nn's through the mask."""
    p = 0.4
    torch.manual_seed(0)
    ours, theirs = make_pair(cell, 5, 7, device, impl=impl, cells=ALL_CELLS, num_layers=2, bidirectional=True)
    ours.weight_drop = p
    x = torch.randn(6, 3, 5, dtype=torch.float64, device=device)
    hx = make_hx(ours, 3, device, torch.float64)
    torch.manual_seed(7)
    a = run(ours, x, hx)
    torch.manual_seed(7)
    hh = [name for name, _ in ours.named_parameters() if name.startswith("weight_hh")]
    with torch.no_grad():
        for name in hh:  # the same draws, in the order the layers run
            getattr(theirs, name).copy_(F.dropout(getattr(ours, name), p, training=True))
    b = run(theirs, x, hx)
    for name in hh:
        kept = (getattr(theirs, name) != 0).to(torch.float64) / (1 - p)  # d masked / d weight
        b["d" + name] = b["d" + name] * kept
    compare(a, b, TOL[torch.float64])


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_weight_drop_is_reproducible_under_a_seed_and_off_in_eval(cell):
    torch.manual_seed(0)
    cls = ALL_CELLS[cell][0]
    plain = cls(4, 9, num_layers=2, dtype=torch.float64)
    dropped = cls(4, 9, num_layers=2, dtype=torch.float64, weight_drop=0.5)
    dropped.load_state_dict(plain.state_dict())
    assert dropped.state_dict().keys() == plain.state_dict().keys(), "weight_drop adds no parameter"
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    torch.manual_seed(11)
    first = run(dropped, x, None)
    torch.manual_seed(11)
    compare(run(dropped, x, None), first, 0.0)  # bitwise: the same masks
    torch.manual_seed(12)
    assert (run(dropped, x, None)["output"] - first["output"]).abs().max() > 1e-3, "a new seed, new masks"
    assert (plain(x)[0] - first["output"]).abs().max() > 1e-3, "training mode drops weights"
    dropped.eval(), plain.eval()
    compare(run(dropped, x, None), run(plain, x, None), 0.0)  # eval: no mask at all
    assert "weight_drop=0.5" in repr(dropped)


@pytest.mark.parametrize("cell", ALL_CELLS)
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, "0.2", True])
def test_weight_drop_outside_zero_to_one_is_refused(cell, value):
    with pytest.raises(ValueError, match=r"weight_drop must be a number in \[0, 1\)"):
        ALL_CELLS[cell][0](4, 6, weight_drop=value)


# ----------------------------------------------------------------------------------------
# random shapes


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    cell=st.sampled_from(sorted(CELLS)),
    T=st.integers(1, 12),
    B=st.integers(1, 9),
    I=st.integers(1, 17),
    H=st.integers(1, 40),
    num_layers=st.integers(1, 3),
    bias=st.booleans(),
    batch_first=st.booleans(),
    bidirectional=st.booleans(),
    with_hx=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_torch_nn(cell, T, B, I, H, num_layers, bias, batch_first, bidirectional, with_hx, seed):
    torch.manual_seed(seed)
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    ours, theirs = make_pair(cell, I, H, **kwargs)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g, dtype=torch.float64)
    hx = make_hx(ours, B, "cpu", torch.float64, g) if with_hx else None
    compare(run(ours, x, hx), run(theirs, x, hx), TOL[torch.float64])


# ----------------------------------------------------------------------------------------
# bad input


def _state(module, shape, **kwargs):
    """hx of `shape` for `module`'s kind: a tensor, or (h_0, c_0) for an LSTM."""
    t = torch.randn(shape, **kwargs)
    return (t, t.clone()) if isinstance(module, (LSTM, nn.LSTM)) else t


def _replaced(cell, batch_first=False, **weights):
    """A builder of (ours or torch.nn's) `cell`(4, 6, num_layers=2) with `weights` (name:
    shape, or a tensor) replaced by new parameters, as a user could set them."""

    def make(which):
        m = CELLS[cell][which](4, 6, num_layers=2, batch_first=batch_first)
        for name, value in weights.items():
            setattr(m, name, nn.Parameter(value if isinstance(value, torch.Tensor) else torch.randn(value)))
        return m

    return make


X = torch.randn(5, 2, 4)  # [T,B,I]
# (call, what the message must say, module arguments); ours must raise torch.nn's type
BAD_INPUTS = {
    "4-D input": (lambda m: m(torch.randn(2, 3, 4, 5)), "input must be 3-D", {}),
    "input_size": (lambda m: m(torch.randn(5, 2, 7)), r"input_size=4, got shape \(5, 2, 7\)", {}),
    "hx shape": (lambda m: m(X, _state(m, (1, 3, 6))), r"must have shape \(2, 2, 6\)", {}),
    "hx 2-D for 3-D input": (lambda m: m(X, _state(m, (2, 6))), r"must have shape \(2, 2, 6\)", {}),
    "hx 3-D for 2-D input": (lambda m: m(X[:, 0], _state(m, (2, 1, 6))), r"must have shape \(2, 6\)", {}),
    "hx dtype": (lambda m: m(X, _state(m, (2, 2, 6), dtype=torch.float64)), "has dtype torch.float64", {}),
    "input dtype": (lambda m: m(X.double()), "input has dtype torch.float64", {}),
    "integer input": (lambda m: m(X.long()), "input must be a floating-point tensor", {}),
    "T=0": (lambda m: m(X[:0]), "input has no time steps", {}),
    "batch_first hx": (
        lambda m: m(X.transpose(0, 1), _state(m, (2, 5, 6))),
        r"must have shape \(2, 2, 6\).*got \(2, 5, 6\)",
        {"batch_first": True},
    ),
}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_what_torch_nn_raises_and_names_the_argument(cell, case):
    call, message, module = BAD_INPUTS[case]
    make = _replaced(cell, **module)
    torch.manual_seed(0)
    with pytest.raises(Exception) as theirs:
        call(make(1))
    with pytest.raises(Exception, match=message) as ours:
        call(make(0))
    assert type(ours.value) is type(theirs.value), f"{ours.value!r}: torch.nn raises {theirs.value!r}"


# replaced parameters of the wrong shape: nn.GRU raises a RuntimeError; nn.LSTM on the CPU
# (its oneDNN path) runs on without a word, so ours raises nn.GRU's and nn.RNN's type
BAD_WEIGHTS = {
    "weight_hh_l1": (
        lambda m: m(X),
        r"weight_hh_l1 must have shape \((24|18), 6\), got \(6, 6\)",
        {"weight_hh_l1": (6, 6)},
    ),
    "bias_ih_l0": (lambda m: m(X), r"bias_ih_l0 must have shape \((24|18),\), got \(5,\)", {"bias_ih_l0": (5,)}),
}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", BAD_WEIGHTS)
def test_a_replaced_parameter_of_the_wrong_shape_is_named(cell, case):
    call, message, module = BAD_WEIGHTS[case]
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=message):
        call(_replaced(cell, **module)(0))


def test_lstm_names_the_state_that_is_wrong():
    m = LSTM(4, 6, num_layers=2)
    h = torch.randn(2, 2, 6)
    with pytest.raises(RuntimeError, match=r"hx\[1\] \(c_0\) must have shape \(2, 2, 6\).*got \(2, 3, 6\)"):
        m(X, (h, torch.randn(2, 3, 6)))
    with pytest.raises(RuntimeError, match=r"hx\[0\] \(h_0\) has dtype torch.float64"):
        m(X, (h.double(), h))
    for hx, got in ((h, "Tensor"), ((h,), "tuple of 1"), ([h, h, h], "list of 3"), ((h, None), "tuple of 2")):
        with pytest.raises(TypeError, match=rf"hx must be a tuple \(h_0, c_0\) of two Tensors, or None, got {got}"):
            m(X, hx)


@pytest.mark.parametrize("cell", CELLS)
def test_not_a_tensor_and_packed_input_are_type_errors(cell):
    m = CELLS[cell][0](4, 6)
    with pytest.raises(TypeError, match="input must be a Tensor, got str"):
        m("not a tensor")
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 4), [5, 3])
    name = type(m).__name__
    with pytest.raises(TypeError, match=rf"rnnlm_ext.{name} does not take a PackedSequence.*torch.nn.{name}"):
        m(packed)


@pytest.mark.parametrize(
    "cell,kwargs,message",
    [
        ("lstm", {"proj_size": 3}, r"proj_size=3: rnnlm_ext.LSTM has no projection.*use torch.nn.LSTM"),
        ("gru", {"hidden_size": 0}, "hidden_size must be a positive integer"),
        ("lstm", {"num_layers": 0}, "num_layers must be a positive integer"),
        ("gru", {"dropout": 1.5}, r"dropout must be a number in \[0, 1\]"),
        ("lstm", {"impl": "cudnn"}, "impl must be one of 'fused', 'reference'"),
    ],
)
def test_bad_constructor_arguments(cell, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CELLS[cell][0](**{"input_size": 4, "hidden_size": 6, **kwargs})


# ----------------------------------------------------------------------------------------
# saving


@pytest.mark.parametrize("cell", CELLS)
def test_whole_module_saves_and_loads_under_weights_only(cell):
    """torch.save(model) and torch.load with its default weights_only=True: the classes are
    allowlisted, and the loaded module gives the same outputs."""
    torch.manual_seed(0)
    m = CELLS[cell][0](4, 6, num_layers=2, bidirectional=True, weight_drop=0.25).eval()
    x = torch.randn(5, 2, 4)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert type(loaded) is type(m) and loaded.weight_drop == 0.25 and not loaded.training
    expected, actual = m(x), loaded(x)
    assert torch.equal(actual[0], expected[0])
    for a, e in zip(actual[1] if cell == "lstm" else [actual[1]], expected[1] if cell == "lstm" else [expected[1]]):
        assert torch.equal(a, e)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_compile_fullgraph_equals_eager(cell):
    torch.manual_seed(0)
    m = CELLS[cell][0](5, 8, num_layers=2, bidirectional=True)
    x = torch.randn(7, 3, 5)

    def loss(x):
        out, final = m(x)
        h_n = final[0] if cell == "lstm" else final
        return out.square().mean() + h_n.abs().mean()

    compiled = torch.compile(loss, fullgraph=True)
    eager, comp = loss(x), compiled(x)
    assert_rel_close(comp, eager, 1e-6, "loss")  # float32: the compiled graph may fuse and reorder sums
    params = list(m.parameters())
    for g, e in zip(torch.autograd.grad(comp, params), torch.autograd.grad(eager, params)):
        assert_rel_close(g, e, 1e-5, "grad")


@pytest.mark.parametrize("cell", CELLS)
def test_bitwise_identical_at_one_and_two_threads(cell, num_threads):
    """The module adds no thread-dependent step to its ops' thread-count independence: every
    output and gradient at 2 threads equals, bit for bit, its value at 1 (H = 130 splits the
    time loop's columns between the threads)."""
    torch.manual_seed(0)
    m = CELLS[cell][0](9, 130, num_layers=2, bidirectional=True, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, 9, generator=g)
    hx = make_hx(m, 6, "cpu", torch.float32, g)
    num_threads(1)
    one = run(m, x, hx)
    num_threads(2)
    compare(run(m, x, hx), one, 0.0)
