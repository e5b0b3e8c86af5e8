"""Typed wrappers of torch.ops.rnnlm_ext.*: fake kernels (for torch.compile) and autograd.

The chain: rnnlm_ext.RNN -> rnn_layer() here -> torch.ops.rnnlm_ext.rnn_forward (a custom op
with a fake kernel and a registered autograd formula) -> the compiled kernel in csrc/. The
autograd formula calls rnn_backward, the hand-written backward: no autograd through steps.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from rnnlm_ext._extension import _C  # registers torch.ops.rnnlm_ext.*; refuses another torch release
from rnnlm_ext.reference import NONLINEARITIES


def rnn_layer(
    x: Tensor,  # [T,B,I]
    h0: Tensor,  # [B,H]
    w_ih: Tensor,  # [H,I]
    w_hh: Tensor,  # [H,H]
    bias: Tensor | None = None,  # [H]: b_ih + b_hh
    nonlinearity: str = "tanh",
    reverse: bool = False,
) -> Tensor:
    """One RNN layer, one direction, whole sequence, fused: returns out [T,B,H].

    out[t] = act(x[t]·w_ihᵀ + out[t-1]·w_hhᵀ + bias), out[-1] being h0; with reverse=True the
    steps run from the last to the first (out[t+1] feeds out[t]). The final hidden state is
    out[-1] (out[0] when reversed). On a GPU the time loop takes the CUDA path in effect
    (force_cuda_path); the CPU kernel has one loop and ignores it.
    """
    return torch.ops.rnnlm_ext.rnn_forward(x, h0, w_ih, w_hh, bias, nonlinearity, reverse, _requested_cuda_path())


def _check_like(name: str, t: Tensor | None, shape: list[int], x: Tensor) -> None:
    """A tensor argument of the fake kernels (None skipped): its shape, and x's dtype and device."""
    if t is None:
        return
    torch._check(list(t.shape) == shape, lambda: f"rnnlm_ext: {name} must have shape {shape}, got {list(t.shape)}")
    torch._check(
        t.dtype == x.dtype,
        lambda: f"rnnlm_ext: {name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match",
    )
    torch._check(
        t.device == x.device,
        lambda: f"rnnlm_ext: {name} is on {t.device} but x is on {x.device}; all tensors must be on one device",
    )


def _check_args(nonlinearity: str, x: Tensor, w_hh: Tensor, **others: Tensor | None) -> tuple[int, int, int, int]:
    """The kernels' argument checks (csrc/rnn_args.h), for the fake kernels: the
    nonlinearity, shapes from x [T,B,I] and w_hh [H,H], one dtype and one device. Returns
    T, B, I, H. Every tensor but bias is required (None is what reaches a fake kernel for it)."""
    for name, t in (("x", x), ("w_hh", w_hh), *others.items()):
        torch._check(t is not None or name == "bias", lambda: f"rnnlm_ext: {name} is required, got None")
    torch._check(
        nonlinearity in NONLINEARITIES,
        lambda: f"rnnlm_ext: nonlinearity must be 'tanh' or 'relu', got '{nonlinearity}'",
    )
    torch._check(x.dim() == 3, lambda: f"rnnlm_ext: x must be 3-D [T,B,I], got {x.dim()}-D")
    torch._check(x.dtype.is_floating_point, lambda: f"rnnlm_ext: x must be a floating-point tensor, got {x.dtype}")
    torch._check(w_hh.dim() == 2, lambda: f"rnnlm_ext: w_hh must be 2-D [H,H], got shape {list(w_hh.shape)}")
    T, B, I = x.shape
    H = w_hh.shape[0]
    torch._check(
        T >= 1 and B >= 1 and I >= 1 and H >= 1,
        lambda: f"rnnlm_ext: T, B, I and H must all be >= 1, got x {list(x.shape)} and w_hh {list(w_hh.shape)}",
    )
    shapes = {"w_hh": [H, H], "w_ih": [H, I], "h0": [B, H], "bias": [H], "dout": [T, B, H], "out": [T, B, H]}
    for name, t in (("w_hh", w_hh), *others.items()):
        _check_like(name, t, shapes[name], x)
    return T, B, I, H


