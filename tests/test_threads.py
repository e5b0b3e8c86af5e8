"""Results that do not depend on the thread count: the CPU op gives bitwise the same forward and
gradients at 1, 2, 3 and 8 threads, as nn.RNN does, on every schedule of its time loop."""

import pytest
import torch
from helpers import GRAD_NAMES, make_inputs

from rnnlm_ext import ops

THREAD_COUNTS = [1, 2, 3, 8]

# Which schedule runs (csrc/cpu_threads.h) depends on the shape and the thread count: at one
# thread the loop runs alone; at H = 64 and 128 a helper thread does the batched GEMMs beside the
# loop, in chunks of max(1, 64 // B) steps; H = 400 shares the loop's columns among 3 and 8
# threads (helper at 2), H = 1100 among 2, 3 and 8 (8 uneven blocks of columns).
SHAPES = [  # T, B, I, H, nonlinearity, reverse
    (16, 64, 64, 64, "tanh", False),
    (40, 32, 20, 128, "tanh", True),
    (30, 5, 7, 33, "relu", False),
    (9, 6, 5, 400, "relu", True),
    (6, 8, 16, 1100, "tanh", False),
    (5, 3, 9, 1100, "tanh", True),
]


def forward_and_grads(inputs, dout, nonlinearity, reverse):
    out = ops.rnn_layer(*inputs, nonlinearity, reverse)
    return [out.detach(), *torch.autograd.grad(out, inputs, dout)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,B,I,H,nonlinearity,reverse", SHAPES)
def test_bitwise_identical_at_every_thread_count(T, B, I, H, nonlinearity, reverse, dtype, num_threads):
    inputs = make_inputs(T, B, I, H, dtype)
    dout = torch.randn(T, B, H, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = {}
    for n in THREAD_COUNTS:
        num_threads(n)
        results[n] = forward_and_grads(inputs, dout, nonlinearity, reverse)
    for n in THREAD_COUNTS[1:]:
        for name, a, b in zip(["out", *GRAD_NAMES], results[1], results[n]):
            diff = (a - b).abs().max().item()
            assert torch.equal(a, b), f"{name} at {n} threads differs from 1 thread by up to {diff:.3e}"
