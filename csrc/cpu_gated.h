// cpu_gated.h — pieces the gated cells' CPU kernels (gru_cpu.cpp, lstm_cpu.cpp) share: bias
// rows, column sums, the per-thread step GEMM over a slice of every gate block, and the
// recurrent weight gradient over a run of steps.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_gemm.h"
#include "cpu_threads.h"
#include "rnn.h"

namespace rnnlm_ext {
namespace cpu {

// a[row, j] += b[j] over a [rows,n] block with row stride ld.
template <typename scalar_t>
void add_bias(scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t rows, int64_t n,
              int64_t ld) {
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = 0; j < n; ++j) a[row * ld + j] += b[j];
}

// dst[j] = (write ? 0 : dst[j]) + Σ_rows src[row, j] over a [rows,n] block with row stride
// ld, summed in double and rounded once: a float32 running sum over many rows drifts (the
// Elman cell's db was up to 12x further from float64 than PyTorch's sum). Columns go in
// tiles, so that the sums stay on the stack.
template <typename scalar_t>
void column_sums(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t rows,
                 int64_t n, int64_t ld, bool write) {
  constexpr int64_t kTile = 256;
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t w = std::min(kTile, n - j0);
    double sum[kTile] = {};
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t j = 0; j < w; ++j) sum[j] += double(src[row * ld + j0 + j]);
    for (int64_t j = 0; j < w; ++j)
      dst[j0 + j] = scalar_t((write ? 0 : double(dst[j0 + j])) + sum[j]);
  }
}

// A thread's per-sequence forward state: the GEMM h_{t-1}·w_hh[slice rows]ᵀ -> [B, gates·m]
// of its hidden units' rows of every gate block, packed once. When the thread owns only some
// units their rows are gathered first: in w_hh each gate's rows are a block of H, so a
// slice's gates·m rows are not contiguous.
template <typename scalar_t>
struct GatedStep {
  std::vector<scalar_t> w_slice;  // [gates·m,H]
  StepGemm<scalar_t> gemm;

  void prepare(int64_t gates, int64_t B, int64_t H, const scalar_t* w_hh, const Slice& slice) {
    const int64_t m = slice.size();
    if (m == H) return gemm.prepare(true, B, gates * H, H, w_hh, H);
    w_slice.resize(size_t(gates * m * H));
    for (int64_t gate = 0; gate < gates; ++gate)
      std::copy(w_hh + (gate * H + slice.c0) * H, w_hh + (gate * H + slice.c1) * H,
                w_slice.begin() + gate * m * H);
    gemm.prepare(true, B, gates * m, H, w_slice.data(), H);
  }
};

// dw[n,H] = beta·dw + Σ_t dg_tᵀ·h_{t-1} over the time indices [ta,tb): dg points at time 0's
// first wanted column of a [T,B,ld] gradient, n columns wide; h_{t-1} is h0 for the step that
// read it, else a row of out [T,B,H].
template <typename scalar_t>
void recurrent_weight_grad(scalar_t* dw, const scalar_t* dg, int64_t ld, int64_t n,
                           const scalar_t* h0, const scalar_t* out, const StepOrder& order,
                           int64_t ta, int64_t tb, int64_t B, int64_t H, scalar_t beta) {
  const PrevStates p = split_prev_states(order, ta, tb);
  if (p.has_first) {
    gemm<scalar_t>(true, false, n, H, B, dg + p.first * B * ld, ld, h0, H, beta, dw, H);
    beta = 1;
  }
  if (p.hi > p.lo)
    gemm<scalar_t>(true, false, n, H, (p.hi - p.lo) * B, dg + p.lo * B * ld, ld,
                   out + p.prev_of_lo * B * H, H, beta, dw, H);
}

}  // namespace cpu
}  // namespace rnnlm_ext
