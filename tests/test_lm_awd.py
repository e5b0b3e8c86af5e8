"""LMModel5-7, RNNLM on every cell, AWD-LSTM's regularisers, per-model defaults and their flags."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, check_stateful_training_matches
from torch import nn

import rnnlm_ext
from rnnlm_ext.lm import models
from rnnlm_ext.lm.cli import main
from rnnlm_ext.lm.train import MODEL_DEFAULTS, TrainConfig, load_checkpoint, resolve, train

V, H = 11, 8


def quiet(_):
    pass


BUILDS = [
    ("lmmodel5", {}),
    ("lmmodel6", {}),
    ("lmmodel7", {}),
    ("rnn", {"cell": "rnn"}),
    ("rnn", {"cell": "lstm"}),
    ("rnn", {"cell": "gru"}),
]


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("name,kw", BUILDS)
def test_new_models_shapes_state_and_one_training_step(name, kw, impl):
    torch.manual_seed(0)
    model = models.build_model(name, V, H, 2, "tanh", impl=impl, **kw)
    cell = kw.get("cell") or models.STACK_MODELS[name].cell
    layer = model.rnn[0] if isinstance(model.rnn, nn.ModuleList) else model.rnn
    assert type(layer) is models.layer_class(impl, cell)
    x = torch.randint(0, V, (4, 6))
    out = model(x)
    assert out.shape == (4, 6, V) and model.raw_out.shape == model.out.shape == (6, 4, H)
    state = model.h
    if cell == "lstm":  # (h, c), both [L,B,H]
        assert isinstance(state, tuple) and [s.shape for s in state] == [(2, 4, H)] * 2
    else:
        assert state.shape == (2, 4, H)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(out.reshape(-1, V), x.roll(-1, 1).reshape(-1))
    loss = loss + models.activation_penalty(model.raw_out, model.out, 2.0, 1.0)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "every parameter learns"


def test_lmmodel7_is_the_books():
    model = models.build_model("lmmodel7", V, H, 2, "tanh", 0.4, True, impl="torch")
    assert model.h_o.weight is model.i_h.weight and model.drop.p == 0.4
    assert isinstance(model.rnn, nn.LSTM) and model.rnn.num_layers == 2
    assert isinstance(models.build_model("lmmodel6", V, H, 2).rnn, rnnlm_ext.LSTM)


def test_ar_and_tar_match_their_definitions_by_hand():
    raw = torch.tensor([[[1.0, -2.0]], [[3.0, 0.0]], [[0.0, 1.0]]])  # [T=3,B=1,H=2]
    out = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[0.0, 2.0]]])  # the dropped output
    # AR: mean of out² = (4 + 4) / 6; TAR: differences (2, 2), (-3, 1): mean of squares = 18 / 4
    assert models.activation_penalty(raw, out, 1.0, 0.0).item() == pytest.approx(8 / 6)
    assert models.activation_penalty(raw, out, 0.0, 1.0).item() == pytest.approx(18 / 4)
    assert models.activation_penalty(raw, out, 2.0, 3.0).item() == pytest.approx(2 * 8 / 6 + 3 * 18 / 4)
    assert models.activation_penalty(raw[:1], out[:1], 0.0, 1.0).item() == 0  # one step: no difference


def test_ar_is_on_the_dropped_output_and_tar_on_the_undropped_one():
    torch.manual_seed(0)
    model = models.RNNLM(V, H, 2, "tanh", cell="lstm", layer_cls=nn.LSTM, output_drop=0.5)
    model(torch.randint(0, V, (3, 5)))
    dropped = model.out == 0
    assert dropped.any() and not (model.raw_out == 0).any()
    assert_rel_close(model.out[~dropped], 2 * model.raw_out[~dropped], 1e-6, "kept values scaled by 1/(1-p)")


def test_variational_masks_are_constant_across_steps_and_fresh_across_sequences():
    drop = models.VariationalDropout(0.5)
    x = torch.ones(7, 16, 32)  # [T,B,H]
    a, b = drop(x), drop(x)
    assert torch.equal(a, a[:1].expand_as(a)), "one mask per sequence, the same at every step"
    assert not torch.equal(a[0, 0], a[0, 1]), "each row (sequence) has its own mask"
    assert not torch.equal(a, b), "a fresh mask at every call (batch)"
    assert set(a.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(drop.eval()(x), x)


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(1)
    emb = nn.Embedding(V, H)
    x = torch.randint(0, V, (4, 30))
    e = models.embedding_dropout(emb, x, 0.5, training=True)
    for word in x.unique():
        rows = e[x == word]
        assert (rows == 0).all() or torch.allclose(rows, 2 * emb.weight[word].expand_as(rows)), int(word)
    assert torch.equal(models.embedding_dropout(emb, x, 0.5, training=False), emb(x))


@pytest.mark.parametrize("layer_cls", [rnnlm_ext.LSTM, nn.LSTM, rnnlm_ext.GRU, nn.GRU, rnnlm_ext.RNN])
def test_weight_drop_is_on_in_training_off_in_eval_and_keeps_the_weight(layer_cls):
    torch.manual_seed(2)
    cell = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn"}[layer_cls.__name__]
    plain = models.RNNLM(V, H, 2, "tanh", cell=cell, layer_cls=layer_cls)
    torch.manual_seed(2)
    dropped = models.RNNLM(V, H, 2, "tanh", cell=cell, layer_cls=layer_cls, weight_drop=0.5)
    dropped.load_state_dict(
        plain.state_dict() if layer_cls.__module__.startswith("rnnlm_ext") else dropped.state_dict()
    )
    if not layer_cls.__module__.startswith("rnnlm_ext"):  # the torch layer sits in a WeightDrop
        for a, b in zip(plain.rnn, dropped.rnn):
            b.layer.load_state_dict(a.state_dict())
    x = torch.randint(0, V, (3, 6))
    w = [p.detach().clone() for p in dropped.parameters()]
    assert not torch.allclose(dropped(x), plain(x)), "training: W_hh dropped"
    assert all(torch.equal(a, b) for a, b in zip(w, dropped.parameters())), "the weight itself is untouched"
    plain.eval(), dropped.eval()
    plain.reset(), dropped.reset()
    assert torch.equal(dropped(x), plain(x)), "eval: no weight drop"


def test_weight_drop_draws_the_same_mask_on_the_fused_and_the_torch_layer():
    runs = []
    for layer_cls in (rnnlm_ext.GRU, nn.GRU):
        torch.manual_seed(3)
        model = models.RNNLM(V, H, 2, "tanh", cell="gru", layer_cls=layer_cls, weight_drop=0.3).double()
        runs.append(model(torch.randint(0, V, (3, 6))))
    assert_rel_close(runs[0], runs[1], 1e-10, "same seed, same DropConnect masks")


def test_lmmodel7_defaults_are_the_books_row():
    cfg = resolve(TrainConfig(model="lmmodel7"))
    book = dict(cell="lstm", hidden_size=64, layers=2, bs=64, bptt=16, epochs=15, lr=1e-2, wd=0.1, ar=2.0, tar=1.0)
    assert {k: getattr(cfg, k) for k in book} == book
    assert (cfg.dropout, cfg.tie_weights, cfg.moms, cfg.clip) == (0.4, True, "0.8,0.7", 0.0)
    assert resolve(TrainConfig(model="lmmodel7", lr=3e-3, ar=0.0)).lr == 3e-3  # a setting given stays
    main_job = resolve(TrainConfig())
    assert (main_job.hidden_size, main_job.cell, main_job.ar, main_job.weight_drop) == (256, "rnn", 0.0, 0.0)
    assert resolve(TrainConfig(cell="gru")).nonlinearity == "tanh"
    assert set(MODEL_DEFAULTS) == set(models.MODELS)


def test_resume_is_exact_for_an_lstm_run_with_every_regulariser_on(tmp_path):
    settings = dict(
        cell="lstm",
        hidden_size=12,
        layers=2,
        epochs=2,
        dropout=0.1,
        embed_drop=0.1,
        input_drop=0.2,
        hidden_drop=0.2,
        output_drop=0.3,
        weight_drop=0.2,
        ar=2.0,
        tar=1.0,
        tie_weights=True,
        progress=False,
    )
    whole = train(TrainConfig(**settings), log=quiet)
    run = str(tmp_path / "run")
    train(TrainConfig(**settings, save=run, stop_after=37), log=quiet)  # mid epoch 1
    h, c = load_checkpoint(run)["hidden_state"]  # the LSTM's carried pair
    assert h.shape == c.shape == (2, 64, 12)
    resumed = train(TrainConfig(resume=run, progress=False), log=quiet)
    for key in ("train_loss", "valid_loss", "valid_accuracy"):
        assert [e[key] for e in resumed["epochs"]] == [e[key] for e in whole["epochs"]], key


TINY = ["--hidden", "8", "--layers", "1", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weight-drop", "1"], "--weight-drop must be in \\[0, 1\\), got 1.0"),
        (["--embed-drop", "-0.1"], "--embed-drop must be in \\[0, 1\\)"),
        (["--input-drop", "1.5"], "--input-drop must be in \\[0, 1\\)"),
        (["--hidden-drop", "nan"], "--hidden-drop must be in \\[0, 1\\)"),
        (["--output-drop", "2"], "--output-drop must be in \\[0, 1\\)"),
        (["--ar", "-1"], "--ar must be a finite number >= 0"),
        (["--tar", "inf"], "--tar must be a finite number >= 0"),
        (["--moms", "0.95"], "--moms must be two numbers in \\[0, 1\\) as HI,LO"),
        (["--moms", "1,0.5"], "--moms must be two numbers"),
        (["--model", "lmmodel6", "--cell", "gru"], "--cell is lstm for --model lmmodel6, got gru"),
        (["--cell", "lstm", "--nonlinearity", "relu"], "--nonlinearity is the Elman cell's; the lstm cell's is tanh"),
        (["--model", "lmmodel7", "--weight-drop", "0.2"], "--weight-drop needs --model rnn or shared"),
        (["--model", "shared", "--weight-drop", "0.2"], "--weight-drop needs a cell with its own W_hh"),
        (["--model", "lmmodel4", "--ar", "1"], "--ar needs --model rnn, shared or lmmodel5-7"),
    ],
)
def test_bad_values_of_the_new_flags_are_refused_before_training(capsys, args, message):
    assert main(["train", *TINY, *args]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("rnnlm train: error: ") and "train_loss" not in out, (out, err)
    assert re.search(message, err), err


def test_cell_flags_reach_the_model(tmp_path):
    path = tmp_path / "r.json"
    assert main(["train", *TINY, "--cell", "gru", "--rnn", "torch", "--stop-after", "2", "--json", str(path)]) == 0
    config = json.loads(path.read_text())["config"]
    assert (config["cell"], config["rnn"], config["nonlinearity"]) == ("gru", "torch", "tanh")
    assert math.isfinite(config["lr"])


def test_a_run_too_short_for_the_one_cycle_schedule_is_a_clear_error(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("abcdefghij" * 65)  # 520 train characters: 8 rows of 65, 4 batches of 8 x 16
    args = ["train", "--dataset", str(text), "--level", "char", "--bs", "8", "--bptt", "16", *TINY]
    assert main(args) == 1
    assert (
        "the run has 4 steps (4 batches per epoch × 1); the one-cycle schedule needs at least 5: more --epochs"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("name,cell", [("rnn", "lstm"), ("rnn", "gru"), ("lmmodel7", "lstm"), ("lmmodel5", "rnn")])
def test_fused_and_torch_layers_give_the_same_losses_gradients_and_carried_state(name, cell):
    built = []
    for impl in ("fused", "torch"):
        torch.manual_seed(4)
        built.append(models.build_model(name, 13, 9, 2, "tanh", impl=impl, cell=cell).double().eval())
    fused, ref = built
    ref.load_state_dict(fused.state_dict())
    # AR and TAR in the loss, on each model's own last-layer outputs
    check_stateful_training_matches(fused, ref, 13, lambda m: models.activation_penalty(m.raw_out, m.out, 2.0, 1.0))
