"""The RNN language model built on rnnlm_ext.RNN: data, models, training, generation and the `rnnlm` CLI."""
