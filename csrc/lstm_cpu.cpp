// lstm_cpu.cpp — whole-sequence forward and backward of one LSTM layer on the CPU.
// Layouts and the math: lstm.h. Order: pointwise passes, forward, backward.
//
// The GRU's structure (gru_cpu.cpp) on the same machinery (cpu_*.h): the input projection and
// the weight/input gradients are GEMMs over all T·B rows; per step, one GEMM [B,H]·[H,4H] and
// one vectorised pass for the gates and the cell update. When threads share the loop by
// hidden columns (cpu_threads.h), a thread owns hidden units [c0,c1), the same columns of each
// of the four gate blocks: the pointwise pass needs i, f, g and o of a unit together.
#include "lstm.h"

#include <algorithm>
#include <cstdint>

#include "cpu_gated.h"
#include "cpu_gemm.h"
#include "cpu_simd.h"
#include "cpu_threads.h"

namespace rnnlm_ext {
namespace {

// The arithmetic of the gates, row by row (RNNLM_EXT_VECTOR_CLONES: cpu_simd.h). No two
// pointers of a call overlap (__restrict__: GCC vectorises the loops only when it knows that).
// a_k += b_k for the four gate blocks
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void add_gate_rows(scalar_t* __restrict__ a_i, scalar_t* __restrict__ a_f,
                                           scalar_t* __restrict__ a_g, scalar_t* __restrict__ a_o,
                                           const scalar_t* __restrict__ b, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    a_i[j] += b[j];
    a_f[j] += b[m + j];
    a_g[j] += b[2 * m + j];
    a_o[j] += b[3 * m + j];
  }
}
// c = f⊙c_prev + i⊙g, and h = c (tanh and ⊙o follow)
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void cell_row(scalar_t* __restrict__ c, scalar_t* __restrict__ h,
                                      const scalar_t* __restrict__ i,
                                      const scalar_t* __restrict__ f,
                                      const scalar_t* __restrict__ g,
                                      const scalar_t* __restrict__ c_prev, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    c[j] = f[j] * c_prev[j] + i[j] * g[j];
    h[j] = c[j];
  }
}
// h ⊙= o
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void scale_row(scalar_t* __restrict__ h, const scalar_t* __restrict__ o,
                                       int64_t m) {
  for (int64_t j = 0; j < m; ++j) h[j] *= o[j];
}

// One batch row of a step, over m hidden units. On entry a_i … a_o hold x·w_ihᵀ + bias and gh
// [4m] holds h_{t-1}·w_hhᵀ (its i | f | g | o parts, m each), or gh is nullptr when the step's
// GEMM has added it already; on exit a_i … a_o hold the activated gates, c and h the new
// states.
template <typename scalar_t>
void gates_forward(scalar_t* a_i, scalar_t* a_f, scalar_t* a_g, scalar_t* a_o, const scalar_t* gh,
                   const scalar_t* c_prev, scalar_t* c, scalar_t* h, int64_t m) {
  if (gh) add_gate_rows(a_i, a_f, a_g, a_o, gh, m);
  cpu::sigmoid_row(a_i, m);
  cpu::sigmoid_row(a_f, m);
  cpu::tanh_row(a_g, static_cast<const scalar_t*>(nullptr), m);
  cpu::sigmoid_row(a_o, m);
  cell_row(c, h, a_i, a_f, a_g, c_prev, m);
  cpu::tanh_row(h, static_cast<const scalar_t*>(nullptr), m);
  scale_row(h, a_o, m);
}

