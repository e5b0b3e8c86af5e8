"""rnnlm_ext: a fused C++/CUDA Elman RNN for PyTorch and a from-scratch RNN language model."""
from rnnlm_ext.rnn import RNN

__all__ = ["RNN"]
__version__ = "0.1.0"
