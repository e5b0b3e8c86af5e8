"""One recurrent layer (--cell rnn, lstm or gru), fused vs torch.nn's vs the pure-Python loop:
prints a markdown table and writes bench/results/<cell>_<device>.{json,png}. The same as
`rnnlm bench`; see rnnlm_ext/benchmark.py for the protocol and the flags (--device cuda,
--shapes, --repeats ...)."""

from rnnlm_ext.benchmark import main

if __name__ == "__main__":
    main()