// One batch row of a backward step, over m hidden units (lstm.h's formulas). On entry d_o
// holds tanh(c_t), on exit do; dh and dcc hold what step t+1 passed back through h and c
// when `carry`, and dcc is overwritten with what this step passes back through c. dc may be
// nullptr (zero). dh is only read: the step's GEMM writes the next carry through h.
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void gates_backward(
    scalar_t* __restrict__ d_i, scalar_t* __restrict__ d_f, scalar_t* __restrict__ d_g,
    scalar_t* __restrict__ d_o, const scalar_t* __restrict__ dh, scalar_t* __restrict__ dcc,
    const scalar_t* __restrict__ dout, const scalar_t* __restrict__ dc,
    const scalar_t* __restrict__ i, const scalar_t* __restrict__ f, const scalar_t* __restrict__ g,
    const scalar_t* __restrict__ o, const scalar_t* __restrict__ c_prev, bool carry, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    const scalar_t tc = d_o[j];
    const scalar_t gh = carry ? dh[j] + dout[j] : dout[j];
    const scalar_t gc_in = (dc ? dc[j] : scalar_t(0)) + (carry ? dcc[j] : scalar_t(0));
    const scalar_t gc = gc_in + gh * o[j] * (scalar_t(1) - tc * tc);
    d_o[j] = gh * tc * o[j] * (scalar_t(1) - o[j]);
    d_i[j] = gc * g[j] * i[j] * (scalar_t(1) - i[j]);
    d_f[j] = gc * c_prev[j] * f[j] * (scalar_t(1) - f[j]);
    d_g[j] = gc * i[j] * (scalar_t(1) - g[j] * g[j]);
    dcc[j] = gc * f[j];
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
void lstm_forward_cpu(scalar_t* out, scalar_t* c, scalar_t* gates, scalar_t* workspace,
                      const scalar_t* x, const scalar_t* h0, const scalar_t* c0,
                      const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* bias, int64_t T,
                      int64_t B, int64_t I, int64_t H, bool reverse) {
  const int64_t BH = B * H, G = 4 * H;
  const StepOrder order{T, reverse};
  scalar_t* gh_all = workspace;  // [B,4H]: a thread with units [c0,c1) uses [B,4m] from B·4·c0
  // a [T,B,4H]: in training `gates`, which the step then overwrites with the activated gates;
  // in inference the rest of the workspace
  scalar_t* a = gates ? gates : workspace + B * G;

  // a = x·w_ihᵀ + bias of loop steps [s0,s1): [rows,I]·[I,4H] -> [rows,4H]
  auto project = [&](int64_t s0, int64_t s1) {
    const int64_t t0 = order.range_begin(s0, s1), rows = (s1 - s0) * B;
    scalar_t* p = a + t0 * B * G;
    cpu::gemm<scalar_t>(false, true, rows, G, I, x + t0 * B * I, I, w_ih, I, 0, p, G);
    if (bias) cpu::add_bias(p, bias, rows, G, G);
  };
  auto prepare = [&](cpu::GatedStep<scalar_t>& st, const cpu::Slice& slice) {
    st.prepare(4, B, H, w_hh, slice);
  };
  auto step = [&](int64_t s, const cpu::Slice& slice, const cpu::GatedStep<scalar_t>& st) {
    const int64_t t = order.time(s), u0 = slice.c0, m = slice.size();
    const bool first = s == 0;
    const scalar_t* h_prev = first ? h0 : out + order.prev_time(s) * BH;  // [B,H]
    const scalar_t* c_prev = first ? c0 : c + order.prev_time(s) * BH;    // [B,H]
    // A slice of all H units (H < 2·kMinSplitColumns: one column block, whatever the thread
    // count) adds h_prev·w_hhᵀ into a in the GEMM; a narrower one's four gate blocks are not
    // contiguous in a, so its GEMM writes gh [B,4m] (i | f | g | o) and the pass adds it.
    const bool whole = m == H;
    scalar_t* gh = whole ? nullptr : gh_all + B * 4 * u0;
    if (whole) st.gemm(h_prev, H, 1, a + t * B * G, G);
    else st.gemm(h_prev, H, 0, gh, 4 * m);
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* p = a + (t * B + b) * G + u0;
      const int64_t r = t * BH + b * H + u0;
      gates_forward(p, p + H, p + 2 * H, p + 3 * H, whole ? nullptr : gh + b * 4 * m,
                    c_prev + b * H + u0, c + r, out + r, m);
    }
  };
  cpu::forward_schedule<cpu::GatedStep<scalar_t>>(T, B, H, project, prepare, step);
}

// ----------------------------------------------------------------------------------------
// Backward

