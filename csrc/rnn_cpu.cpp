// rnn_cpu.cpp — whole-sequence forward and backward of one Elman RNN layer on the CPU.
// Dimensions, layouts and the math: rnn.h. Order: pointwise passes, forward, backward.
//
// Where the time goes: the input projection and the four weight/input gradients are large
// GEMMs over all T·B rows; only the per-step GEMM h_{t-1}·w_hhᵀ is sequential, and the bias +
// activation runs as one vectorised pass over the step's block. The machinery every cell
// shares: GEMM calls (cpu_gemm.h), which thread runs what (cpu_threads.h), tanh (cpu_simd.h).
#include "rnn.h"

#include <algorithm>
#include <cstdint>

#include "cpu_gemm.h"
#include "cpu_simd.h"
#include "cpu_threads.h"

namespace rnnlm_ext {
namespace {

// In the forward pass: h = act(h + b) over a [rows,n] block with row stride ld, in place (h
// holds the pre-activation P_t + h_{t-1}·w_hhᵀ on entry). b [n] may be nullptr.
template <typename scalar_t>
void bias_act_forward(scalar_t* h, const scalar_t* b, int64_t rows, int64_t n, int64_t ld,
                      Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* hr = h + r * ld;
    if (act == Activation::Tanh) {
      cpu::tanh_row(hr, b, n);
    } else if (b) {
      for (int64_t j = 0; j < n; ++j) hr[j] = std::max(hr[j] + b[j], scalar_t(0));
    } else {
      for (int64_t j = 0; j < n; ++j) hr[j] = std::max(hr[j], scalar_t(0));
    }
  }
}

// In the forward pass this was h = act(z), so now dz = (carry + dout) ⊙ act'(h), with act'
// taken from the saved output h: tanh' = 1 − h², as (1 − h)(1 + h), exact where h ~ ±1 (1 − h²
// lost half of 1 − h²'s bits there); relu' = 0 where h <= 0, else 1, so that a NaN output
// passes the gradient through, as nn.RNN's does. Over a [rows,n] block with row stride ld;
// dz holds the carried gradient dz_{t+1}·w_hh on entry when `carry` is true, and is
// overwritten.
template <typename scalar_t>
void act_backward(scalar_t* dz, const scalar_t* dout, const scalar_t* h, bool carry, int64_t rows,
                  int64_t n, int64_t ld, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* __restrict__ dzr = dz + r * ld;
    const scalar_t* __restrict__ doutr = dout + r * ld;
    const scalar_t* __restrict__ hr = h + r * ld;
    // Vectorised, branch-free loops (setup.py's -fno-trapping-math lets GCC turn the relu
    // select into a vector compare-and-mask; as a branch on h <= 0, mispredicted half the
    // time, the relu backward loop ran 4x slower than tanh's).
    if (act == Activation::Tanh && carry) {
      for (int64_t j = 0; j < n; ++j)
        dzr[j] = (dzr[j] + doutr[j]) * ((scalar_t(1) - hr[j]) * (scalar_t(1) + hr[j]));
    } else if (act == Activation::Tanh) {
      for (int64_t j = 0; j < n; ++j)
        dzr[j] = doutr[j] * ((scalar_t(1) - hr[j]) * (scalar_t(1) + hr[j]));
    } else if (carry) {
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t g = dzr[j] + doutr[j];
        dzr[j] = hr[j] <= scalar_t(0) ? scalar_t(0) : g;
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t g = doutr[j];  // loaded whatever h is, so that the loop vectorises
        dzr[j] = hr[j] <= scalar_t(0) ? scalar_t(0) : g;
      }
    }
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
void rnn_forward_cpu(scalar_t* out, const scalar_t* x, const scalar_t* h0, const scalar_t* w_ih,
                     const scalar_t* w_hh, const scalar_t* b, int64_t T, int64_t B, int64_t I,
                     int64_t H, Activation act, bool reverse) {
  const int64_t BH = B * H;
  const StepOrder order{T, reverse};
  // P = x·w_ihᵀ of loop steps [s0,s1), written straight into their rows of out:
  // [rows,I]·[I,H] -> [rows,H]
  auto project = [&](int64_t s0, int64_t s1) {
    const int64_t t0 = order.range_begin(s0, s1);
    cpu::gemm<scalar_t>(false, true, (s1 - s0) * B, H, I, x + t0 * B * I, I, w_ih, I, 0,
                        out + t0 * BH, H);
  };
  // this block's step: h_prev[B,H]·w_hh[c0:c1]ᵀ with w_hh's rows c0…c1 packed once
  auto prepare = [&](cpu::StepGemm<scalar_t>& g, const cpu::Slice& slice) {
    g.prepare(true, B, slice.size(), H, w_hh + slice.c0 * H, H);
  };
  auto step = [&](int64_t s, const cpu::Slice& slice, const cpu::StepGemm<scalar_t>& g) {
    const scalar_t* h_prev = s == 0 ? h0 : out + order.prev_time(s) * BH;  // [B,H]
    scalar_t* h = out + order.time(s) * BH + slice.c0;  // [B,c1-c0], row stride H
    g(h_prev, H, 1, h, H);                              // h = P_t + h_prev·w_hh[c0:c1]ᵀ
    bias_act_forward(h, b ? b + slice.c0 : nullptr, B, slice.size(), H, act);
  };
  cpu::forward_schedule<cpu::StepGemm<scalar_t>>(T, B, H, project, prepare, step);
}

// ----------------------------------------------------------------------------------------
// Backward

template <typename scalar_t>
void rnn_backward_cpu(scalar_t* dx, scalar_t* dh0, scalar_t* dw_ih, scalar_t* dw_hh, scalar_t* db,
                      scalar_t* dz, const scalar_t* dout, const scalar_t* x, const scalar_t* h0,
                      const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* out, int64_t T,
                      int64_t B, int64_t I, int64_t H, Activation act, bool reverse) {
  const int64_t BH = B * H;
  const StepOrder order{T, reverse};
  // k counts the forward's steps in reverse order: loop step s = T-1-k. A column block
  // [c0,c1) of every dz_t is finished (act'); once all columns of dz_t are finished, the
  // block's columns of the previous step's carry are written from all of dz_t.
  auto prepare = [&](cpu::StepGemm<scalar_t>& g, const cpu::Slice& slice) {
    // this block's carry: dz_t[B,H]·w_hh[:, c0:c1], w_hh's columns c0…c1 packed once
    g.prepare(false, B, slice.size(), H, w_hh + slice.c0, H);
  };
  auto finish_dz = [&](int64_t k, const cpu::Slice& slice) {
    const int64_t s = T - 1 - k;
    // in the forward pass this was h_t = act(P_t + h_{t-1}·w_hhᵀ + b), so dz_t = dh_t ⊙ act'(h_t)
    // with dh_t = dout_t + dz_{t+1}·w_hh (the carry, already in dz_t except at the last step)
    const int64_t at = order.time(s) * BH + slice.c0;
    act_backward(dz + at, dout + at, out + at, s != T - 1, B, slice.size(), H, act);
  };
  auto carry = [&](int64_t k, const cpu::Slice& slice, const cpu::StepGemm<scalar_t>& g) {
    const int64_t s = T - 1 - k;
    if (s == 0) return;
    // ... and through h_{t-1}·w_hhᵀ: carry dz_t·w_hh[:, c0:c1] into the previous step's slot
    g(dz + order.time(s) * BH, H, 0, dz + order.prev_time(s) * BH + slice.c0, H);
  };
  auto dh0_grad = [&] {
    if (dh0)
      cpu::gemm<scalar_t>(false, false, B, H, H, dz + order.first_time() * BH, H, w_hh, H, 0, dh0,
                          H);
  };
  // The weight and bias gradients of backward steps [k0,k1) for hidden units [c0,c1) (rows
  // c0…c1 of dw_ih, dw_hh and db): loop steps [T-k1, T-k0), a run of consecutive time indices
  // [ta,tb). Written when `write` (the first run), else added.
  auto weight_grads = [&](int64_t k0, int64_t k1, bool write, const cpu::Slice& block) {
    const int64_t ta = order.range_begin(T - k1, T - k0), tb = ta + (k1 - k0);
    const int64_t c0 = block.c0, n = block.size();
    const scalar_t beta = write ? 0 : 1;
    if (dw_ih)  // dz[ta:tb, :, c0:c1]ᵀ·x[ta:tb]: [n,rows]·[rows,I]
      cpu::gemm<scalar_t>(true, false, n, I, (tb - ta) * B, dz + ta * BH + c0, H, x + ta * B * I, I,
                          beta, dw_ih + c0 * I, I);
    if (dw_hh) {  // Σ_t dz_t[:, c0:c1]ᵀ·h_{t-1}: [n,rows]·[rows,H]
      const PrevStates p = split_prev_states(order, ta, tb);
      scalar_t b0 = beta;
      if (p.has_first) {
        cpu::gemm<scalar_t>(true, false, n, H, B, dz + p.first * BH + c0, H, h0, H, b0,
                            dw_hh + c0 * H, H);
        b0 = 1;
      }
      if (p.hi > p.lo)
        cpu::gemm<scalar_t>(true, false, n, H, (p.hi - p.lo) * B, dz + p.lo * BH + c0, H,
                            out + p.prev_of_lo * BH, H, b0, dw_hh + c0 * H, H);
    }
    if (db) {
      // summed in double, rounded once per chunk: a float32 running sum over T·B rows was up
      // to 12x further from the float64 answer than PyTorch's sum
      double sum[cpu::kMaxBlockColumns] = {};
      for (int64_t r = ta * B; r < tb * B; ++r)
        for (int64_t j = 0; j < n; ++j) sum[j] += double(dz[r * H + c0 + j]);
      for (int64_t j = 0; j < n; ++j)
        db[c0 + j] = scalar_t((write ? 0 : double(db[c0 + j])) + sum[j]);
    }
  };
  // dx = dz·w_ih for backward steps [k0,k1)
  auto input_grad = [&](int64_t k0, int64_t k1) {
    const int64_t ta = order.range_begin(T - k1, T - k0), tb = ta + (k1 - k0);
    cpu::gemm<scalar_t>(false, false, (tb - ta) * B, I, H, dz + ta * BH, H, w_ih, I, 0,
                        dx + ta * B * I, I);
  };
  cpu::backward_schedule<cpu::StepGemm<scalar_t>>(T, B, H, dx != nullptr, prepare, finish_dz, carry,
                                                  dh0_grad, weight_grads, input_grad);
}

template void rnn_forward_cpu<float>(float*, const float*, const float*, const float*, const float*,
                                     const float*, int64_t, int64_t, int64_t, int64_t, Activation,
                                     bool);
template void rnn_forward_cpu<double>(double*, const double*, const double*, const double*,
                                      const double*, const double*, int64_t, int64_t, int64_t,
                                      int64_t, Activation, bool);
template void rnn_backward_cpu<float>(float*, float*, float*, float*, float*, float*, const float*,
                                      const float*, const float*, const float*, const float*,
                                      const float*, int64_t, int64_t, int64_t, int64_t, Activation,
                                      bool);
template void rnn_backward_cpu<double>(double*, double*, double*, double*, double*, double*,
                                       const double*, const double*, const double*, const double*,
                                       const double*, const double*, int64_t, int64_t, int64_t,
                                       int64_t, Activation, bool);

}  // namespace rnnlm_ext
