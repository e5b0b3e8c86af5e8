"""rnnlm_ext: fused C++/CUDA RNN, LSTM and GRU layers for PyTorch and a from-scratch RNN language model."""

from rnnlm_ext._version import __version__
from rnnlm_ext.rnn import GRU, LSTM, RNN

__all__ = ["GRU", "LSTM", "RNN", "__version__"]
