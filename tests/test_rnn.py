"""rnnlm_ext.RNN as a drop-in for torch.nn.RNN: outputs, gradients, state_dict, API, errors."""

import random
import time

import pytest
import torch
from helpers import DEVICES, TOL, assert_rel_close, run_python
from torch import nn

from rnnlm_ext import RNN, ops


def make_pair(I, H, device="cpu", dtype=torch.float64, **kwargs):
    """An rnnlm_ext.RNN and a torch.nn.RNN holding the same weights."""
    ours = RNN(I, H, device=device, dtype=dtype, **kwargs)
    theirs = nn.RNN(I, H, device=device, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run(module, x, h0, upstream=("output", "h_n")):
    """Output, h_n and the gradients of x, h0 and every parameter under random upstream
    gradients on the outputs named in `upstream` (drawn from a fixed seed, so both modules
    get the same)."""
    x = x.detach().requires_grad_()
    h0 = None if h0 is None else h0.detach().requires_grad_()
    out, h_n = module(x, h0)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)  # one draw for all dtypes
    dh_n = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    loss = sum((t * d).sum() for name, t, d in (("output", out, dout), ("h_n", h_n, dh_n)) if name in upstream)
    leaves = [x] + ([h0] if h0 is not None else []) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves)
    names = ["dx"] + (["dh0"] if h0 is not None else []) + ["d" + n for n, _ in module.named_parameters()]
    return {"output": out, "h_n": h_n, **dict(zip(names, grads))}


def compare(ours, theirs, x, h0, tol):
    a, b = run(ours, x, h0), run(theirs, x, h0)
    assert a.keys() == b.keys()
    for name in a:
        assert_rel_close(a[name], b[name], tol, name)


CONFIGS = [
    # (T, B, I, H, kwargs)
    (1, 1, 1, 1, {}),
    (5, 1, 4, 3, {"nonlinearity": "relu"}),
    (7, 3, 5, 3, {"num_layers": 2}),
    (9, 4, 6, 10, {"num_layers": 3, "nonlinearity": "relu", "bidirectional": True}),
    (4, 2, 3, 7, {"bidirectional": True, "bias": False}),
    (6, 5, 8, 4, {"batch_first": True, "num_layers": 2}),
    (3, 2, 5, 65, {"batch_first": True, "bidirectional": True, "nonlinearity": "relu", "bias": False}),
    (12, 8, 16, 16, {"num_layers": 2, "dropout": 0.3}),  # eval mode: dropout off
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("T,B,I,H,kwargs", CONFIGS)
def test_matches_torch_nn_rnn(device, dtype, with_h0, T, B, I, H, kwargs):
    torch.manual_seed(0)
    ours, theirs = make_pair(I, H, device, dtype, **kwargs)
    ours.eval(), theirs.eval()
    shape = (B, T, I) if kwargs.get("batch_first") else (T, B, I)
    x = torch.randn(shape, dtype=dtype, device=device)
    h0 = torch.randn(ours.num_layers * ours.num_directions, B, H, dtype=dtype, device=device) if with_h0 else None
    compare(ours, theirs, x, h0, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("T,B,I,H,kwargs", CONFIGS)
def test_matches_reference(device, dtype, with_h0, T, B, I, H, kwargs):
    """The same module, once through the fused op and once through the reference loop."""
    torch.manual_seed(0)
    fused = RNN(I, H, device=device, dtype=dtype, **kwargs).eval()
    shape = (B, T, I) if kwargs.get("batch_first") else (T, B, I)
    x = torch.randn(shape, dtype=dtype, device=device)
    h0 = torch.randn(fused.num_layers * fused.num_directions, B, H, dtype=dtype, device=device) if with_h0 else None
    expected = run(fused, x, h0)
    fused.impl = "reference"
    actual = run(fused, x, h0)
    for name in expected:
        assert_rel_close(actual[name], expected[name], TOL[dtype], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 3, "bidirectional": True, "nonlinearity": "relu"}])
