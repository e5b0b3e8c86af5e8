"""Language models: fastbook chapter 12's seven (LMModel1..7) and RNNLM on the fused layers.

Dimension letters: B batch rows, T steps (bptt), V vocabulary, H hidden units, L layers.
Every model takes token ids x [B,T] and returns logits for every position [B,T,V] when it has
`predicts_all = True`, else for the token after the last one only [B,V] (the first three).
Stateful models keep their hidden state `h` across calls (row j of one batch continues row j of
the previous one), detach it after every call, and start again from zeros after reset() or when
the batch size changes. The last batch of an epoch is shorter in time, never in rows, so the
state carries through it; a new batch size only comes with a new stream (validation, generation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnnlm_ext
from rnnlm_ext.lm.errors import SettingError
from rnnlm_ext.rnn import LAYER_IMPLS


class LMModel1(nn.Module):
    """Fastbook's first language model: three words in, the next one out.

    One embedding, one hidden layer applied three times with the same weights, one output
    layer; each word's embedding is added to the hidden state before the shared layer.
    """

    def __init__(self, vocab_sz: int, hidden_size: int):
        super().__init__()
        self.i_h = nn.Embedding(vocab_sz, hidden_size)
        self.h_h = nn.Linear(hidden_size, hidden_size)
        self.h_o = nn.Linear(hidden_size, vocab_sz)

    def forward(self, x: Tensor) -> Tensor:  # x: [B,3] token ids -> [B,V] logits
        h = F.relu(self.h_h(self.i_h(x[:, 0])))
        h = h + self.i_h(x[:, 1])
        h = F.relu(self.h_h(h))
        h = h + self.i_h(x[:, 2])
        h = F.relu(self.h_h(h))
        return self.h_o(h)


class LMModel2(LMModel1):
    """Fastbook's second model: LMModel1 with its steps as a loop.

    h = relu(W·(h + e_t) + b) for every input word e_t, starting from h = 0: the Elman cell
    with w_ih = w_hh = W, which is how SharedWeightRNN runs it through the fused op.
    """

    def forward(self, x: Tensor) -> Tensor:  # x: [B,T] token ids -> [B,V] logits
        h = x.new_zeros((), dtype=self.h_h.weight.dtype)
        for t in range(x.shape[1]):
            h = h + self.i_h(x[:, t])
            h = F.relu(self.h_h(h))
        return self.h_o(h)


class LMModel3(LMModel2):
    """LMModel2 made stateful: the hidden state is kept across batches, detached, and reset()."""

    predicts_all = False

    def __init__(self, vocab_sz: int, hidden_size: int):
        super().__init__(vocab_sz, hidden_size)
        self.h: Tensor | None = None  # [B,H]

    def reset(self) -> None:
        self.h = None

    def _steps(self, x: Tensor) -> Tensor:  # x [B,T] -> every step's hidden state [B,T,H]
        if self.h is None or self.h.shape[0] != x.shape[0]:
            self.h = self.h_h.weight.new_zeros(x.shape[0], self.h_h.weight.shape[0])
        h, hs = self.h, []
        for t in range(x.shape[1]):
            h = F.relu(self.h_h(h + self.i_h(x[:, t])))
            hs.append(h)
        self.h = h.detach()  # truncated BPTT: the next batch's gradients stop here
        return torch.stack(hs, dim=1)

    def forward(self, x: Tensor) -> Tensor:  # [B,T] -> [B,V]
        return self.h_o(self._steps(x)[:, -1])


class LMModel4(LMModel3):
    """LMModel3 predicting the next token at every position, not only after the last one."""

    predicts_all = True

    def forward(self, x: Tensor) -> Tensor:  # [B,T] -> [B,T,V]
        return self.h_o(self._steps(x))


class SharedWeightRNN(nn.Module):
    """LMModel4's cell as a stack of fused layers: h = act(W·(h + x_t) + b), one W per layer.

    It is the Elman cell with W_ih = W_hh = W: the fused op gets W twice and autograd sums the
    two gradients. Same call convention as nn.RNN (x [T,B,H], h0 [L,B,H] -> out, h_n); impl as
    rnnlm_ext.RNN's.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "relu",
        dropout: float = 0.0,
        impl: str = "fused",
    ):
        super().__init__()
        if impl not in LAYER_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, LAYER_IMPLS))}, got {impl!r}")
        bound = hidden_size**-0.5  # nn.Linear's initialisation, as LMModel4's h_h has
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-bound, bound)) for _ in range(num_layers)
        )
        self.bias = nn.ParameterList(
            nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound)) for _ in range(num_layers)
        )
        self.nonlinearity = nonlinearity
        self.dropout = dropout
        self.impl = impl

    def forward(self, x: Tensor, h0: Tensor):
        h_n = []
        for layer, (W, b) in enumerate(zip(self.weight, self.bias)):
            x = LAYER_IMPLS[self.impl](x, h0[layer], W, W, b, self.nonlinearity)  # [T,B,H]
            h_n.append(x[-1])
            if self.training and self.dropout and layer < len(self.weight) - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, torch.stack(h_n)