def _check_output_mask(output_mask: Sequence[bool], names: str) -> None:
    """A backward op's output_mask has one entry per gradient it returns, `names` in order."""
    count = len(names.split(", "))
    torch._check(
        len(output_mask) == count,
        lambda: f"rnnlm_ext: output_mask must have {count} entries ({names}), got {len(output_mask)}",
    )


@torch.library.register_fake("rnnlm_ext::rnn_forward")
def _rnn_forward_fake(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor | None,
    nonlinearity: str,
    reverse: bool,
    cuda_path: str = "auto",
) -> Tensor:
    T, B, _, H = _check_args(nonlinearity, x, w_hh, w_ih=w_ih, h0=h0, bias=bias)
    return x.new_empty((T, B, H))


@torch.library.register_fake("rnnlm_ext::rnn_backward")
def _rnn_backward_fake(
    dout: Tensor,
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    out: Tensor,
    nonlinearity: str,
    reverse: bool,
    output_mask: Sequence[bool],
    cuda_path: str = "auto",
) -> tuple[Tensor, ...]:
    _check_args(nonlinearity, x, w_hh, w_ih=w_ih, h0=h0, dout=dout, out=out)
    _check_output_mask(output_mask, "dx, dh0, dw_ih, dw_hh, db")
    shapes = (x.shape, h0.shape, w_ih.shape, w_hh.shape, (w_hh.shape[0],))
    return _masked_grads(x, shapes, output_mask)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, h0, w_ih, w_hh, bias, nonlinearity, reverse, cuda_path = inputs
    # act' is a function of the output alone, so the output is all the backward keeps
    ctx.save_for_backward(x, h0, w_ih, w_hh, output)
    ctx.nonlinearity = nonlinearity
    ctx.reverse = reverse
    ctx.cuda_path = cuda_path  # the backward's time loop takes the forward's path


def _backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
    if torch.is_grad_enabled():  # create_graph=True: the gradient would itself be differentiated
        raise RuntimeError(
            "rnnlm_ext: the fused RNN's backward is not differentiable (no double backward, "
            "create_graph=True): its gradients would differentiate as zero. For higher-order "
            "gradients use torch.nn.RNN or rnnlm_ext.reference.rnn_layer."
        )
    x, h0, w_ih, w_hh, out = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:5])  # x, h0, w_ih, w_hh, bias
    grads = torch.ops.rnnlm_ext.rnn_backward(
        dout, x, h0, w_ih, w_hh, out, ctx.nonlinearity, ctx.reverse, mask, cuda_path=ctx.cuda_path
    )
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None, None, None)


torch.library.register_autograd("rnnlm_ext::rnn_forward", _backward, setup_context=_setup_context)


def build_info() -> dict:
    """How the compiled extension was built (compiler, flags, CPU paths, CUDA or not)."""
    return dict(_C.build_info())


# ----------------------------------------------------------------------------------------
# CUDA: which implementation of the time loop runs (csrc/rnn_cuda.h). "persistent" (one
# cooperative kernel for the whole sequence, w_hh kept in shared memory) where the shape fits
# the GPU, else "per_step" (a cuBLAS GEMM and a fused pointwise kernel per step). The choice
# is an argument of the ops; rnn_layer passes the one in effect: force_cuda_path()'s inside
# its block (per thread and per asyncio task: a context variable), else the environment
# variable RNNLM_EXT_CUDA_PATH = auto | persistent | per_step as it was at import, else "auto".
CUDA_PATHS = ("per_step", "persistent")  # the values torch.ops.rnnlm_ext.cuda_path returns: 0, 1
CUDA_PATH_ENV = "RNNLM_EXT_CUDA_PATH"


def _checked_cuda_path(path: str, what: str) -> str:
    if path not in CUDA_PATHS + ("auto",):
        raise ValueError(f"{what} must be 'auto', 'persistent' or 'per_step', got {path!r}")
    return path


# the default is a str (immutable), read from the environment once, at import
_cuda_path: contextvars.ContextVar[str] = contextvars.ContextVar(
    "rnnlm_ext_cuda_path",
    default=_checked_cuda_path(os.environ.get(CUDA_PATH_ENV) or "auto", CUDA_PATH_ENV),  # noqa: B039
)


