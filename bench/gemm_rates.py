"""The GEMM rates behind the LSTM comparison: MKL (torch.mm, and the BLAS rnnlm_ext's CPU
kernels call) against oneDNN (which nn.LSTM's CPU kernel runs on), single-threaded, at a large
square shape and at the LSTM benchmark's step and projection shapes.

    python3 bench/gemm_rates.py
"""

import torch

from rnnlm_ext.benchmark import median_ms


def gflops(fn, flops: float, repeats: int = 7) -> float:
    return flops / (median_ms(fn, "cpu", repeats, 1) * 1e-3) / 1e9


def main() -> None:
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch has no oneDNN (mkldnn): nothing to compare")
    torch.set_num_threads(1)
    print("| M x K x N (float32, 1 thread) | MKL GFLOP/s | oneDNN GFLOP/s | oneDNN ÷ MKL |")
    print("|---|---|---|---|")
    # (rows, in, out): a square matmul, LSTM steps [B,H]·[H,4H] and a 64-row projection chunk
    for m, k, n in [(2048, 2048, 2048), (64, 64, 256), (64, 256, 1024), (64, 1024, 4096), (4096, 1024, 4096)]:
        a, w = torch.randn(m, k), torch.randn(n, k)
        mkl = gflops(lambda: a @ w.t(), 2 * m * k * n)
        a_dnn, w_dnn = a.to_mkldnn(), w.to_mkldnn()
        dnn = gflops(lambda: torch._C._nn.mkldnn_linear(a_dnn, w_dnn), 2 * m * k * n)
        print(f"| {m} x {k} x {n} | {mkl:.0f} | {dnn:.0f} | {dnn / mkl:.2f} |")


if __name__ == "__main__":
    main()