def layer_class(impl: str, cell: str) -> type[nn.Module]:
    """The recurrent layer of `cell` ('rnn', 'lstm', 'gru'): impl 'fused' is rnnlm_ext's, 'torch' torch.nn's."""
    if impl not in LAYER_CLASSES:
        raise SettingError(f"rnn must be one of {', '.join(LAYER_CLASSES)}, got {impl!r}", "rnn")
    if cell not in CELLS:
        raise SettingError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}", "cell")
    return getattr(LAYER_CLASSES[impl], CELLS[cell])


def _new_layer(
    layer_cls,
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    nonlinearity: str,
    weight_drop: float = 0.0,
) -> nn.Module:
    """layer_cls(input_size, hidden_size, num_layers[, nonlinearity]) with DropConnect on W_hh:
    rnnlm_ext's layers take weight_drop themselves, torch.nn's are wrapped in WeightDrop (one layer)."""
    kw = {"nonlinearity": nonlinearity} if cell == "rnn" else {}  # LSTM and GRU have none to choose
    if not weight_drop:
        return layer_cls(input_size, hidden_size, num_layers, **kw)
    if issubclass(layer_cls, rnnlm_ext.rnn.RecurrentBase):
        return layer_cls(input_size, hidden_size, num_layers, weight_drop=weight_drop, **kw)
    return WeightDrop(layer_cls(input_size, hidden_size, num_layers, **kw), weight_drop)


def _zero_state(cell: str, num_layers: int, B: int, H: int, like: Tensor):
    """A zero hidden state: [L,B,H], or the LSTM's pair (h, c) of them."""
    h = like.new_zeros(num_layers, B, H)
    return (h, torch.zeros_like(h)) if cell == "lstm" else h


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def state_batch(state) -> int:
    """The batch size of a hidden state [L,B,H] or (h, c)."""
    return (state[0] if isinstance(state, tuple) else state).shape[1]


