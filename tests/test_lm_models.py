"""TBPTT semantics of the stateful models: carried state, detach, flat graph, reset, fused == nn.RNN."""

import functools
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, check_stateful_training_matches
from torch import nn

from rnnlm_ext import ops, reference
from rnnlm_ext.lm import models
from rnnlm_ext.rnn import RNN

V, H = 11, 8


def _stateful(name, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    if name in ("lmmodel3", "lmmodel4"):
        model = models.build_model(name, V, H)
    else:
        model = models.RNNLM(V, H, cell=name, **kw)
    return model.to(dtype)


STATEFUL = [
    ("rnn", {"num_layers": 2, "nonlinearity": "tanh"}),
    ("rnn", {"nonlinearity": "relu"}),
    ("shared", {"num_layers": 2}),
    ("lmmodel4", {}),
    ("lstm", {"num_layers": 2}),
    ("gru", {"num_layers": 2}),
    ("lstm", {"num_layers": 2, "layer_cls": nn.LSTM}),
]


@pytest.mark.parametrize("name,kw", STATEFUL)
def test_state_carried_over_k_batches_equals_one_long_sequence(name, kw):
    model = _stateful(name, **kw)
    x = torch.randint(0, V, (3, 4 * 5))  # [B, k·bptt]
    whole = model(x)
    model.reset()
    chunks = torch.cat([model(x[:, i : i + 5]) for i in range(0, 20, 5)], dim=1)
    assert_rel_close(chunks, whole, 1e-10, "k batches vs one sequence")


def test_lmmodel3_state_carried_equals_its_last_step_over_the_long_sequence():
    m3, m4 = _stateful("lmmodel3"), _stateful("lmmodel4")
    x = torch.randint(0, V, (3, 12))
    whole = m4(x)  # every position
    for i in range(0, 12, 3):
        assert_rel_close(m3(x[:, i : i + 3]), whole[:, i + 2], 1e-10, f"LMModel3 batch at {i}")


@pytest.mark.parametrize("name,kw", STATEFUL)
def test_gradients_of_a_batch_stop_at_its_start(name, kw):
    model = _stateful(name, **kw)
    x = torch.randint(0, V, (2, 10))
    out1 = model(x[:, :5])
    carried = model.h
    for part in carried if isinstance(carried, tuple) else (carried,):  # the LSTM carries (h, c)
        assert not part.requires_grad and part.grad_fn is None
    out2 = model(x[:, 5:])
    (grad_out1,) = torch.autograd.grad(out2.sum(), out1, allow_unused=True)
    assert grad_out1 is None  # nothing of batch 2 depends on batch 1's graph
    # and batch 2's parameter gradients are those of a run started from the carried state as a constant
    grads = torch.autograd.grad(out2.sum(), list(model.parameters()))
    model.h = carried
    ref = torch.autograd.grad(model(x[:, 5:]).sum(), list(model.parameters()))
    for g, r in zip(grads, ref):
        assert_rel_close(g, r, 1e-10, "batch 2 gradient")


def _graph_size(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions]
    return len(seen)


@pytest.mark.parametrize("name,kw", [("rnn", {"num_layers": 2}), ("lstm", {"num_layers": 2}), ("lmmodel4", {})])
def test_graph_and_memory_stay_flat_over_1000_batches(name, kw):
    model = _stateful(name, torch.float32, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randint(0, V, (2, 1001 * 3))
    sizes, first = [], None
    for k in range(1000):
        out = model(x[:, 3 * k : 3 * k + 3])
        loss = F.cross_entropy(out.reshape(-1, V), x[:, 3 * k + 1 : 3 * k + 4].reshape(-1))
        sizes.append(_graph_size(loss))
        if k == 0:
            first = weakref.ref(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(set(sizes)) == 1, f"graph size changed: {sorted(set(sizes))}"
    del out, loss
    assert first() is None, "batch 1's output is still alive: the carried state keeps old graphs"


@pytest.mark.parametrize("name,kw", STATEFUL)
def test_reset_and_batch_size_change_start_from_zeros(name, kw):
    model = _stateful(name, **kw)
    x = torch.randint(0, V, (4, 6))
    fresh = model(x)
    model(x)  # the state is now non-zero
    assert not torch.equal(model(x), fresh)
    model.reset()
    assert torch.equal(model(x), fresh)
    model(x)
    assert_rel_close(model(x[:3]), fresh[:3], 1e-10, "a new batch size must start from a zero state")


@pytest.mark.parametrize("nonlinearity,layers", [("tanh", 2), ("relu", 1), ("relu", 3)])
def test_fused_and_nn_rnn_give_the_same_losses_and_gradients(nonlinearity, layers):
    torch.manual_seed(1)
    fused = models.RNNLM(13, 9, layers, nonlinearity, tie_weights=True).double()
    ref = models.RNNLM(13, 9, layers, nonlinearity, tie_weights=True, layer_cls=nn.RNN).double()
    ref.load_state_dict(fused.state_dict())
    check_stateful_training_matches(fused, ref, 13)


def test_shared_weight_cell_is_lmmodel4_with_the_fused_op():
    torch.manual_seed(2)
    m4 = models.LMModel4(V, H).double()
    seed = models.RNNLM(V, H, cell="shared").double()
    with torch.no_grad():
        seed.i_h.weight.copy_(m4.i_h.weight)
        seed.rnn[0].weight[0].copy_(m4.h_h.weight)
        seed.rnn[0].bias[0].copy_(m4.h_h.bias)
        seed.h_o.weight.copy_(m4.h_o.weight)
        seed.h_o.bias.copy_(m4.h_o.bias)
    x = torch.randint(0, V, (3, 9))
    out_seed, out_m4 = seed(x), m4(x)
    assert_rel_close(out_seed, out_m4, 1e-10, "logits")
    out_seed.square().sum().backward()
    out_m4.square().sum().backward()
    assert_rel_close(seed.rnn[0].weight[0].grad, m4.h_h.weight.grad, 1e-10, "grad of the shared W")
    assert_rel_close(seed.i_h.weight.grad, m4.i_h.weight.grad, 1e-10, "grad of the embedding")


def test_lmmodel2_cell_runs_through_the_fused_op():
    """h = relu(W·(h + e_t) + b) is the Elman cell with w_ih = w_hh = W and one bias."""
    torch.manual_seed(0)
    model = models.LMModel2(30, 16).double()
    tokens = torch.randint(0, 30, (8, 5))
    expected = model(tokens)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))

    emb = model.i_h(tokens).transpose(0, 1)  # [T,B,H]
    W, b = model.h_h.weight, model.h_h.bias
    out = ops.rnn_layer(emb, emb.new_zeros(8, 16), W, W, b, "relu")
    logits = model.h_o(out[-1])
    grads = torch.autograd.grad(logits.sum(), list(model.parameters()))
    assert_rel_close(logits, expected, 1e-10, "logits")
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads):
        assert_rel_close(g, e, 1e-10, name)


