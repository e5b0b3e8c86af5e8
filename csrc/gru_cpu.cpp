// gru_cpu.cpp — whole-sequence forward and backward of one GRU layer on the CPU.
// Layouts and the math: gru.h. Order: pointwise passes, forward, backward.
//
// The same structure as the Elman cell (rnn_cpu.cpp), on the machinery in cpu_*.h: the input
// projection and the weight/input gradients are GEMMs over all T·B rows; per step, one GEMM
// [B,H]·[H,3H] and one vectorised pass for the gates and the state update. When threads share
// the loop by hidden columns (cpu_threads.h), a thread owns hidden units [c0,c1), that is
// the same columns of each of the three gate blocks: the pointwise pass needs r, z and n of
// a unit together.
#include "gru.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_gated.h"
#include "cpu_gemm.h"
#include "cpu_simd.h"
#include "cpu_threads.h"

namespace rnnlm_ext {
namespace {

// The arithmetic of the gates, row by row (RNNLM_EXT_VECTOR_CLONES: cpu_simd.h). No two
// pointers of a call overlap (__restrict__: GCC vectorises the loops only when it knows that).
// a += b, twice
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void add_rows(scalar_t* __restrict__ a1, const scalar_t* __restrict__ b1,
                                      scalar_t* __restrict__ a2, const scalar_t* __restrict__ b2,
                                      int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    a1[j] += b1[j];
    a2[j] += b2[j];
  }
}
// gh_n += b_hn, then n += r ⊙ gh_n
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void candidate_row(scalar_t* __restrict__ n, scalar_t* __restrict__ gh_n,
                                           const scalar_t* __restrict__ r,
                                           const scalar_t* __restrict__ b_hn, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    gh_n[j] += b_hn[j];
    n[j] += r[j] * gh_n[j];
  }
}
// h = (1−z)⊙n + z⊙h_prev
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void update_row(scalar_t* __restrict__ h, const scalar_t* __restrict__ n,
                                        const scalar_t* __restrict__ z,
                                        const scalar_t* __restrict__ h_prev, int64_t m) {
  for (int64_t j = 0; j < m; ++j) h[j] = n[j] + z[j] * (h_prev[j] - n[j]);
}

// One batch row of a step, over m hidden units. On entry r, z, n hold gi (b_ih, and b_hh's r
// and z parts, already added) and gh_r, gh_z, gh_n hold h_{t-1}·w_hhᵀ without bias. On exit
// r, z, n hold the gates, gh_n holds gh_n + b_hn (copied to gh_n_out too, unless nullptr),
// and h the new state.
template <typename scalar_t>
void gates_forward(scalar_t* r, scalar_t* z, scalar_t* n, const scalar_t* gh_r,
                   const scalar_t* gh_z, scalar_t* gh_n, scalar_t* gh_n_out, const scalar_t* b_hn,
                   const scalar_t* h_prev, scalar_t* h, int64_t m) {
  add_rows(r, gh_r, z, gh_z, m);
  cpu::sigmoid_row(r, m);
  cpu::sigmoid_row(z, m);
  candidate_row(n, gh_n, r, b_hn, m);
  if (gh_n_out) std::copy(gh_n, gh_n + m, gh_n_out);
  cpu::tanh_row(n, static_cast<const scalar_t*>(nullptr), m);
  update_row(h, n, z, h_prev, m);
}