class VariationalDropout(nn.Module):
    """Dropout with one mask per sequence, the same at every step (AWD-LSTM's RNNDropout).

    x [T,B,H]: each of the B rows gets its own mask [H], drawn afresh at every call (every batch).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - self.p) / (1 - self.p)  # [1,B,H]
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def embedding_dropout(embedding: nn.Embedding, x: Tensor, p: float, training: bool) -> Tensor:
    """embedding(x) with whole rows of the table dropped (AWD-LSTM's embedding dropout): a word
    dropped is dropped at every position of the batch; the kept rows are scaled by 1/(1-p)."""
    if not training or p == 0:
        return embedding(x)
    W = embedding.weight  # [V,E]
    mask = W.new_empty(W.shape[0], 1).bernoulli_(1 - p) / (1 - p)  # [V,1]
    return F.embedding(x, W * mask)


class WeightDrop(nn.Module):
    """DropConnect on a one-layer torch.nn recurrent module's W_hh (AWD-LSTM's weight dropout), as
    rnnlm_ext's layers do with their weight_drop: in training, every call runs the layer with a
    freshly dropped copy of weight_hh_l0 (the same mask for the same seed); in eval, the weight itself."""

    def __init__(self, layer: nn.Module, p: float):
        super().__init__()
        self.layer, self.p = layer, p

    def forward(self, x: Tensor, state):
        if not self.training or self.p == 0:
            return self.layer(x, state)
        dropped = F.dropout(self.layer.weight_hh_l0, self.p, training=True)
        return torch.func.functional_call(self.layer, {"weight_hh_l0": dropped}, (x, state))


def activation_penalty(raw: Tensor, out: Tensor, ar: float, tar: float) -> Tensor:
    """AR + TAR (Merity et al.; fastai's RNNRegularizer) on the last layer's outputs [T,B,H]:
    ar·mean(out²) on the dropped output, tar·mean((raw_t − raw_{t−1})²) on the undropped one."""
    penalty = ar * out.pow(2).mean()
    if raw.shape[0] > 1:
        penalty = penalty + tar * (raw[1:] - raw[:-1]).pow(2).mean()
    return penalty


class _StackState(nn.Module):
    """The carried state of a model on a recurrent stack (cell, num_layers, hidden_size, h_o set by
    the subclass): h [L,B,H], or (h, c) for the LSTM; zeros after reset() or a new batch size.
    raw_out and out keep the last layer's output before and after dropout [T,B,H] of the last call."""

    def _init_state(self, cell: str, num_layers: int, hidden_size: int) -> None:
        self.cell, self.num_layers, self.hidden_size = cell, num_layers, hidden_size
        self.h = None
        self.raw_out: Tensor | None = None
        self.out: Tensor | None = None

    def reset(self) -> None:
        self.h = None

    def _state_for(self, B: int):
        if self.h is None or state_batch(self.h) != B:
            self.h = _zero_state(self.cell, self.num_layers, B, self.hidden_size, self.h_o.weight)
        return self.h


class RNNLM(_StackState):
    """Embedding -> recurrent stack -> linear output, trained with stateful truncated BPTT.

    cell 'rnn', 'lstm' or 'gru' runs layer_cls (rnnlm_ext's fused layer of that cell by default;
    the torch.nn one has the same interface and weights, for comparisons); cell 'shared' runs
    LMModel4's shared-weight cell (SharedWeightRNN). The stack is one module per layer, so that
    dropout can act between them. dropout: plain dropout on the embeddings, between layers and
    before the output layer. AWD-LSTM's regularisers, each off at 0: embed_drop (whole embedding
    rows), input_drop / hidden_drop / output_drop (VariationalDropout on the embeddings, between
    layers, on the last layer's output), weight_drop (DropConnect on every layer's W_hh: the
    layer's own weight_drop, or WeightDrop around a torch.nn layer).
    tie_weights shares the embedding matrix with the output layer (the embedding size is hidden_size).
    """

    predicts_all = True

    def __init__(
        self,
        vocab_sz: int,
        hidden_size: int = 64,
        num_layers: int = 1,
        nonlinearity: str = "relu",
        dropout: float = 0.0,
        tie_weights: bool = False,
        cell: str = "rnn",
        layer_cls: type[nn.Module] | None = None,
        embed_drop: float = 0.0,
        input_drop: float = 0.0,
        hidden_drop: float = 0.0,
        output_drop: float = 0.0,
        weight_drop: float = 0.0,
    ):
        super().__init__()
        if cell not in (*CELLS, "shared"):
            raise ValueError(f"cell must be one of {', '.join(CELLS)} or 'shared', got {cell!r}")
        if cell == "shared" and weight_drop:
            raise SettingError(
                "weight_drop needs a cell with its own W_hh; the shared cell's is its W_ih", "weight_drop"
            )
        self.i_h = nn.Embedding(vocab_sz, hidden_size)
        if cell != "shared":
            layer_cls = layer_cls or layer_class("fused", cell)
        layers = []
        for _ in range(num_layers):
            if cell == "shared":
                layer = SharedWeightRNN(hidden_size, 1, nonlinearity)
            else:
                layer = _new_layer(layer_cls, cell, hidden_size, hidden_size, 1, nonlinearity, weight_drop)
            layers.append(layer)
        self.rnn = nn.ModuleList(layers)
        self.drop = nn.Dropout(dropout)
        self.input_drop = VariationalDropout(input_drop)
        self.hidden_drop = VariationalDropout(hidden_drop)
        self.output_drop = VariationalDropout(output_drop)
        self.embed_drop = embed_drop
        self.h_o = nn.Linear(hidden_size, vocab_sz)
        if tie_weights:
            self.h_o.weight = self.i_h.weight
            # N(0,1) embeddings, now also output weights, would start with huge logits
            nn.init.uniform_(self.i_h.weight, -0.1, 0.1)
        self._init_state(cell, num_layers, hidden_size)

    def forward(self, x: Tensor) -> Tensor:  # x [B,T] -> logits [B,T,V]
        self._state_for(x.shape[0])
        e = embedding_dropout(self.i_h, x, self.embed_drop, self.training).transpose(0, 1)  # [T,B,H]
        out = self.input_drop(self.drop(e))
        states = []
        for layer, module in enumerate(self.rnn):
            if layer:
                out = self.hidden_drop(self.drop(out))  # between layers
            state = tuple(s[layer : layer + 1] for s in self.h) if self.cell == "lstm" else self.h[layer : layer + 1]
            out, state = module(out, state)  # [T,B,H]; [1,B,H] or (h, c)
            states.append(state)
        # truncated BPTT: the next batch's gradients stop here
        self.h = _detach(tuple(map(torch.cat, zip(*states))) if self.cell == "lstm" else torch.cat(states))
        self.raw_out = out
        self.out = self.output_drop(self.drop(out))
        return self.h_o(self.out.transpose(0, 1))  # [B,T,V]


class LMModel5(_StackState):
    """Fastbook's LMModel5: embedding -> a 2-layer Elman RNN (nn.RNN's tanh) -> output, stateful.

    The book's nn.RNN is rnnlm_ext.RNN here (layer_cls=torch.nn.RNN for comparisons). LMModel6
    and LMModel7 are this model on the LSTM; dropout acts on the last layer's output only (plain
    dropout, as the book's nn.Dropout) and tie_weights shares the embedding with the output layer.
    """

    predicts_all = True
    cell = "rnn"

    def __init__(
        self,
        vocab_sz: int,
        hidden_size: int,
        num_layers: int = 2,
        nonlinearity: str = "tanh",
        dropout: float = 0.0,
        tie_weights: bool = False,
        layer_cls: type[nn.Module] | None = None,
    ):
        super().__init__()
        self.i_h = nn.Embedding(vocab_sz, hidden_size)
        layer_cls = layer_cls or layer_class("fused", self.cell)
        self.rnn = _new_layer(layer_cls, self.cell, hidden_size, hidden_size, num_layers, nonlinearity)
        self.drop = nn.Dropout(dropout)
        self.h_o = nn.Linear(hidden_size, vocab_sz)
        if tie_weights:
            self.h_o.weight = self.i_h.weight  # as the book: the embedding's N(0,1) initialisation stays
        self._init_state(self.cell, num_layers, hidden_size)

    def forward(self, x: Tensor) -> Tensor:  # x [B,T] -> logits [B,T,V]
        raw, h = self.rnn(self.i_h(x).transpose(0, 1), self._state_for(x.shape[0]))  # [T,B,H]
        self.h = _detach(h)  # truncated BPTT: the next batch's gradients stop here
        self.raw_out, self.out = raw, self.drop(raw)
        return self.h_o(self.out.transpose(0, 1))  # [B,T,V]


class LMModel6(LMModel5):
    """Fastbook's LMModel6: LMModel5 on a 2-layer LSTM, which carries (h, c) across batches."""

    cell = "lstm"


class LMModel7(LMModel6):
    """Fastbook's LMModel7: LMModel6 with dropout before the output layer and tied weights; the
    book trains it with AR and TAR on that output (train's ar and tar)."""

    def __init__(self, vocab_sz: int, hidden_size: int, num_layers: int = 2, dropout: float = 0.4, **kw):
        super().__init__(vocab_sz, hidden_size, num_layers, dropout=dropout, **{"tie_weights": True, **kw})


CELLS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}  # cell -> the layer's class name
LAYER_CLASSES = {"fused": rnnlm_ext, "torch": nn}  # impl -> where its layer classes live
MODELS = ("rnn", "shared", "lmmodel1", "lmmodel2", "lmmodel3", "lmmodel4", "lmmodel5", "lmmodel6", "lmmodel7")
FASTBOOK_MODELS = {"lmmodel1": LMModel1, "lmmodel2": LMModel2, "lmmodel3": LMModel3, "lmmodel4": LMModel4}
STACK_MODELS = {"lmmodel5": LMModel5, "lmmodel6": LMModel6, "lmmodel7": LMModel7}  # the book's on a recurrent layer


