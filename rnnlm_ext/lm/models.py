"""Language models: fastbook chapter 12's four (LMModel1..4) and RNNLM on the fused layer.

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

from rnnlm_ext.lm.errors import SettingError
from rnnlm_ext.rnn import LAYER_IMPLS, RNN


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


class RNNLM(nn.Module):
    """Embedding -> recurrent stack -> linear output, trained with stateful truncated BPTT.

    cell='rnn' runs rnn_cls (rnnlm_ext.RNN by default; torch.nn.RNN has the same interface and
    weights, for comparisons); cell='shared' runs LMModel4's shared-weight cell (SharedWeightRNN).
    dropout applies to the embeddings, between layers and before the output layer. tie_weights
    shares the embedding matrix with the output layer (the embedding size is hidden_size).
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
        rnn_cls=RNN,
    ):
        super().__init__()
        self.i_h = nn.Embedding(vocab_sz, hidden_size)
        if cell == "rnn":
            self.rnn = rnn_cls(
                hidden_size, hidden_size, num_layers, nonlinearity, dropout=dropout if num_layers > 1 else 0.0
            )
        elif cell == "shared":
            self.rnn = SharedWeightRNN(hidden_size, num_layers, nonlinearity, dropout)
        else:
            raise ValueError(f"cell must be 'rnn' or 'shared', got {cell!r}")
        self.drop = nn.Dropout(dropout)
        self.h_o = nn.Linear(hidden_size, vocab_sz)
        if tie_weights:
            self.h_o.weight = self.i_h.weight
            # N(0,1) embeddings, now also output weights, would start with huge logits
            nn.init.uniform_(self.i_h.weight, -0.1, 0.1)
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.h: Tensor | None = None  # [L,B,H]

    def reset(self) -> None:
        self.h = None

    def forward(self, x: Tensor) -> Tensor:  # x [B,T] -> logits [B,T,V]
        B = x.shape[0]
        if self.h is None or self.h.shape[1] != B:
            self.h = self.h_o.weight.new_zeros(self.num_layers, B, self.hidden_size)
        e = self.drop(self.i_h(x)).transpose(0, 1)  # [T,B,H]
        out, h = self.rnn(e, self.h)  # [T,B,H], [L,B,H]
        self.h = h.detach()  # truncated BPTT: the next batch's gradients stop here
        return self.h_o(self.drop(out.transpose(0, 1)))  # [B,T,V]


MODELS = ("rnn", "shared", "lmmodel1", "lmmodel2", "lmmodel3", "lmmodel4")
FASTBOOK_MODELS = {"lmmodel1": LMModel1, "lmmodel2": LMModel2, "lmmodel3": LMModel3, "lmmodel4": LMModel4}


def build_model(
    name: str,
    vocab_sz: int,
    hidden_size: int = 64,
    num_layers: int = 1,
    nonlinearity: str = "relu",
    dropout: float = 0.0,
    tie_weights: bool = False,
    rnn_cls=RNN,
) -> nn.Module:
    """A model by its CLI name: 'rnn' and 'shared' are RNNLM cells, 'lmmodel1'..'lmmodel4' fastbook's."""
    if name in ("rnn", "shared"):
        return RNNLM(vocab_sz, hidden_size, num_layers, nonlinearity, dropout, tie_weights, cell=name, rnn_cls=rnn_cls)
    if name not in FASTBOOK_MODELS:
        raise SettingError(f"model must be one of {', '.join(MODELS)}, got {name!r}", "model")
    return FASTBOOK_MODELS[name](vocab_sz, hidden_size)


def reset_state(model: nn.Module) -> None:
    """Start a stateful model from a zero hidden state (a no-op for stateless ones)."""
    if hasattr(model, "reset"):
        model.reset()
