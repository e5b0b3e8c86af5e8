"""rnnlm_ext.RNN, LSTM and GRU: drop-ins for torch.nn.RNN, LSTM and GRU whose layers run
through the fused kernels.

Same constructor, parameter names, shapes, initialisation, state_dict, forward signature and
outputs as torch.nn's. Each layer and direction is one call of a fused op (one C++ kernel for
the whole sequence, with a hand-written backward); stacking, bidirectional concatenation and
dropout between layers happen here, in RecurrentBase, in the same order torch.nn does them.
A cell supplies only its gate count and how to call its one-layer function.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnlm_ext import reference

try:
    from rnnlm_ext import ops as _ops
except ImportError as err:  # the package was not built: stay usable, loudly
    warnings.warn(
        f"rnnlm_ext: the compiled extension is not available ({err}); every rnnlm_ext layer (RNN, LSTM, GRU) "
        "falls back to the pure-PyTorch reference (correct, slow). Build it with "
        "`pip install --no-build-isolation .` in the source tree.",
        stacklevel=2,
    )
    _ops = None

_layer = _ops.rnn_layer if _ops else reference.rnn_layer
_gru_layer = _ops.gru_layer if _ops else reference.gru_layer
_lstm_layer = _ops.lstm_layer if _ops else reference.lstm_layer

# impl -> the function that runs one Elman layer in one direction
LAYER_IMPLS = {"fused": _layer, "reference": reference.rnn_layer}


def _check_fraction(name: str, value, upper_open: bool) -> float:
    """value as a float in [0, 1] ([0, 1) with upper_open), else a ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok or (upper_open and value == 1):
        raise ValueError(f"{name} must be a number in [0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


class RecurrentBase(nn.Module):
    """What RNN, LSTM and GRU share: checks, parameters, the layer stack, the state plumbing.

    A subclass sets GATES (blocks of H rows stacked in each weight), STATES (the names of its
    state tensors in messages: hx, or h_0 and c_0), LAYERS (impl -> one-layer function) and
    implements _run_layer (one layer, one direction) and _pack_state (its hx as the user sees it).
    """

    GATES: int
    STATES: tuple[str, ...] = ("hx",)
    LAYERS: dict[str, Callable]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        bidirectional: bool,
        weight_drop: float,
        device,
        dtype,
        impl: str,
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(impl, str) or impl not in self.LAYERS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, self.LAYERS))}, got {impl!r}")
        dropout = _check_fraction("dropout", dropout, upper_open=False)
        weight_drop = _check_fraction("weight_drop", weight_drop, upper_open=True)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} and num_layers=1: dropout acts between layers, so it has no effect",
                stacklevel=3,
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.weight_drop = weight_drop
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        rows = self.GATES * hidden_size
        # Registered in torch.nn's order, so that one seed gives both modules the same weights.
        self._weight_names = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * num_directions
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {"weight_ih": (rows, layer_in), "weight_hh": (rows, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(rows,), bias_hh=(rows,))
                for kind, shape in shapes.items():
                    setattr(self, kind + suffix, nn.Parameter(torch.empty(shape, **factory)))
                self._weight_names.append([kind + suffix for kind in shapes])
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every parameter uniform in ±1/√hidden_size."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """Kept for torch.nn compatibility: the fused kernels need no flat weight buffer."""

    @property
    def all_weights(self):
        return [[getattr(self, name) for name in names] for names in self._weight_names]

    def _cell_repr(self) -> str:
        """The cell's own constructor arguments in extra_repr (after num_layers)."""
        return ""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        s += self._cell_repr()
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.weight_drop:
            s += f", weight_drop={self.weight_drop}"
        return s

    def _unpack_state(self, hx) -> tuple[Tensor, ...] | None:
        """The user's hx as a tuple of one tensor per name in STATES (None: none given)."""
        if hx is not None and not isinstance(hx, Tensor):
            raise TypeError(f"hx must be a Tensor or None, got {type(hx).__name__}")
        return None if hx is None else (hx,)

    def _pack_state(self, state: tuple[Tensor, ...]):
        """The final state as torch.nn returns it: h_n here (LSTM: (h_n, c_n))."""
        return state[0]

    def _run_layer(self, fn, x, state, w_ih, w_hh, b_ih, b_hh, reverse) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One layer, one direction through `fn` (a LAYERS entry): x [T,B,I], state one [B,H]
        per STATES. Returns out [T,B,H] and the final state, one [B,H] per STATES."""
        raise NotImplementedError

    def _check_input(self, input: Tensor, hx) -> tuple[Tensor, ...] | None:
        """Refuse what torch.nn refuses, with the exception type torch.nn raises (code that
        catches those keeps working) and a message that names the argument or parameter and
        gives the shapes the user passed. Returns the state as a tuple (None: not given)."""
        cell = type(self).__name__
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"rnnlm_ext.{cell} does not take a PackedSequence (variable lengths). Pass a padded "
                "tensor (torch.nn.utils.rnn.pad_packed_sequence) and mask the padded steps, or "
                f"use torch.nn.{cell} for packed input."
            )
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must be 3-D [T,B,I] ([B,T,I] with batch_first) or 2-D unbatched [T,I], "
                f"got {input.dim()}-D with shape {tuple(input.shape)}"
            )
        if not input.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got {input.dtype}")
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype:
            raise ValueError(f"input has dtype {input.dtype} but the weights have {weight.dtype}; convert one of them")
        if input.device != weight.device:
            raise RuntimeError(f"input is on {input.device} but the weights are on {weight.device}")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input's last dimension must be input_size={self.input_size}, got shape {tuple(input.shape)}"
            )
        time_dim = 1 if self.batch_first and input.dim() == 3 else 0
        if input.shape[time_dim] == 0:
            raise RuntimeError(f"input has no time steps (shape {tuple(input.shape)}); it needs at least one")
        self._check_parameters(input)
        state = self._unpack_state(hx)
        if state is None:
            return None
        batch = () if input.dim() == 2 else (input.shape[0 if self.batch_first else 1],)
        expected = (self.num_layers * self.num_directions, *batch, self.hidden_size)
        for name, h in zip(self.STATES, state):
            if tuple(h.shape) != expected:
                raise RuntimeError(
                    f"{name} must have shape {expected} (num_layers·num_directions, batch, hidden_size), "
                    f"got {tuple(h.shape)}"
                )
            if h.dtype != input.dtype:
                raise RuntimeError(f"{name} has dtype {h.dtype} but input has {input.dtype}")
            if h.device != input.device:
                raise RuntimeError(f"{name} is on {h.device} but input is on {input.device}")
        return state

    def _check_parameters(self, input: Tensor) -> None:
        """Parameters a user replaced keep the shapes, dtype and device the layers need
        (else the op would name its own arguments, w_ih or w_hh, not the parameter)."""
        H, D, G = self.hidden_size, self.num_directions, self.GATES
        square, bias, dtype, device = (G * H, H), (G * H,), input.dtype, input.device
        for idx, names in enumerate(self._weight_names):
            layer_in = self.input_size if idx < D else H * D
            shapes = ((G * H, layer_in), square, bias, bias)  # weight_ih, weight_hh, biases
            for name, expected in zip(names, shapes):
                p = self._parameters[name]
                if p.shape != expected or p.dtype is not dtype or p.device != device:
                    if p.shape != expected:
                        raise RuntimeError(f"{name} must have shape {expected}, got {tuple(p.shape)}")
                    if p.dtype != input.dtype:
                        raise RuntimeError(f"{name} has dtype {p.dtype} but input has {input.dtype}")
                    raise RuntimeError(f"{name} is on {p.device} but input is on {input.device}")

    def forward(self, input: Tensor, hx=None):
        state = self._check_input(input, hx)
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)  # [T,1,I]
            state = None if state is None else tuple(h.unsqueeze(1) for h in state)
        elif self.batch_first:
            input = input.transpose(0, 1)  # [T,B,I]
        B = input.shape[1]
        if state is None:
            zeros = (self.num_layers * self.num_directions, B, self.hidden_size)
            state = tuple(input.new_zeros(zeros) for _ in self.STATES)

        # the ops take B >= 1; for an empty batch the reference loop gives torch.nn's empty
        # outputs, empty gradients of x and hx, and zero gradients of the weights
        layer_fn = self.LAYERS[self.impl if B > 0 else "reference"]
        x, finals = input, []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                params = [getattr(self, name) for name in self._weight_names[idx]]
                w_ih, w_hh = params[0], params[1]
                b_ih, b_hh = (params[2], params[3]) if self.bias else (None, None)
                if self.weight_drop and self.training:  # DropConnect: a fresh mask on W_hh per forward
                    w_hh = F.dropout(w_hh, self.weight_drop, training=True)
                reverse = direction == 1
                out, final = self._run_layer(layer_fn, x, tuple(h[idx] for h in state), w_ih, w_hh, b_ih, b_hh, reverse)
                outs.append(out)  # [T,B,H]
                finals.append(final)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [T,B,D·H]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        final = tuple(torch.stack(hs) for hs in zip(*finals))  # each [L·D,B,H]

        if unbatched:
            return x.squeeze(1), self._pack_state(tuple(h.squeeze(1) for h in final))
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, self._pack_state(final)


class RNN(RecurrentBase):
    """Elman RNN, h_t = act(x_t·W_ihᵀ + b_ih + h_{t-1}·W_hhᵀ + b_hh), like torch.nn.RNN.

    Args are torch.nn.RNN's: input_size, hidden_size, num_layers, nonlinearity ('tanh' or
    'relu'), bias, batch_first, dropout (between layers, in training), bidirectional, device,
    dtype. impl: 'fused' (the compiled kernel; the reference, with a warning at import, where
    the extension is not built) or 'reference' (the pure-PyTorch loop of rnnlm_ext.reference).
    weight_drop: DropConnect on every W_hh in training (AWD-LSTM's WeightDrop), in [0, 1).
    Input [T,B,I] ([B,T,I] with batch_first, or unbatched [T,I]); optional hx
    [num_layers·D, B, H]. Returns (output [T,B,D·H], h_n [num_layers·D, B, H]).
    PackedSequence input is not supported (see forward).
    """

    GATES = 1
    LAYERS = LAYER_IMPLS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        impl: str = "fused",
        weight_drop: float = 0.0,
    ):
        if nonlinearity not in reference.NONLINEARITIES:
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            weight_drop,
            device,
            dtype,
            impl,
        )
        self.nonlinearity = nonlinearity

    def _cell_repr(self) -> str:
        return f", nonlinearity={self.nonlinearity!r}" if self.nonlinearity != "tanh" else ""

    def _run_layer(self, fn, x, state, w_ih, w_hh, b_ih, b_hh, reverse):
        bias = None if b_ih is None else b_ih + b_hh  # autograd splits db to both
        out = fn(x, state[0], w_ih, w_hh, bias, self.nonlinearity, reverse)  # [T,B,H]
        return out, (out[0] if reverse else out[-1],)


class LSTM(RecurrentBase):
    """LSTM, torch.nn.LSTM's cell (gates i, f, g, o; c_t = f⊙c + i⊙g, h_t = o⊙tanh(c_t)).

    Args are torch.nn.LSTM's (input_size, hidden_size, num_layers, bias, batch_first,
    dropout, bidirectional, device, dtype); proj_size > 0 is not supported. impl and
    weight_drop as for rnnlm_ext.RNN. Input as nn.LSTM's; optional hx = (h_0, c_0), each
    [num_layers·D, B, H]. Returns (output [T,B,D·H], (h_n, c_n)).
    """

    GATES = 4
    STATES = ("hx[0] (h_0)", "hx[1] (c_0)")
    LAYERS = {"fused": _lstm_layer, "reference": reference.lstm_layer}

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        impl: str = "fused",
        weight_drop: float = 0.0,
    ):
        if proj_size != 0:
            raise ValueError(
                f"proj_size={proj_size!r}: rnnlm_ext.LSTM has no projection (proj_size > 0); "
                "use torch.nn.LSTM for an LSTM with projections"
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            weight_drop,
            device,
            dtype,
            impl,
        )
        self.proj_size = 0

    def _unpack_state(self, hx):
        if hx is None:
            return None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(h, Tensor) for h in hx):
            got = type(hx).__name__ + (f" of {len(hx)}" if isinstance(hx, (tuple, list)) else "")
            raise TypeError(f"hx must be a tuple (h_0, c_0) of two Tensors, or None, got {got}")
        return tuple(hx)

    def _pack_state(self, state):
        return state  # (h_n, c_n)

    def _run_layer(self, fn, x, state, w_ih, w_hh, b_ih, b_hh, reverse):
        bias = None if b_ih is None else b_ih + b_hh  # autograd splits db to both
        out, c = fn(x, state[0], state[1], w_ih, w_hh, bias, reverse)  # [T,B,H] each
        last = 0 if reverse else -1
        return out, (out[last], c[last])


class GRU(RecurrentBase):
    """GRU, torch.nn.GRU's cell (gates r, z, n; n = tanh(gi_n + r⊙gh_n), h_t = (1−z)⊙n + z⊙h).

    Args are torch.nn.GRU's (input_size, hidden_size, num_layers, bias, batch_first, dropout,
    bidirectional, device, dtype); impl and weight_drop as for rnnlm_ext.RNN. Input and hx as
    nn.GRU's. Returns (output [T,B,D·H], h_n [num_layers·D, B, H]).
    """

    GATES = 3
    LAYERS = {"fused": _gru_layer, "reference": reference.gru_layer}

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        impl: str = "fused",
        weight_drop: float = 0.0,
    ):
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            weight_drop,
            device,
            dtype,
            impl,
        )

    def _run_layer(self, fn, x, state, w_ih, w_hh, b_ih, b_hh, reverse):
        out = fn(x, state[0], w_ih, w_hh, b_ih, b_hh, reverse)  # [T,B,H]: b_hn stays inside r⊙(…)
        return out, (out[0] if reverse else out[-1],)


# A model holding our layers then loads under torch.load's default weights_only=True as one
# holding torch.nn's does (word_language_model saves whole models): unpickling one only sets
# its attributes and parameters (nn.Module.__setstate__), no code of the file runs.
torch.serialization.add_safe_globals([RNN, LSTM, GRU])