def test_fastbook_models_shapes_and_names():
    x = torch.randint(0, V, (4, 3))
    for name in ("lmmodel1", "lmmodel2", "lmmodel3"):
        assert models.build_model(name, V, H)(x).shape == (4, V)
    assert models.build_model("lmmodel4", V, H)(x).shape == (4, 3, V)
    # one name each, beside the other language models; the layer's reference holds none
    assert not [v for v in vars(reference).values() if isinstance(v, type) and issubclass(v, nn.Module)]
    with pytest.raises(ValueError, match="^model must be one of rnn, shared, "):
        models.build_model("lstm", V, H)


@pytest.mark.parametrize("layer", [functools.partial(RNN, H, H), functools.partial(models.SharedWeightRNN, H)])
def test_reference_impl_gives_the_fused_outputs_and_gradients(layer):
    torch.manual_seed(3)
    fused = layer(num_layers=2, nonlinearity="tanh").double()
    ref = layer(num_layers=2, nonlinearity="tanh", impl="reference").double()
    ref.load_state_dict(fused.state_dict())
    x, h0 = torch.randn(7, 3, H, dtype=torch.float64), torch.randn(2, 3, H, dtype=torch.float64)
    results = []
    for model in (fused, ref):
        out, h_n = model(x, h0)
        (out.square().sum() + h_n.sum()).backward()
        results.append([out, h_n] + [p.grad for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert_rel_close(a, b, 1e-10, f"output {i}")
    with pytest.raises(ValueError, match="impl must be one of 'fused', 'reference', got 'cuda'"):
        layer(impl="cuda")
