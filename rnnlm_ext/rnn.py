from rnnlm_ext.ops import rnn_layer as RNN