// One batch row of a backward step, over m hidden units. In the forward pass this was
// h = (1−z)⊙n + z⊙h_prev with n = tanh(a_n), a_n = gi_n + r⊙gh_n, r = σ(a_r), z = σ(a_z); so
// now, with dh = dout + the carry from the next step (when `carry`): dn (at a_n) = dh⊙(1−z)⊙
// (1−n²), dz (at a_z) = dh⊙(h_prev−n)⊙z(1−z), dr (at a_r) = dn⊙gh_n⊙r(1−r), and gh_n's own
// gradient is dn⊙r. dh_prev gets dh⊙z here; dgh·w_hh is added by the step's GEMM.
template <typename scalar_t>
RNNLM_EXT_VECTOR_CLONES void gates_backward(
    scalar_t* __restrict__ dr, scalar_t* __restrict__ dz, scalar_t* __restrict__ dnr,
    scalar_t* __restrict__ dn, scalar_t* __restrict__ dh, const scalar_t* __restrict__ dout,
    const scalar_t* __restrict__ r, const scalar_t* __restrict__ z, const scalar_t* __restrict__ n,
    const scalar_t* __restrict__ gh_n, const scalar_t* __restrict__ h_prev, bool carry, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    const scalar_t g = carry ? dh[j] + dout[j] : dout[j];
    const scalar_t dnj = g * (scalar_t(1) - z[j]) * (scalar_t(1) - n[j] * n[j]);
    dz[j] = g * (h_prev[j] - n[j]) * z[j] * (scalar_t(1) - z[j]);
    dr[j] = dnj * gh_n[j] * r[j] * (scalar_t(1) - r[j]);
    dnr[j] = dnj * r[j];
    dn[j] = dnj;
    dh[j] = g * z[j];
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
void gru_forward_cpu(scalar_t* out, scalar_t* saved, scalar_t* workspace, const scalar_t* x,
                     const scalar_t* h0, const scalar_t* w_ih, const scalar_t* w_hh,
                     const scalar_t* b_ih, const scalar_t* b_hh, int64_t T, int64_t B, int64_t I,
                     int64_t H, bool reverse) {
  const int64_t BH = B * H, G = 3 * H;
  const StepOrder order{T, reverse};
  scalar_t* gh_all = workspace;  // [B,3H]: a thread with units [c0,c1) uses [B,3m] from B·3·c0
  // gi [T,B,3H] with row stride ldg: in training the first 3H columns of saved, which the
  // gates then overwrite with r, z, n; in inference the rest of the workspace
  const int64_t ldg = saved ? 4 * H : G;
  scalar_t* gi = saved ? saved : workspace + B * G;
  // [b_ir + b_hr, b_iz + b_hz, b_in] go into the projection; b_hn [H] stays apart (zeros
  // without bias, so that the step has one code path)
  std::vector<scalar_t> bias(4 * H, scalar_t(0));
  if (b_ih) {
    for (int64_t j = 0; j < G; ++j) bias[j] = j < 2 * H ? b_ih[j] + b_hh[j] : b_ih[j];
    std::copy(b_hh + 2 * H, b_hh + G, bias.begin() + G);
  }
  const scalar_t* b_hn = bias.data() + G;

  // gi = x·w_ihᵀ + bias of loop steps [s0,s1): [rows,I]·[I,3H] -> [rows,3H]
  auto project = [&](int64_t s0, int64_t s1) {
    const int64_t t0 = order.range_begin(s0, s1), rows = (s1 - s0) * B;
    scalar_t* g = gi + t0 * B * ldg;
    cpu::gemm<scalar_t>(false, true, rows, G, I, x + t0 * B * I, I, w_ih, I, 0, g, ldg);
    if (b_ih) cpu::add_bias(g, bias.data(), rows, G, ldg);
  };
  auto prepare = [&](cpu::GatedStep<scalar_t>& st, const cpu::Slice& slice) {
    st.prepare(3, B, H, w_hh, slice);
  };
  auto step = [&](int64_t s, const cpu::Slice& slice, const cpu::GatedStep<scalar_t>& st) {
    const int64_t t = order.time(s), c0 = slice.c0, m = slice.size();
    const scalar_t* h_prev = s == 0 ? h0 : out + order.prev_time(s) * BH;  // [B,H]
    scalar_t* gh = gh_all + B * 3 * c0;  // [B,3m]: this slice's r | z | n columns
    st.gemm(h_prev, H, 0, gh, 3 * m);    // gh = h_prev·w_hh[slice rows]ᵀ
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* g = gi + (t * B + b) * ldg + c0;
      scalar_t* ghb = gh + b * 3 * m;
      gates_forward(g, g + H, g + 2 * H, ghb, ghb + m, ghb + 2 * m, saved ? g + 3 * H : nullptr,
                    b_hn + c0, h_prev + b * H + c0, out + t * BH + b * H + c0, m);
    }
  };
  cpu::forward_schedule<cpu::GatedStep<scalar_t>>(T, B, H, project, prepare, step);
}

// ----------------------------------------------------------------------------------------
// Backward

