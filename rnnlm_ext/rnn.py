"""rnnlm_ext.RNN: a drop-in for torch.nn.RNN whose layers run through the fused kernel.

Same constructor, parameter names, shapes, initialisation, state_dict, forward signature and
outputs as torch.nn.RNN. Each layer and direction is one call of the fused op (one C++ kernel
for the whole sequence, with a hand-written backward); stacking, bidirectional concatenation
and dropout between layers happen here, in the same order nn.RNN does them.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnlm_ext import reference

try:
    from rnnlm_ext.ops import rnn_layer as _layer
except ImportError as err:  # the package was not built: stay usable, loudly
    warnings.warn(
        f"rnnlm_ext: the compiled extension is not available ({err}); rnnlm_ext.RNN falls back "
        "to the pure-PyTorch reference (correct, slow). Build it with "
        "`pip install --no-build-isolation .` in the source tree.",
        stacklevel=2,
    )
    _layer = reference.rnn_layer

# impl -> the function that runs one layer in one direction
LAYER_IMPLS = {"fused": _layer, "reference": reference.rnn_layer}


class RNN(nn.Module):
    """Elman RNN, h_t = act(x_t·W_ihᵀ + b_ih + h_{t-1}·W_hhᵀ + b_hh), like torch.nn.RNN.

    Args are torch.nn.RNN's: input_size, hidden_size, num_layers, nonlinearity ('tanh' or
    'relu'), bias, batch_first, dropout (between layers, in training), bidirectional, device,
    dtype. impl: 'fused' (the compiled kernel; the reference, with a warning at import, where
    the extension is not built) or 'reference' (the pure-PyTorch loop of rnnlm_ext.reference).
    Input [T,B,I] ([B,T,I] with batch_first, or unbatched [T,I]); optional hx
    [num_layers·D, B, H]. Returns (output [T,B,D·H], h_n [num_layers·D, B, H]).
    PackedSequence input is not supported (see forward).
    """

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
    ):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if nonlinearity not in reference.NONLINEARITIES:
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        if not isinstance(impl, str) or impl not in LAYER_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, LAYER_IMPLS))}, got {impl!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} and num_layers=1: dropout acts between layers, so it has no effect",
                stacklevel=2,
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.nonlinearity = nonlinearity
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        # Registered in nn.RNN's order, so that one seed gives both modules the same weights.
        self._weight_names = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * num_directions
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {"weight_ih": (hidden_size, layer_in), "weight_hh": (hidden_size, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(hidden_size,), bias_hh=(hidden_size,))
                for kind, shape in shapes.items():
                    setattr(self, kind + suffix, nn.Parameter(torch.empty(shape, **factory)))
                self._weight_names.append([kind + suffix for kind in shapes])
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """nn.RNN's initialisation: every parameter uniform in ±1/√hidden_size."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """Kept for nn.RNN compatibility: the fused kernels need no flat weight buffer."""

    @property
    def all_weights(self):
        return [[getattr(self, name) for name in names] for names in self._weight_names]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    def _check_input(self, input: Tensor, hx: Tensor | None) -> None:
        """Refuse what nn.RNN refuses, with the exception type nn.RNN raises (code that
        catches those keeps working) and a message that names the argument or parameter and
        gives the shapes the user passed."""
        if isinstance(input, PackedSequence):
            raise TypeError(
                "rnnlm_ext.RNN does not take a PackedSequence (variable lengths). Pass a padded "
                "tensor (torch.nn.utils.rnn.pad_packed_sequence) and mask the padded steps, or "
                "use torch.nn.RNN for packed input."
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
        if hx is None:
            return
        if not isinstance(hx, Tensor):
            raise TypeError(f"hx must be a Tensor or None, got {type(hx).__name__}")
        batch = () if input.dim() == 2 else (input.shape[0 if self.batch_first else 1],)
        expected = (self.num_layers * self.num_directions, *batch, self.hidden_size)
        if tuple(hx.shape) != expected:
            raise RuntimeError(
                f"hx must have shape {expected} (num_layers·num_directions, batch, hidden_size), got {tuple(hx.shape)}"
            )
        if hx.dtype != input.dtype:
            raise RuntimeError(f"hx has dtype {hx.dtype} but input has {input.dtype}")
        if hx.device != input.device:
            raise RuntimeError(f"hx is on {hx.device} but input is on {input.device}")

    def _check_parameters(self, input: Tensor) -> None:
        """Parameters a user replaced keep the shapes, dtype and device the layers need
        (else the op would name its own arguments, w_ih or w_hh, not the parameter)."""
        H, D = self.hidden_size, self.num_directions
        square, bias, dtype, device = (H, H), (H,), input.dtype, input.device
        for idx, names in enumerate(self._weight_names):
            shapes = ((H, self.input_size if idx < D else H * D), square, bias, bias)  # weight_ih, weight_hh, biases
            for name, expected in zip(names, shapes):
                p = self._parameters[name]
                if p.shape != expected or p.dtype is not dtype or p.device != device:
                    if p.shape != expected:
                        raise RuntimeError(f"{name} must have shape {expected}, got {tuple(p.shape)}")
                    if p.dtype != input.dtype:
                        raise RuntimeError(f"{name} has dtype {p.dtype} but input has {input.dtype}")
                    raise RuntimeError(f"{name} is on {p.device} but input is on {input.device}")

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_input(input, hx)
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)  # [T,1,I]
            hx = None if hx is None else hx.unsqueeze(1)
        elif self.batch_first:
            input = input.transpose(0, 1)  # [T,B,I]
        B = input.shape[1]
        if hx is None:
            hx = input.new_zeros(self.num_layers * self.num_directions, B, self.hidden_size)

        # the op takes B >= 1; for an empty batch the reference loop gives nn.RNN's empty
        # outputs, empty gradients of x and hx, and zero gradients of the weights
        layer_fn = LAYER_IMPLS[self.impl] if B > 0 else reference.rnn_layer
        x, h_n = input, []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                params = [getattr(self, name) for name in self._weight_names[idx]]
                w_ih, w_hh = params[0], params[1]
                bias = params[2] + params[3] if self.bias else None  # autograd splits db to both
                reverse = direction == 1
                out = layer_fn(x, hx[idx], w_ih, w_hh, bias, self.nonlinearity, reverse)  # [T,B,H]
                outs.append(out)
                h_n.append(out[0] if reverse else out[-1])
            x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # [T,B,D·H]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        h_n = torch.stack(h_n)  # [L·D,B,H]

        if unbatched:
            return x.squeeze(1), h_n.squeeze(1)
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, h_n


# A model holding our layer then loads under torch.load's default weights_only=True as one
# holding nn.RNN does (word_language_model saves whole models): unpickling an RNN only sets
# its attributes and parameters (nn.Module.__setstate__), no code of the file runs.
torch.serialization.add_safe_globals([RNN])