template <typename scalar_t>
void lstm_backward_cpu(scalar_t* dx, scalar_t* dh0, scalar_t* dc0, scalar_t* dw_ih, scalar_t* dw_hh,
                       scalar_t* dbias, scalar_t* workspace, const scalar_t* dout,
                       const scalar_t* dc, const scalar_t* x, const scalar_t* h0,
                       const scalar_t* c0, const scalar_t* w_ih, const scalar_t* w_hh,
                       const scalar_t* out, const scalar_t* c, const scalar_t* gates, int64_t T,
                       int64_t B, int64_t I, int64_t H, bool reverse) {
  const int64_t BH = B * H, G = 4 * H;
  const StepOrder order{T, reverse};
  scalar_t* da = workspace;              // [T,B,4H]: di | df | dg | do
  scalar_t* dh = workspace + T * B * G;  // [B,H]: the gradient passed back through h
  scalar_t* dcc = dh + BH;               // [B,H]: the gradient passed back through c
  // k counts the forward's steps in reverse order: loop step s = T-1-k. A thread that owns
  // units [c0,c1) finishes their gate gradients of step k; once every thread has, it writes
  // its columns of da·w_hh, the gradient passed back through h.
  auto prepare = [&](cpu::StepGemm<scalar_t>& g, const cpu::Slice& slice) {
    // this thread's carry: da[B,4H]·w_hh[:, c0:c1], w_hh's columns c0…c1 packed once
    g.prepare(false, B, slice.size(), G, w_hh + slice.c0, H);
  };
  auto finish = [&](int64_t k, const cpu::Slice& slice) {
    const int64_t s = T - 1 - k, t = order.time(s), u0 = slice.c0, m = slice.size();
    const scalar_t* c_prev = s == 0 ? c0 : c + order.prev_time(s) * BH;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b, r = row * H + u0;
      scalar_t* d = da + row * G + u0;
      const scalar_t* gt = gates + row * G + u0;
      std::copy(c + r, c + r + m, d + 3 * H);  // tanh(c_t), recomputed in do's place
      cpu::tanh_row(d + 3 * H, static_cast<const scalar_t*>(nullptr), m);
      gates_backward(d, d + H, d + 2 * H, d + 3 * H, dh + b * H + u0, dcc + b * H + u0, dout + r,
                     dc ? dc + r : nullptr, gt, gt + H, gt + 2 * H, gt + 3 * H, c_prev + b * H + u0,
                     s != T - 1, m);
    }
  };
  auto carry = [&](int64_t k, const cpu::Slice& slice, const cpu::StepGemm<scalar_t>& g) {
    const int64_t s = T - 1 - k;
    if (s == 0 && !dh0) return;
    // in the forward pass a += h_{t-1}·w_hhᵀ, so dh_{t-1} = da·w_hh[:, c0:c1]
    g(da + order.time(s) * B * G, G, 0, dh + slice.c0, H);
  };
  auto initial_state_grads = [&] {
    if (dh0) std::copy(dh, dh + BH, dh0);
    if (dc0) std::copy(dcc, dcc + BH, dc0);
  };
  // The weight and bias gradients of backward steps [k0,k1) (loop steps [T-k1, T-k0), a run
  // of consecutive time indices [ta,tb)) for hidden units [c0,c1): their rows of each gate
  // block, written when `write` (the first run), else added. A block of all H units takes
  // the four gate blocks in one call each (their rows are then contiguous).
  auto weight_grads = [&](int64_t k0, int64_t k1, bool write, const cpu::Slice& block) {
    const int64_t ta = order.range_begin(T - k1, T - k0), tb = ta + (k1 - k0);
    const int64_t rows = (tb - ta) * B, m = block.size();
    const scalar_t beta = write ? 0 : 1;
    const bool whole = m == H;
    for (int64_t gate = 0; gate < (whole ? 1 : 4); ++gate) {
      const int64_t col = gate * H + block.c0, n = whole ? G : m;  // first row, column; width
      if (dw_ih)                                                   // daᵀ·x
        cpu::gemm<scalar_t>(true, false, n, I, rows, da + ta * B * G + col, G, x + ta * B * I, I,
                            beta, dw_ih + col * I, I);
      if (dw_hh)  // Σ_t da_tᵀ·h_{t-1}
        cpu::recurrent_weight_grad(dw_hh + col * H, da + col, G, n, h0, out, order, ta, tb, B, H,
                                   beta);
      if (dbias) cpu::column_sums(dbias + col, da + ta * B * G + col, rows, n, G, write);
    }
  };
  // dx = da·w_ih for backward steps [k0,k1)
  auto input_grads = [&](int64_t k0, int64_t k1) {
    const int64_t ta = order.range_begin(T - k1, T - k0), rows = (k1 - k0) * B;
    cpu::gemm<scalar_t>(false, false, rows, I, G, da + ta * B * G, G, w_ih, I, 0, dx + ta * B * I,
                        I);
  };
  cpu::backward_schedule<cpu::StepGemm<scalar_t>>(T, B, H, dx != nullptr, prepare, finish, carry,
                                                  initial_state_grads, weight_grads, input_grads);
}

template void lstm_forward_cpu<float>(float*, float*, float*, float*, const float*, const float*,
                                      const float*, const float*, const float*, const float*,
                                      int64_t, int64_t, int64_t, int64_t, bool);
template void lstm_forward_cpu<double>(double*, double*, double*, double*, const double*,
                                       const double*, const double*, const double*, const double*,
                                       const double*, int64_t, int64_t, int64_t, int64_t, bool);
template void lstm_backward_cpu<float>(float*, float*, float*, float*, float*, float*, float*,
                                       const float*, const float*, const float*, const float*,
                                       const float*, const float*, const float*, const float*,
                                       const float*, const float*, int64_t, int64_t, int64_t,
                                       int64_t, bool);
template void lstm_backward_cpu<double>(double*, double*, double*, double*, double*, double*,
                                        double*, const double*, const double*, const double*,
                                        const double*, const double*, const double*, const double*,
                                        const double*, const double*, const double*, int64_t,
                                        int64_t, int64_t, int64_t, bool);

}  // namespace rnnlm_ext