def test_zero_batch_gives_empty_outputs_as_nn_rnn_does(device, batch_first, with_h0, kwargs):
    """A batch of zero sequences: output [T,0,D·H] ([0,T,D·H] with batch_first), h_n
    [L·D,0,H], empty gradients of x and h0 and zero gradients of the weights, as nn.RNN."""
    torch.manual_seed(0)
    ours, theirs = make_pair(4, 6, device, batch_first=batch_first, **kwargs)
    x = torch.randn((0, 5, 4) if batch_first else (5, 0, 4), dtype=torch.float64, device=device)
    h0 = (
        torch.randn(ours.num_layers * ours.num_directions, 0, 6, dtype=torch.float64, device=device)
        if with_h0
        else None
    )
    compare(ours, theirs, x, h0, TOL[torch.float64])
    out, h_n = ours(x, h0)
    assert out.shape == x.shape[:2] + (6 * ours.num_directions,)
    assert h_n.shape == (ours.num_layers * ours.num_directions, 0, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_input(device):
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 5, device, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, dtype=torch.float64, device=device)
    h0 = torch.randn(4, 5, dtype=torch.float64, device=device)
    compare(ours, theirs, x, h0, TOL[torch.float64])
    out, h_n = ours(x)
    assert out.shape == (6, 10) and h_n.shape == (4, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_through_the_module(device):
    torch.manual_seed(0)
    m = RNN(3, 4, num_layers=2, bidirectional=True, device=device, dtype=torch.float64)
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h0: m(x, h0), (x, h0))


