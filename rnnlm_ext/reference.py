"""The readable definition of what the fused kernels compute (Elman, LSTM, GRU), in plain PyTorch.

Everything here is a loop over time steps with autograd through every step: slow, obviously
right. The tests hold the kernels to it; rnnlm_ext.RNN, LSTM and GRU fall back to it when the compiled
extension is missing.
"""

from __future__ import annotations

import torch
from torch import Tensor

NONLINEARITIES = ("tanh", "relu")  # the activations every layer and op accepts
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def rnn_layer(
    x: Tensor,  # [T,B,I]
    h0: Tensor,  # [B,H]
    w_ih: Tensor,  # [H,I]
    w_hh: Tensor,  # [H,H]
    bias: Tensor | None = None,  # [H]: b_ih + b_hh
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


def lstm_layer(
    x: Tensor,  # [T,B,I]
    h0: Tensor,  # [B,H]
    c0: Tensor,  # [B,H]
    w_ih: Tensor,  # [4H,I]: rows i, f, g, o
    w_hh: Tensor,  # [4H,H]
    bias: Tensor | None = None,  # [4H]: b_ih + b_hh
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One LSTM layer over a whole sequence, torch.nn.LSTM's cell (gate order i, f, g, o):

    i, f, g, o = σ, σ, tanh, σ of x[t]·w_ihᵀ + h·w_hhᵀ + bias;  c = f⊙c + i⊙g;  h = o⊙tanh(c)

    h, c are h0, c0 at the first step; with reverse=True the steps run from t = T-1 down to 0.
    Returns (out [T,B,H], c [T,B,H]): every step's hidden and cell state, indexed by input position.
    """
    T = x.shape[0]
    steps = range(T - 1, -1, -1) if reverse else range(T)
    outs: list = [None] * T
    cells: list = [None] * T
    h, c = h0, c0  # [B,H]
    for t in steps:
        a = x[t] @ w_ih.T + h @ w_hh.T  # [B,4H]
        i, f, g, o = (a if bias is None else a + bias).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs[t], cells[t] = h, c
    return torch.stack(outs), torch.stack(cells)  # [T,B,H] each


def gru_layer(
    x: Tensor,  # [T,B,I]
    h0: Tensor,  # [B,H]
    w_ih: Tensor,  # [3H,I]: rows r, z, n
    w_hh: Tensor,  # [3H,H]
    b_ih: Tensor | None = None,  # [3H]
    b_hh: Tensor | None = None,  # [3H]: both biases or neither
    reverse: bool = False,
) -> Tensor:
    """One GRU layer over a whole sequence, torch.nn.GRU's cell (gate order r, z, n):

    gi = x[t]·w_ihᵀ + b_ih;  gh = h·w_hhᵀ + b_hh;  r, z = σ(gi_r + gh_r), σ(gi_z + gh_z)
    n = tanh(gi_n + r⊙gh_n);  h = (1 − z)⊙n + z⊙h

    b_hh's n block stays inside r⊙(…), so the two biases cannot be merged. h is h0 at the
    first step; reverse=True runs t = T-1 down to 0. Returns out [T,B,H], indexed by input position.
    """
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must be both given or both None")
    T = x.shape[0]
    steps = range(T - 1, -1, -1) if reverse else range(T)
    outs: list = [None] * T
    h = h0  # [B,H]
    for t in steps:
        gi, gh = x[t] @ w_ih.T, h @ w_hh.T  # [B,3H] each
        if b_ih is not None:
            gi, gh = gi + b_ih, gh + b_hh
        gi_r, gi_z, gi_n = gi.chunk(3, dim=1)
        gh_r, gh_z, gh_n = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(gi_r + gh_r), torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        h = (1 - z) * n + z * h
        outs[t] = h
    return torch.stack(outs)  # [T,B,H]