template <typename scalar_t>
void gru_backward_cpu(scalar_t* dx, scalar_t* dh0, scalar_t* dw_ih, scalar_t* dw_hh,
                      scalar_t* db_ih, scalar_t* db_hh, scalar_t* workspace, const scalar_t* dout,
                      const scalar_t* x, const scalar_t* h0, const scalar_t* w_ih,
                      const scalar_t* w_hh, const scalar_t* out, const scalar_t* saved, int64_t T,
                      int64_t B, int64_t I, int64_t H, bool reverse) {
  const int64_t BH = B * H, G = 3 * H, L = 4 * H;  // L: the row length of saved and dg
  const StepOrder order{T, reverse};
  scalar_t* dg = workspace;              // [T,B,4H]: dr | dz | dn⊙r | dn
  scalar_t* dh = workspace + T * B * L;  // [B,H]: the gradient passed to the step before
  // k counts the forward's steps in reverse order: loop step s = T-1-k. A thread that owns
  // units [c0,c1) finishes their gate gradients of step k; once every thread has, it adds its
  // columns of dgh·w_hh to the gradient passed back.
  auto prepare = [&](cpu::StepGemm<scalar_t>& g, const cpu::Slice& slice) {
    // this thread's carry: dgh[B,3H]·w_hh[:, c0:c1], w_hh's columns c0…c1 packed once
    g.prepare(false, B, slice.size(), G, w_hh + slice.c0, H);
  };
  auto finish = [&](int64_t k, const cpu::Slice& slice) {
    const int64_t s = T - 1 - k, t = order.time(s), c0 = slice.c0;
    const scalar_t* h_prev = s == 0 ? h0 : out + order.prev_time(s) * BH;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      scalar_t* d = dg + row * L + c0;
      const scalar_t* sv = saved + row * L + c0;
      gates_backward(d, d + H, d + 2 * H, d + 3 * H, dh + b * H + c0, dout + row * H + c0, sv,
                     sv + H, sv + 2 * H, sv + 3 * H, h_prev + b * H + c0, s != T - 1, slice.size());
    }
  };
  auto carry = [&](int64_t k, const cpu::Slice& slice, const cpu::StepGemm<scalar_t>& g) {
    const int64_t s = T - 1 - k;
    if (s == 0 && !dh0) return;
    // in the forward pass gh = h_{t-1}·w_hhᵀ, so dh_{t-1} += dgh·w_hh[:, c0:c1]
    g(dg + order.time(s) * B * L, L, 1, dh + slice.c0, H);
  };
  auto dh0_grad = [&] {
    if (dh0) std::copy(dh, dh + BH, dh0);
  };
  // The weight and bias gradients of backward steps [k0,k1) (loop steps [T-k1, T-k0), a run
  // of consecutive time indices [ta,tb)) for hidden units [c0,c1): their rows of each gate
  // block. Written when `write` (the first run), else added. Gate g's gradient is dg's column
  // block g for both dgi and dgh, except n: dgi_n = dn (block 3), dgh_n = dn⊙r (block 2).
  auto unit_weight_grads = [&](int64_t k0, int64_t k1, bool write, int64_t c0, int64_t c1) {
    const int64_t ta = order.range_begin(T - k1, T - k0), tb = ta + (k1 - k0);
    const int64_t rows = (tb - ta) * B, m = c1 - c0;
    const scalar_t beta = write ? 0 : 1;
    for (int64_t gate = 0; gate < 3; ++gate) {
      const int64_t row0 = gate * H + c0;                       // first weight row, bias entry
      const int64_t dgi = (gate == 2 ? 3 * H : gate * H) + c0;  // dgi's first column in dg
      const int64_t dgh = gate * H + c0;                        // dgh's first column in dg
      if (dw_ih)                                                // dgiᵀ·x
        cpu::gemm<scalar_t>(true, false, m, I, rows, dg + ta * B * L + dgi, L, x + ta * B * I, I,
                            beta, dw_ih + row0 * I, I);
      if (dw_hh)  // Σ_t dgh_tᵀ·h_{t-1}
        cpu::recurrent_weight_grad(dw_hh + row0 * H, dg + dgh, L, m, h0, out, order, ta, tb, B, H,
                                   beta);
      if (db_ih) cpu::column_sums(db_ih + row0, dg + ta * B * L + dgi, rows, m, L, write);
      if (db_hh) cpu::column_sums(db_hh + row0, dg + ta * B * L + dgh, rows, m, L, write);
    }
  };
  auto weight_grads = [&](int64_t k0, int64_t k1, bool write, const cpu::Slice& block) {
    unit_weight_grads(k0, k1, write, block.c0, block.c1);
  };
  // dx = dgi·w_ih for backward steps [k0,k1): the r, z columns, then the n columns
  auto input_grad = [&](int64_t k0, int64_t k1) {
    const int64_t ta = order.range_begin(T - k1, T - k0), rows = (k1 - k0) * B;
    const scalar_t* d = dg + ta * B * L;
    cpu::gemm<scalar_t>(false, false, rows, I, 2 * H, d, L, w_ih, I, 0, dx + ta * B * I, I);
    cpu::gemm<scalar_t>(false, false, rows, I, H, d + G, L, w_ih + 2 * H * I, I, 1, dx + ta * B * I,
                        I);
  };
  cpu::backward_schedule<cpu::StepGemm<scalar_t>>(T, B, H, dx != nullptr, prepare, finish, carry,
                                                  dh0_grad, weight_grads, input_grad);
}

template void gru_forward_cpu<float>(float*, float*, float*, const float*, const float*,
                                     const float*, const float*, const float*, const float*,
                                     int64_t, int64_t, int64_t, int64_t, bool);
template void gru_forward_cpu<double>(double*, double*, double*, const double*, const double*,
                                      const double*, const double*, const double*, const double*,
                                      int64_t, int64_t, int64_t, int64_t, bool);
template void gru_backward_cpu<float>(float*, float*, float*, float*, float*, float*, float*,
                                      const float*, const float*, const float*, const float*,
                                      const float*, const float*, const float*, int64_t, int64_t,
                                      int64_t, int64_t, bool);
template void gru_backward_cpu<double>(double*, double*, double*, double*, double*, double*,
                                       double*, const double*, const double*, const double*,
                                       const double*, const double*, const double*, const double*,
                                       int64_t, int64_t, int64_t, int64_t, bool);

}  // namespace rnnlm_ext