# torch.compile cannot trace a context variable, so it takes the path in effect when it traces
# as a constant: a compiled function keeps the path it was first compiled under.
@torch.compiler.assume_constant_result
def _requested_cuda_path() -> str:
    return _cuda_path.get()


def cuda_path(B: int, H: int, dtype: torch.dtype = torch.float32, path: str | None = None) -> str | None:
    """Which CUDA implementation an Elman layer (RNN) with batch B and H hidden units of `dtype`
    runs on the current GPU: "persistent" or "per_step" (T does not matter). The LSTM and GRU
    have only "per_step"; asking them for "persistent" raises.

    path: what is asked for ("auto", "persistent", "per_step"); None takes the one in effect
    (force_cuda_path, else RNNLM_EXT_CUDA_PATH). Returns None where "persistent" is asked for
    but cannot run that shape: the ops would raise.
    """
    if not build_info()["cuda"]:
        raise RuntimeError("rnnlm_ext was built without CUDA kernels (a CPU-only torch or no nvcc)")
    path = _checked_cuda_path(path, "path") if path is not None else _cuda_path.get()
    code = torch.ops.rnnlm_ext.cuda_path(B, H, dtype, path)
    return None if code < 0 else CUDA_PATHS[code]


@contextlib.contextmanager
def force_cuda_path(path: str) -> Iterator[None]:
    """Run the CUDA ops called inside the block, in this thread (or asyncio task), with `path`
    ("persistent", "per_step" or "auto"). Forcing "persistent" where it cannot run makes the
    ops raise (ask cuda_path(B, H, dtype, "persistent") first). torch.compile takes the path in
    effect when it compiles a function, and keeps it."""
    token = _cuda_path.set(_checked_cuda_path(path, "path"))
    try:
        yield
    finally:
        _cuda_path.reset(token)


# ----------------------------------------------------------------------------------------
# GRU (csrc/gru.h): gru_forward returns out [T,B,H] and, when train, saved [T,B,4H] (r, z, n
# and gh_n = h_{t-1}·W_hnᵀ + b_hn per step, what the backward needs); gru_backward is the
# hand-written backward.


