"""Language models: the seed's four (fastbook chapter 12's LMModel1..4) and RNNLM on the fused layer.

Dimension letters: B batch rows, T steps (bptt), V vocabulary, H hidden units, L layers.
Every model takes token ids x [B,T] and returns logits for every position [B,T,V] when it has
`predicts_all = True`, else for the token after the last one only [B,V] (the seed's first three).
Stateful models keep their hidden state `h` across calls (row j of one batch continues row j of
the previous one), detach it after every call, and start again from zeros after reset() or when
the batch size changes. The last batch of an epoch is shorter in time, never in rows, so the
state carries through it; a new batch size only comes with a new stream (validation, generation).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlm_ext import reference
from rnnlm_ext import rnn as fused_rnn
from rnnlm_ext.rnn import RNN

LMModel1 = reference.SimpleLM  # three steps written out
LMModel2 = reference.SimpleLMRNN  # the same as a loop


class LMModel3(LMModel2):
    """LMModel2 made stateful: the hidden state is kept across batches, detached, and reset()."""

    predicts_all = False

    def __init__(self, vocab_sz: int, n_hidden: int):
        super().__init__(vocab_sz, n_hidden)
        self.h: Optional[Tensor] = None  # [B,H]

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


class SeedRNN(nn.Module):
    """The seed's cell as a stack of fused layers: h = act(W·(h + x_t) + b), one W per layer.

    It is the Elman cell with W_ih = W_hh = W: the fused op gets W twice and autograd sums the
    two gradients. Same call convention as nn.RNN (x [T,B,H], h0 [L,B,H] -> out, h_n).
    """

    def __init__(self, hidden_size: int, num_layers: int = 1, nonlinearity: str = "relu", dropout: float = 0.0):
        super().__init__()
        bound = hidden_size ** -0.5  # nn.Linear's initialisation, as the seed's h_h had
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-bound, bound)) for _ in range(num_layers)
        )
        self.bias = nn.ParameterList(
            nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound)) for _ in range(num_layers)
        )
        self.nonlinearity = nonlinearity
        self.dropout = dropout

    def forward(self, x: Tensor, h0: Tensor):
        h_n = []
        for layer, (W, b) in enumerate(zip(self.weight, self.bias)):
            x = fused_rnn._layer(x, h0[layer], W, W, b, self.nonlinearity)  # [T,B,H]
            h_n.append(x[-1])
            if self.training and self.dropout and layer < len(self.weight) - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, torch.stack(h_n)


class RNNLM(nn.Module):
    """Embedding -> recurrent stack -> linear output, trained with stateful truncated BPTT.

    cell='rnn' runs rnn_cls (rnnlm_ext.RNN by default; torch.nn.RNN has the same interface and
    weights, for comparisons); cell='seed' runs the seed's shared-weight cell (SeedRNN).
    dropout applies to the embeddings, between layers and before the output layer. tie_weights
    shares the embedding matrix with the output layer (the embedding size is H).
    """

    predicts_all = True

    def __init__(self, vocab_sz: int, n_hidden: int = 64, num_layers: int = 1, nonlinearity: str = "relu",
                 dropout: float = 0.0, tie_weights: bool = False, cell: str = "rnn", rnn_cls=RNN):
        super().__init__()
        self.i_h = nn.Embedding(vocab_sz, n_hidden)
        if cell == "rnn":
            self.rnn = rnn_cls(n_hidden, n_hidden, num_layers, nonlinearity, dropout=dropout if num_layers > 1 else 0.0)
        elif cell == "seed":
            self.rnn = SeedRNN(n_hidden, num_layers, nonlinearity, dropout)
        else:
            raise ValueError(f"cell must be 'rnn' or 'seed', got {cell!r}")
        self.drop = nn.Dropout(dropout)
        self.h_o = nn.Linear(n_hidden, vocab_sz)
        if tie_weights:
            self.h_o.weight = self.i_h.weight
            # N(0,1) embeddings, now also output weights, would start with huge logits
            nn.init.uniform_(self.i_h.weight, -0.1, 0.1)
        self.num_layers, self.n_hidden = num_layers, n_hidden
        self.h: Optional[Tensor] = None  # [L,B,H]

    def reset(self) -> None:
        self.h = None

    def forward(self, x: Tensor) -> Tensor:  # x [B,T] -> logits [B,T,V]
        B = x.shape[0]
        if self.h is None or self.h.shape[1] != B:
            self.h = self.h_o.weight.new_zeros(self.num_layers, B, self.n_hidden)
        e = self.drop(self.i_h(x)).transpose(0, 1)  # [T,B,H]
        out, h = self.rnn(e, self.h)  # [T,B,H], [L,B,H]
        self.h = h.detach()  # truncated BPTT: the next batch's gradients stop here
        return self.h_o(self.drop(out.transpose(0, 1)))  # [B,T,V]


MODELS = ("rnn", "seed", "lmmodel1", "lmmodel2", "lmmodel3", "lmmodel4")


def build_model(name: str, vocab_sz: int, n_hidden: int = 64, num_layers: int = 1, nonlinearity: str = "relu",
                dropout: float = 0.0, tie_weights: bool = False, rnn_cls=RNN) -> nn.Module:
    """A model by its CLI name: 'rnn' and 'seed' are RNNLM cells, 'lmmodel1'..'lmmodel4' the seed's."""
    if name in ("rnn", "seed"):
        return RNNLM(vocab_sz, n_hidden, num_layers, nonlinearity, dropout, tie_weights, cell=name, rnn_cls=rnn_cls)
    seed_models = {"lmmodel1": LMModel1, "lmmodel2": LMModel2, "lmmodel3": LMModel3, "lmmodel4": LMModel4}
    if name not in seed_models:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")
    return seed_models[name](vocab_sz, n_hidden)


def reset_state(model: nn.Module) -> None:
    """Start a stateful model from a zero hidden state (a no-op for stateless ones)."""
    if hasattr(model, "reset"):
        model.reset()
