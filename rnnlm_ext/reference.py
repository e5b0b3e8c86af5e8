"""The readable definition of what the fused kernel computes, in plain PyTorch, and the seed's models.

Everything here is a loop over time steps with autograd through every step: slow, obviously
right. The tests hold the kernels to it; rnnlm_ext.RNN falls back to it when the compiled
extension is missing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NONLINEARITIES = ("tanh", "relu")  # the activations every layer and op accepts
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def rnn_layer(
    x: Tensor,  # [T,B,I]
    h0: Tensor,  # [B,H]
    w_ih: Tensor,  # [H,I]
    w_hh: Tensor,  # [H,H]
    bias: Optional[Tensor] = None,  # [H]: b_ih + b_hh
    nonlinearity: str = "tanh",
    reverse: bool = False,
) -> Tensor:
    """One Elman RNN layer over a whole sequence: out[t] = act(x[t]·w_ihᵀ + h·w_hhᵀ + bias).

    h is h0 at the first step and the previous step's output after it; with reverse=True the
    steps run from t = T-1 down to 0. Returns out [T,B,H], every step's hidden state, indexed
    by the input position it belongs to.
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    act = ACTIVATIONS[nonlinearity]
    T = x.shape[0]
    steps = range(T - 1, -1, -1) if reverse else range(T)
    outs: list = [None] * T
    h = h0  # [B,H]
    for t in steps:
        z = x[t] @ w_ih.T + h @ w_hh.T  # [B,H]
        h = act(z if bias is None else z + bias)
        outs[t] = h
    return torch.stack(outs)  # [T,B,H]


class SimpleLM(nn.Module):
    """The seed's first language model (fastbook's LMModel1): three words in, the next one out.

    One embedding, one hidden layer applied three times with the same weights, one output
    layer; each word's embedding is added to the hidden state before the shared layer.
    """

    def __init__(self, vocab_sz: int, n_hidden: int):
        super().__init__()
        self.i_h = nn.Embedding(vocab_sz, n_hidden)
        self.h_h = nn.Linear(n_hidden, n_hidden)
        self.h_o = nn.Linear(n_hidden, vocab_sz)

    def forward(self, x: Tensor) -> Tensor:  # x: [B,3] token ids -> [B,vocab] logits
        h = F.relu(self.h_h(self.i_h(x[:, 0])))
        h = h + self.i_h(x[:, 1])
        h = F.relu(self.h_h(h))
        h = h + self.i_h(x[:, 2])
        h = F.relu(self.h_h(h))
        return self.h_o(h)


class SimpleLMRNN(SimpleLM):
    """The seed's second model (fastbook's LMModel2): SimpleLM with its steps as a loop.

    h = relu(W·(h + e_t) + b) for every input word e_t, starting from h = 0: the Elman cell
    with w_ih = w_hh = W, which is how rnnlm_ext runs it through the fused op.
    """

    def forward(self, x: Tensor) -> Tensor:  # x: [B,T] token ids -> [B,vocab] logits
        h = x.new_zeros((), dtype=self.h_h.weight.dtype)
        for t in range(x.shape[1]):
            h = h + self.i_h(x[:, t])
            h = F.relu(self.h_h(h))
        return self.h_o(h)