def test_same_constructor_parameters_and_initialisation():
    kwargs = dict(num_layers=2, nonlinearity="relu", bias=True, batch_first=True, dropout=0.1, bidirectional=True)
    torch.manual_seed(3)
    ours = RNN(7, 11, **kwargs)
    torch.manual_seed(3)
    theirs = nn.RNN(7, 11, **kwargs)
    ours_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert list(ours_params) == list(their_params)
    for name, p in their_params.items():
        assert torch.equal(ours_params[name], p), name
    assert [[p.shape for p in layer] for layer in ours.all_weights] == [
        [p.shape for p in layer] for layer in theirs.all_weights
    ]
    for attr in (
        "input_size",
        "hidden_size",
        "num_layers",
        "nonlinearity",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
    ):
        assert getattr(ours, attr) == getattr(theirs, attr), attr


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_moves_both_ways(device):
    """nn.RNN's weights loaded into rnnlm_ext.RNN, then new weights of ours loaded into nn.RNN:
    each time the same outputs, h_n and gradients."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    h0 = torch.randn(4, 3, 6, dtype=torch.float64, device=device)
    kwargs = dict(num_layers=2, bidirectional=True, device=device, dtype=torch.float64)
    theirs = nn.RNN(4, 6, **kwargs)
    ours = RNN(4, 6, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    compare(ours, theirs, x, h0, TOL[torch.float64])
    ours.reset_parameters()
    theirs.load_state_dict(ours.state_dict())
    compare(ours, theirs, x, h0, TOL[torch.float64])


def test_dropout_in_train_mode():
    """Dropout acts on every layer's output but the last, as in nn.RNN: the same draws from
    the same seed give the same result, and it is really applied."""
    torch.manual_seed(0)
    ours, theirs = make_pair(8, 32, num_layers=3, dropout=0.5, bidirectional=True)
    x = torch.randn(10, 4, 8, dtype=torch.float64)
    torch.manual_seed(42)
    a = run(ours, x, None)
    torch.manual_seed(42)
    b = run(theirs, x, None)
    for name in a:
        assert_rel_close(a[name], b[name], TOL[torch.float64], name)
    torch.manual_seed(43)
    c = run(ours, x, None)
    assert (c["output"] - a["output"]).abs().max() > 1e-3, "dropout masks do not change with the seed"
    ours.eval(), theirs.eval()
    evaluated = ours(x)[0]
    assert_rel_close(evaluated, theirs(x)[0], TOL[torch.float64], "eval-mode output")
    assert (evaluated - a["output"]).abs().max() > 1e-3, "eval mode still drops units"


def test_packed_sequence_is_refused_with_advice():
    m = RNN(3, 4)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(TypeError, match="PackedSequence.*pad_packed_sequence"):
        m(packed)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_weight_cell_runs_through_the_fused_op(device):
    """h = relu(W·(h + e_t) + b), the notebook's shared-weight cell, is the Elman cell with
    w_ih = w_hh = W and one bias: the op given the one tensor twice sums its two gradients."""
    g = torch.Generator().manual_seed(0)
    T, B, H = 5, 8, 16
    emb = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(device).requires_grad_()
    W = (torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5).to(device).requires_grad_()
    b = torch.randn(H, generator=g, dtype=torch.float64).to(device).requires_grad_()
    dout = torch.randn(T, B, H, generator=g, dtype=torch.float64).to(device)
    h, steps = emb.new_zeros(B, H), []
    for e_t in emb:
        h = torch.relu((h + e_t) @ W.T + b)
        steps.append(h)
    expected = torch.stack(steps)
    expected_grads = torch.autograd.grad(expected, [emb, W, b], dout)
    out = ops.rnn_layer(emb, emb.new_zeros(B, H), W, W, b, "relu")
    grads = torch.autograd.grad(out, [emb, W, b], dout)
    assert_rel_close(out, expected, TOL[torch.float64], "out")
    for name, grad, e in zip(["demb", "dW", "db"], grads, expected_grads):
        assert_rel_close(grad, e, TOL[torch.float64], name)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_equals_eager(device):
    torch.manual_seed(0)
    m = RNN(5, 8, num_layers=2, bidirectional=True, device=device)
    x = torch.randn(7, 3, 5, device=device)

    def loss(x):
        out, h_n = m(x)
        return out.square().mean() + h_n.abs().mean()

    compiled = torch.compile(loss, fullgraph=True)
    eager, comp = loss(x), compiled(x)
    assert_rel_close(comp, eager, 1e-6, "loss")
    params = list(m.parameters())
    for g, e in zip(torch.autograd.grad(comp, params), torch.autograd.grad(eager, params)):
        assert_rel_close(g, e, 1e-5, "grad")


def _module(batch_first=False, **weights):
    """A builder of RNN(4, 6, num_layers=2) for nn.RNN and for ours, with `weights` (name:
    shape, or a tensor) replaced by new parameters, as a user could set them."""

    def make(cls):
        m = cls(4, 6, num_layers=2, batch_first=batch_first)
        for name, value in weights.items():
            setattr(m, name, nn.Parameter(value if isinstance(value, torch.Tensor) else torch.randn(value)))
        return m

    return make


def _case(call, message, case_id, **module):
    return pytest.param(_module(**module), call, message, id=case_id)


X, X_BF = torch.randn(5, 2, 4), torch.randn(3, 5, 4)  # [T,B,I] and, with batch_first, [B,T,I]
# (module, call, what the message must say); the exception type must be nn.RNN's on the call
BAD_INPUTS = [
    _case(lambda m: m(torch.randn(2, 3, 4, 5)), "input must be 3-D", "4-D input"),
    _case(lambda m: m(torch.randn(5, 2, 7)), r"input_size=4, got shape \(5, 2, 7\)", "input_size"),
    _case(lambda m: m(X, torch.randn(1, 3, 6)), r"hx must have shape \(2, 2, 6\)", "hx shape"),
    _case(lambda m: m(X, torch.randn(2, 6)), r"hx must have shape \(2, 2, 6\)", "hx 2-D for 3-D input"),
    _case(lambda m: m(X[:, 0], torch.randn(2, 1, 6)), r"hx must have shape \(2, 6\)", "hx 3-D for 2-D input"),
    _case(lambda m: m(X.double()), "input has dtype torch.float64", "input dtype"),
    _case(lambda m: m(X.long()), "input must be a floating-point tensor", "integer input"),
    _case(lambda m: m(X.to("meta")), "input is on meta", "input device"),
    _case(lambda m: m(X, torch.randn(2, 2, 6, device="meta")), "hx is on meta", "hx device"),
    _case(lambda m: m(X, torch.randn(2, 2, 6, dtype=torch.float64)), "hx has dtype", "hx dtype"),
    _case(lambda m: m(X[:0]), "input has no time steps", "T=0"),
    _case(lambda m: m(X[:0, :0]), "input has no time steps", "T=0 B=0"),
    _case(lambda m: m(X[:0, 0]), "input has no time steps", "unbatched T=0"),
    _case(lambda m: m(X), r"weight_hh_l0 must have shape \(6, 6\), got \(6, 5\)", "weight_hh_l0", weight_hh_l0=(6, 5)),
    _case(lambda m: m(X), r"weight_ih_l0 must have shape \(6, 4\), got \(6, 5\)", "weight_ih_l0", weight_ih_l0=(6, 5)),
    _case(lambda m: m(X), r"weight_ih_l1 must have shape \(6, 6\), got \(6, 4\)", "weight_ih_l1", weight_ih_l1=(6, 4)),
    _case(lambda m: m(X), r"bias_hh_l1 must have shape \(6,\), got \(5,\)", "bias_hh_l1", bias_hh_l1=(5,)),
    _case(
        lambda m: m(X), "weight_hh_l1 has dtype torch.float64", "weight dtype", weight_hh_l1=torch.randn(6, 6).double()
    ),
    _case(lambda m: m(X), "weight_hh_l1 is on meta", "weight device", weight_hh_l1=torch.randn(6, 6, device="meta")),
    # batch_first: the shapes the user passed, [B,T,I], not the [T,B,I] the layers see
    _case(lambda m: m(torch.randn(3, 5, 7)), r"got shape \(3, 5, 7\)", "batch_first input_size", batch_first=True),
    _case(lambda m: m(X_BF[:, :0]), r"no time steps \(shape \(3, 0, 4\)\)", "batch_first T=0", batch_first=True),
    _case(
        lambda m: m(X_BF, torch.randn(2, 5, 6)),
        r"hx must have shape \(2, 3, 6\).*got \(2, 5, 6\)",
        "batch_first hx",
        batch_first=True,
    ),
]


@pytest.mark.parametrize("make_module,make_call,message", BAD_INPUTS)
def test_bad_input_raises_what_nn_rnn_raises_and_names_the_argument(make_module, make_call, message):
    """Code that catches nn.RNN's exceptions keeps working: the same type on the same call;
    the message names the argument or parameter, with the shape the user gave."""
    torch.manual_seed(0)
    with pytest.raises(Exception) as theirs:
        make_call(make_module(nn.RNN))
    with pytest.raises(Exception, match=message) as ours:
        make_call(make_module(RNN))
    assert type(ours.value) is type(theirs.value), f"{ours.value!r}: nn.RNN raises {theirs.value!r}"


@pytest.mark.parametrize(
    "make_call,message",
    [
        (lambda m: m("not a tensor"), "input must be a Tensor, got str"),
        (lambda m: m(None), "input must be a Tensor, got NoneType"),
        (lambda m: m(torch.randn(5, 2, 4), [0.0]), "hx must be a Tensor or None, got list"),
    ],
)
def test_not_a_tensor_is_a_type_error(make_call, message):
    """nn.RNN raises AttributeError here (it calls .dim() on whatever it got); a TypeError
    that names the argument says what is wrong."""
    with pytest.raises(TypeError, match=message):
        make_call(RNN(4, 6, num_layers=2))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"nonlinearity": "gelu"}, "nonlinearity must be 'tanh' or 'relu'"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"dropout": 1.5}, r"dropout must be a number in \[0, 1\]"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    args = {"input_size": 4, "hidden_size": 6, **kwargs}
    with pytest.raises(ValueError, match=message):
        RNN(**args)


@pytest.mark.slow
def test_falls_back_to_the_reference_with_a_warning_when_the_extension_is_missing():
    """An unbuilt package still works (slowly) and says so, instead of failing at import."""
    code = (
        "import sys, warnings\n"
        "sys.modules['rnnlm_ext._C'] = None  # what an unbuilt source tree looks like to import\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch\n"
        "    from rnnlm_ext import RNN, rnn, reference\n"
        "assert rnn._layer is reference.rnn_layer\n"
        "assert any('falls back to the pure-PyTorch reference' in str(w.message) for w in caught), caught\n"
        "torch.manual_seed(0)\n"
        "ours = RNN(3, 4, num_layers=2, dtype=torch.float64)\n"
        "theirs = torch.nn.RNN(3, 4, num_layers=2, dtype=torch.float64)\n"
        "theirs.load_state_dict(ours.state_dict())\n"
        "x = torch.randn(5, 2, 3, dtype=torch.float64)\n"
        "assert (ours(x)[0] - theirs(x)[0]).abs().max() < 1e-12\n"
        "print('ok')\n"
    )
    assert run_python(code).strip() == "ok"


CLIENT_MODEL = '''
from torch import nn
import rnnlm_ext


class RNNModel(nn.Module):
    """word_language_model's container with rnnlm_ext.RNN in place of nn.RNN."""

    def __init__(self, ntoken, ninp, nhid, nlayers):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = rnnlm_ext.RNN(ninp, nhid, nlayers, nonlinearity="relu", dropout=0.2, bidirectional=True)
        self.decoder = nn.Linear(2 * nhid, ntoken)

    def forward(self, tokens, hidden=None):
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden
'''


@pytest.mark.slow
def test_whole_model_saves_and_loads_as_word_language_model_does(tmp_path):
    """pytorch/examples' word_language_model saves the whole model (torch.save(model, f)) and
    loads it in its own torch.load(f), weights_only=True by default, having allowlisted its
    own classes and torch.nn's: a model holding rnnlm_ext.RNN must load there, in a fresh
    process, and give the same outputs."""
    (tmp_path / "model.py").write_text(CLIENT_MODEL)
    saved, expected = tmp_path / "model.pt", tmp_path / "expected.pt"
    run_python(
        f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import model\n"
        "torch.manual_seed(0)\n"
        "m = model.RNNModel(50, 8, 12, 2).eval()\n"
        "tokens = torch.randint(0, 50, (7, 3))\n"
        f"with open({str(saved)!r}, 'wb') as f:\n"
        "    torch.save(m, f)\n"
        f"torch.save((tokens, *m(tokens)), {str(expected)!r})\n"
    )
    out = run_python(
        f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import model\n"
        "from torch import nn\n"
        "torch.serialization.add_safe_globals([model.RNNModel, nn.Dropout, nn.Embedding, nn.Linear])\n"
        f"with open({str(saved)!r}, 'rb') as f:\n"
        "    m = torch.load(f)\n"
        "m.rnn.flatten_parameters()\n"
        f"tokens, logits, hidden = torch.load({str(expected)!r})\n"
        "assert type(m.rnn).__module__ == 'rnnlm_ext.rnn' and not m.training\n"
        "new_logits, new_hidden = m(tokens)\n"
        "assert torch.equal(new_logits, logits) and torch.equal(new_hidden, hidden)\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


def draw_fuzz_case(rng):
    """One configuration of the fuzz: sizes 1 to 70, every constructor flag, with or without
    h0, unbatched input now and then, contiguous or not, upstream gradients on output, h_n or
    both; dropout in training mode (both modules draw the same masks from one seed)."""

    def size():  # 1 to 70, log-uniform: small and odd sizes often, and the cost stays low
        return round(70 ** rng.random())

    T, B, I, H, num_layers = size(), size(), size(), size(), rng.randint(1, 3)
    return dict(
        T=T,
        B=B,
        I=I,
        H=H,
        num_layers=num_layers,
        nonlinearity=rng.choice(["tanh", "relu"]),
        bias=rng.random() < 0.5,
        batch_first=rng.random() < 0.5,
        bidirectional=rng.random() < 0.5,
        dropout=rng.choice([0.0, 0.0, 0.4]) if num_layers > 1 else 0.0,  # it acts between layers only
        with_h0=rng.random() < 0.5,
        unbatched=rng.random() < 0.1,
        layout=rng.choice(["contiguous", "strided", "transposed"]),
        upstream=rng.choice([("output",), ("h_n",), ("output", "h_n")]),
    )


def fuzz_inputs(case, D, gen):
    """x and h0 (or None) of the case, float64, laid out as asked: "strided" takes every other
    element of the feature dimension, "transposed" swaps the first two dimensions of a
    contiguous tensor; x is [T,B,I] ([B,T,I] with batch_first, [T,I] unbatched)."""
    T, B, I, H, L = case["T"], case["B"], case["I"], case["H"], case["num_layers"]
    batch = () if case["unbatched"] else (B,)
    x_shape = (B, T, I) if case["batch_first"] and batch else (T, *batch, I)
    h_shape = (L * D, *batch, H)

    def draw(shape):
        if case["layout"] == "strided":
            return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)[..., ::2]
        if case["layout"] == "transposed" and len(shape) == 3:
            return torch.randn(shape[1], shape[0], shape[2], generator=gen, dtype=torch.float64).transpose(0, 1)
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    return draw(x_shape), draw(h_shape) if case["with_h0"] else None


def fuzz_mismatches(a, b):
    """The tensors of run() results a and b further apart than 1e-9 of b's scale plus 1e-13
    (~450 float64 ulp) of the case's largest tensor. The second term is for gradients made
    small by a saturated tanh: 1 - y² with y within 1e-8 of ±1 keeps only the absolute
    rounding of y (two tanh implementations differ by an ulp there), ~1e-9 relative to that
    small gradient but ~1e-17 of the case's scale; a real error is of the tensor's own size."""
    largest = max([t.abs().max().item() for t in b.values() if t.numel()], default=0.0)
    mismatches = []
    for name in b:
        if a[name].shape != b[name].shape:
            mismatches.append(f"{name}: shape {tuple(a[name].shape)} != {tuple(b[name].shape)}")
            continue
        diff = (a[name] - b[name]).abs().max().item() if b[name].numel() else 0.0
        scale = b[name].abs().max().item() if b[name].numel() else 0.0
        if not diff <= 1e-9 * scale + 1e-13 * largest:
            mismatches.append(f"{name}: max abs diff {diff:.3e}, scale {scale:.3g}, case's largest {largest:.3g}")
    return mismatches


@pytest.mark.slow
def test_fuzzed_parity_with_torch_nn_rnn(num_threads):
    """1,200 seeded configurations, float64: every output and every gradient of ours against
    nn.RNN's with the same state_dict (fuzz_mismatches); every fourth case on two threads
    (the CPU kernel's schedules differ; on a busy machine, waits between two threads cost
    ten times the work). Lists every failing case with its index (rerun one with
    rng = random.Random(SEED + index))."""
    SEED, CASES = 20261203, 1200
    failures, start = [], time.perf_counter()
    for index in range(CASES):
        case = draw_fuzz_case(random.Random(SEED + index))
        threads = 2 if index % 4 == 3 else 1
        num_threads(threads)
        torch.manual_seed(SEED + index)
        kwargs = {k: case[k] for k in ("num_layers", "nonlinearity", "bias", "batch_first", "bidirectional", "dropout")}
        ours, theirs = make_pair(case["I"], case["H"], **kwargs)
        training = case["dropout"] > 0
        ours.train(training), theirs.train(training)
        x, h0 = fuzz_inputs(case, ours.num_directions, torch.Generator().manual_seed(SEED + index))
        torch.manual_seed(index)  # the dropout masks
        a = run(ours, x, h0, case["upstream"])
        torch.manual_seed(index)
        b = run(theirs, x, h0, case["upstream"])
        assert a.keys() == b.keys()
        failures += [f"case {index} {case}, {threads} threads: {m}" for m in fuzz_mismatches(a, b)]
    elapsed = time.perf_counter() - start
    assert not failures, f"{len(failures)} tensors differ in {CASES} cases ({elapsed:.0f} s):\n" + "\n".join(
        failures[:20]
    )
