"""Sampling text from a trained language model, one token at a time."""

from __future__ import annotations

import math

import torch
from torch import nn

from rnnlm_ext.lm import data, models
from rnnlm_ext.lm.errors import SettingError


@torch.no_grad()
def generate(
    model: nn.Module, vocab: data.Vocab, level: str, prompt: str, n_tokens: int, temperature: float = 1.0, seed: int = 0
) -> str:
    """The prompt followed by n_tokens sampled one at a time, the hidden state carried through the prompt.

    Stateful models read the prompt once and then one token per step; the stateless ones
    (LMModel1, LMModel2) are given the last tokens again at every step (their whole context).
    """
    if n_tokens < 0:
        raise SettingError(f"n_tokens must be >= 0, got {n_tokens}", "n_tokens")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise SettingError(
            f"temperature must be a finite number >= 0 (0: the most likely token), got {temperature}", "temperature"
        )
    tokens = list(prompt) if level == "char" else prompt.split()
    if not tokens:
        raise SettingError("prompt must hold at least one token", "prompt")
    # LMModel1 reads exactly its first three tokens: give it the last three, not the first
    context = 3 if type(model) is models.LMModel1 else len(tokens)
    if len(tokens) < context:
        raise SettingError(f"prompt must hold at least {context} tokens for lmmodel1, got {len(tokens)}", "prompt")
    ids = vocab.encode(tokens)  # [N]
    gen = torch.Generator().manual_seed(seed)
    stateful = hasattr(model, "reset")
    models.reset_state(model)
    x = ids[None, -context:]  # [1,N] (the last three for LMModel1)
    out = []
    for _ in range(n_tokens):
        logits = model(x)
        logits = logits[0, -1] if getattr(model, "predicts_all", False) else logits[0]  # [V]
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            next_id = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        out.append(next_id)
        ids = torch.cat([ids, torch.tensor([next_id])])
        x = ids[None, -1:] if stateful else ids[None, -x.shape[1] :]
    sep = "" if level == "char" else " "
    return sep.join(tokens + vocab.decode(out))