def _wants_grad(*inputs: Tensor | None) -> bool:
    """Whether a gradient can be asked for: grad mode on and an input requiring grad. The gated
    ops keep what their backward needs only then (their train flag)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


def gru_layer(
    x: Tensor,  # [T,B,I]
    h0: Tensor,  # [B,H]
    w_ih: Tensor,  # [3H,I]: rows r, z, n
    w_hh: Tensor,  # [3H,H]
    b_ih: Tensor | None = None,  # [3H]
    b_hh: Tensor | None = None,  # [3H]: both biases or neither
    reverse: bool = False,
) -> Tensor:
    """One GRU layer, one direction, whole sequence, fused: returns out [T,B,H].

    torch.nn.GRU's cell with its gate order (r, z, n) and bias placement; with reverse=True
    the steps run from the last to the first. The final hidden state is out[-1] (out[0] when
    reversed). The forward keeps what the backward needs only when a gradient can be asked
    for (grad mode on and an input requiring grad).
    """
    train = _wants_grad(x, h0, w_ih, w_hh, b_ih, b_hh)
    out, _ = torch.ops.rnnlm_ext.gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, train, _requested_cuda_path())
    return out


def _check_gated_args(n_gates, x, h0, w_ih, w_hh, **others):
    """csrc/rnn_args.h's checks of the gated cells (GRU 3 gates, LSTM 4), for the fake kernels:
    shapes from x [T,B,I] and w_hh [n_gates·H,H], one dtype and one device. Returns T, B, I, H."""
    torch._check(x.dim() == 3, lambda: f"rnnlm_ext: x must be 3-D [T,B,I], got {x.dim()}-D")
    torch._check(x.dtype.is_floating_point, lambda: f"rnnlm_ext: x must be a floating-point tensor, got {x.dtype}")
    torch._check(w_hh.dim() == 2, lambda: f"rnnlm_ext: w_hh must be 2-D [{n_gates}H,H], got shape {list(w_hh.shape)}")
    T, B, I = x.shape
    H = w_hh.shape[1]
    torch._check(
        T >= 1 and B >= 1 and I >= 1 and H >= 1,
        lambda: f"rnnlm_ext: T, B, I and H must all be >= 1, got x {list(x.shape)} and w_hh {list(w_hh.shape)}",
    )
    G = n_gates * H
    shapes = {"w_hh": [G, H], "w_ih": [G, I], "h0": [B, H], "c0": [B, H], "b_ih": [G], "b_hh": [G], "bias": [G]}
    shapes.update(dout=[T, B, H], dc=[T, B, H], out=[T, B, H], c=[T, B, H], saved=[T, B, 4 * H], gates=[T, B, 4 * H])
    for name, t in (("w_hh", w_hh), ("w_ih", w_ih), ("h0", h0), *others.items()):
        _check_like(name, t, shapes[name], x)
    return T, B, I, H


def _masked_grads(x, shapes, output_mask):
    """The backward ops' fake results: each gradient of its shape where output_mask asks for
    it, an empty [0] tensor otherwise."""
    return tuple(x.new_empty(s if wanted else (0,)) for s, wanted in zip(shapes, output_mask))


@torch.library.register_fake("rnnlm_ext::gru_forward")
def _gru_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, reverse, train, cuda_path="auto"):
    T, B, _, H = _check_gated_args(3, x, h0, w_ih, w_hh)
    torch._check(
        (b_ih is None) == (b_hh is None),
        lambda: (
            "rnnlm_ext: b_ih and b_hh must be both given or both None, got b_ih "
            f"{'None' if b_ih is None else 'given'} and b_hh {'None' if b_hh is None else 'given'}"
        ),
    )
    _check_gated_args(3, x, h0, w_ih, w_hh, b_ih=b_ih, b_hh=b_hh)
    return x.new_empty((T, B, H)), x.new_empty((T, B, 4 * H) if train else (0,))


@torch.library.register_fake("rnnlm_ext::gru_backward")
def _gru_backward_fake(dout, x, h0, w_ih, w_hh, out, saved, reverse, output_mask, cuda_path="auto"):
    _check_gated_args(3, x, h0, w_ih, w_hh, dout=dout, out=out, saved=saved)
    _check_output_mask(output_mask, "dx, dh0, dw_ih, dw_hh, db_ih, db_hh")
    G = w_hh.shape[0]
    return _masked_grads(x, (x.shape, h0.shape, w_ih.shape, w_hh.shape, (G,), (G,)), output_mask)


def _gru_setup_context(ctx, inputs, output):
    x, h0, w_ih, w_hh, b_ih, b_hh, reverse, train, cuda_path = inputs
    out, saved = output
    ctx.mark_non_differentiable(saved)  # the backward's own record, not a result
    ctx.set_materialize_grads(False)  # else autograd fills a [T,B,4H] zero gradient for saved every call
    ctx.save_for_backward(x, h0, w_ih, w_hh, out, saved)
    ctx.reverse = reverse
    ctx.train = train
    ctx.cuda_path = cuda_path


def _check_gated_backward(ctx, cell, nn_name):
    """What the gated cells' backward refuses: double backward, and a forward that kept nothing."""
    if torch.is_grad_enabled():  # create_graph=True: the gradient would itself be differentiated
        raise RuntimeError(
            f"rnnlm_ext: the fused {cell.upper()}'s backward is not differentiable (no double backward, "
            "create_graph=True): its gradients would differentiate as zero. For higher-order "
            f"gradients use torch.nn.{nn_name}."
        )
    if not ctx.train:
        raise RuntimeError(
            f"rnnlm_ext: {cell}_forward ran with train=False and kept nothing for the backward; "
            f"call it with train=True ({cell}_layer does when an input requires grad)"
        )


def _gru_backward(ctx, dout, _dsaved):
    _check_gated_backward(ctx, "gru", "GRU or rnnlm_ext.reference.gru_layer")
    if dout is None:  # out's gradient is undefined (a zero autograd did not materialise): so are all
        return (None,) * 9
    x, h0, w_ih, w_hh, out, saved = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:6])  # x, h0, w_ih, w_hh, b_ih, b_hh
    grads = torch.ops.rnnlm_ext.gru_backward(dout, x, h0, w_ih, w_hh, out, saved, ctx.reverse, mask, ctx.cuda_path)
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None, None, None)


