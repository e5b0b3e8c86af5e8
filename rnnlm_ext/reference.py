"""The readable definition of what the fused kernel computes, in plain PyTorch.

Everything here is a loop over time steps with autograd through every step: slow, obviously
right. The tests hold the kernels to it; rnnlm_ext.RNN falls back to it when the compiled
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