def build_model(
    name: str,
    vocab_sz: int,
    hidden_size: int = 64,
    num_layers: int = 1,
    nonlinearity: str = "relu",
    dropout: float = 0.0,
    tie_weights: bool = False,
    impl: str = "fused",
    cell: str = "rnn",
    **awd: float,
) -> nn.Module:
    """A model by its CLI name: 'rnn' and 'shared' are RNNLM cells (awd: RNNLM's embed_drop, input_drop,
    hidden_drop, output_drop, weight_drop), 'lmmodel1'..'lmmodel7' fastbook's (lmmodel5-7 on impl's layer)."""
    if name == "rnn":
        layer_cls = layer_class(impl, cell)
        return RNNLM(vocab_sz, hidden_size, num_layers, nonlinearity, dropout, tie_weights, cell, layer_cls, **awd)
    if name == "shared":
        return RNNLM(vocab_sz, hidden_size, num_layers, nonlinearity, dropout, tie_weights, "shared", **awd)
    if name in STACK_MODELS:
        model_cls = STACK_MODELS[name]
        layer_cls = layer_class(impl, model_cls.cell)
        return model_cls(
            vocab_sz,
            hidden_size,
            num_layers,
            dropout=dropout,
            tie_weights=tie_weights,
            layer_cls=layer_cls,
            **({"nonlinearity": nonlinearity} if model_cls.cell == "rnn" else {}),
        )
    if name not in FASTBOOK_MODELS:
        raise SettingError(f"model must be one of {', '.join(MODELS)}, got {name!r}", "model")
    return FASTBOOK_MODELS[name](vocab_sz, hidden_size)


def reset_state(model: nn.Module) -> None:
    """Start a stateful model from a zero hidden state (a no-op for stateless ones)."""
    if hasattr(model, "reset"):
        model.reset()