torch.library.register_autograd("rnnlm_ext::gru_forward", _gru_backward, setup_context=_gru_setup_context)


# ----------------------------------------------------------------------------------------
# LSTM (csrc/lstm.h): lstm_forward returns out and c [T,B,H] (every step's h and c) and, when
# train, gates [T,B,4H] (the activated i, f, g, o, what the backward needs); lstm_backward is
# the hand-written backward, taking the gradients of out and of c.


def lstm_layer(
    x: Tensor,  # [T,B,I]
    h0: Tensor,  # [B,H]
    c0: Tensor,  # [B,H]
    w_ih: Tensor,  # [4H,I]: rows i, f, g, o
    w_hh: Tensor,  # [4H,H]
    bias: Tensor | None = None,  # [4H]: b_ih + b_hh
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One LSTM layer, one direction, whole sequence, fused: returns (out, c), both [T,B,H].

    torch.nn.LSTM's cell with its gate order (i, f, g, o); with reverse=True the steps run from
    the last to the first. The final states are out[-1] and c[-1] (out[0], c[0] when reversed);
    gradients flow through both. The forward keeps what the backward needs only when a
    gradient can be asked for (grad mode on and an input requiring grad).
    """
    train = _wants_grad(x, h0, c0, w_ih, w_hh, bias)
    out, c, _ = torch.ops.rnnlm_ext.lstm_forward(x, h0, c0, w_ih, w_hh, bias, reverse, train, _requested_cuda_path())
    return out, c


@torch.library.register_fake("rnnlm_ext::lstm_forward")
def _lstm_forward_fake(x, h0, c0, w_ih, w_hh, bias, reverse, train, cuda_path="auto"):
    T, B, _, H = _check_gated_args(4, x, h0, w_ih, w_hh, c0=c0, bias=bias)
    return x.new_empty((T, B, H)), x.new_empty((T, B, H)), x.new_empty((T, B, 4 * H) if train else (0,))


@torch.library.register_fake("rnnlm_ext::lstm_backward")
def _lstm_backward_fake(dout, dc, x, h0, c0, w_ih, w_hh, out, c, gates, reverse, output_mask, cuda_path="auto"):
    # dc may be an empty [0] tensor: no gradient reached c
    dc = None if dc.shape == (0,) else dc
    _check_gated_args(4, x, h0, w_ih, w_hh, c0=c0, dout=dout, dc=dc, out=out, c=c, gates=gates)
    _check_output_mask(output_mask, "dx, dh0, dc0, dw_ih, dw_hh, dbias")
    G = w_hh.shape[0]
    return _masked_grads(x, (x.shape, h0.shape, c0.shape, w_ih.shape, w_hh.shape, (G,)), output_mask)


def _lstm_setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, reverse, train, cuda_path = inputs
    out, c, gates = output
    ctx.mark_non_differentiable(gates)  # the backward's own record, not a result
    ctx.set_materialize_grads(False)  # an unused c (or gates) then costs no [T,B,·] zero gradient
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, out, c, gates)
    ctx.reverse = reverse
    ctx.train = train
    ctx.cuda_path = cuda_path


def _lstm_backward(ctx, dout, dc, _dgates):
    _check_gated_backward(ctx, "lstm", "LSTM")
    if dout is None and dc is None:  # neither result's gradient is defined: no input's is
        return (None,) * 9
    x, h0, c0, w_ih, w_hh, out, c, gates = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else dout
    dc = out.new_empty(0) if dc is None else dc  # the op reads an empty dc as zero
    mask = list(ctx.needs_input_grad[:6])  # x, h0, c0, w_ih, w_hh, bias
    grads = torch.ops.rnnlm_ext.lstm_backward(
        dout, dc, x, h0, c0, w_ih, w_hh, out, c, gates, ctx.reverse, mask, ctx.cuda_path
    )
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None, None, None)


torch.library.register_autograd("rnnlm_ext::lstm_forward", _lstm_backward, setup_context=_lstm_setup_context)
