"""rnnlm_ext: a fused C++/CUDA Elman RNN for PyTorch and a from-scratch RNN language model."""

from rnnlm_ext._version import __version__
from rnnlm_ext.rnn import RNN

__all__ = ["RNN", "__version__"]
