// cells_cuda.cu — whole-sequence forward and backward of one LSTM or GRU layer on a CUDA GPU,
// per step. The launchers' contract: cells_cuda.h; layouts and math: lstm.h, gru.h.
// Order: the path check, LSTM (pointwise kernels, forward, backward), GRU (the same), the
// launchers. Steps run in rnn.h's StepOrder, as the Elman kernels (rnn_cuda.cu), whose
// helpers (errors, dtypes, GEMM, column sums) this shares through cuda_common.h.
//
// Half types are stored as such and computed in float32 inside the pointwise kernels, as the
// Elman kernels do; the GEMMs accumulate in float32 (Traits::compute).
#include "cells_cuda.h"

#include <stdexcept>
#include <string>

#include "cuda_common.h"

namespace rnnlm_ext {
namespace {

// What every launcher checks and sets up before it dispatches. These cells have only the
// per-step loop; asking for the persistent one is an error, not a silent fallback, so that a
// caller timing "persistent" knows what ran. Their widest GEMM operand has 4H columns (the
// LSTM's gates, the GRU's saved and dg rows).
void begin(const char* cell, CudaPath path, int64_t T, int64_t B, int64_t I, int64_t H,
           cudaStream_t stream, cublasHandle_t handle) {
  if (path == CudaPath::Persistent)
    throw std::runtime_error(
        std::string("rnnlm_ext: the persistent CUDA path was asked for, but ") + cell +
        " has only the per-step CUDA kernels; use cuda_path 'auto' or "
        "'per_step' (the persistent path is the Elman RNN's)");
  check_int_range(T, B, I, H, 4);
  set_stream(handle, stream);
}

// ----------------------------------------------------------------------------------------
// LSTM pointwise kernels, over one step's n = B·H units (i = b·H + j); a row of the gate
// blocks is [B,4H] with gate k of unit j at column k·H + j.

// a [B,4H]: x·w_ihᵀ + h_{t-1}·w_hhᵀ on entry (no bias); overwritten with the activated
// i | f | g | o when `keep` (training: the backward's derivatives are functions of them).
// bias [4H] or nullptr; c_prev [B,H]; h, c [B,H] written.
template <typename scalar_t>
__global__ void lstm_forward_kernel(scalar_t* h, scalar_t* c, scalar_t* a, const scalar_t* bias,
                                    const scalar_t* c_prev, bool keep, int64_t n, int64_t H) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % H;
    scalar_t* ab = a + (i / H) * 4 * H + j;  // this unit's i gate; f, g, o at +H, +2H, +3H
    acc_t pre[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      pre[k] = Tr::load(ab[k * H]) + (bias ? Tr::load(bias[k * H + j]) : acc_t(0));
    const acc_t ig = sigmoid_acc(pre[0]), fg = sigmoid_acc(pre[1]);
    const acc_t gg = tanh_acc(pre[2]), og = sigmoid_acc(pre[3]);
    const acc_t ct = fg * Tr::load(c_prev[i]) + ig * gg;  // c_t = f ⊙ c_{t-1} + i ⊙ g
    c[i] = Tr::store(ct);
    h[i] = Tr::store(og * tanh_acc(ct));  // h_t = o ⊙ tanh(c_t)
    if (keep) {
      ab[0] = Tr::store(ig);
      ab[H] = Tr::store(fg);
      ab[2 * H] = Tr::store(gg);
      ab[3 * H] = Tr::store(og);
    }
  }
}

// In the forward pass this was c_t = f ⊙ c_{t-1} + i ⊙ g, h_t = o ⊙ tanh(c_t), with
// i, f, o = σ(a_·), g = tanh(a_g); so now, with dh = dout_t + the carry through h and
// dc_t = dc_in_t + the carry through c + dh ⊙ o ⊙ (1 − tanh²c_t):
//   da = [dc_t⊙g⊙i(1−i), dc_t⊙c_{t-1}⊙f(1−f), dc_t⊙i⊙(1−g²), dh⊙tanh(c_t)⊙o(1−o)]
// and the carry through c to the step before is dc_t ⊙ f. The carry through h (da·w_hh) is
// the step's GEMM. da [B,4H] written; dc_out [B,H] written unless nullptr (it may be
// dc_carry: each thread reads its element before writing it); dh_carry, dc_carry [B,H] read
// when `carry`; dout [B,H]; dc [B,H] or nullptr; gates [B,4H]; c, c_prev [B,H].
template <typename scalar_t>
__global__ void lstm_backward_kernel(scalar_t* da, scalar_t* dc_out, const scalar_t* dh_carry,
                                     const scalar_t* dc_carry, const scalar_t* dout,
                                     const scalar_t* dc, const scalar_t* gates, const scalar_t* c,
                                     const scalar_t* c_prev, bool carry, int64_t n, int64_t H) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = (i / H) * 4 * H + i % H;  // this unit's i gate in gates and da
    const acc_t ig = Tr::load(gates[row]), fg = Tr::load(gates[row + H]);
    const acc_t gg = Tr::load(gates[row + 2 * H]), og = Tr::load(gates[row + 3 * H]);
    const acc_t tc = tanh_acc(Tr::load(c[i]));
    const acc_t dh = Tr::load(dout[i]) + (carry ? Tr::load(dh_carry[i]) : acc_t(0));
    acc_t dct = dh * og * (acc_t(1) - tc * tc);
    if (dc) dct += Tr::load(dc[i]);
    if (carry) dct += Tr::load(dc_carry[i]);
    da[row] = Tr::store(dct * gg * ig * (acc_t(1) - ig));
    da[row + H] = Tr::store(dct * Tr::load(c_prev[i]) * fg * (acc_t(1) - fg));
    da[row + 2 * H] = Tr::store(dct * ig * (acc_t(1) - gg * gg));
    da[row + 3 * H] = Tr::store(dh * tc * og * (acc_t(1) - og));
    if (dc_out) dc_out[i] = Tr::store(dct * fg);
  }
}

// ----------------------------------------------------------------------------------------
// LSTM forward

template <typename scalar_t>
void lstm_forward(scalar_t* out, scalar_t* c, scalar_t* gates, const scalar_t* x,
                  const scalar_t* h0, const scalar_t* c0, const scalar_t* w_ih,
                  const scalar_t* w_hh, const scalar_t* bias, int64_t T, int64_t B, int64_t I,
                  int64_t H, bool reverse, bool train, cudaStream_t stream, cublasHandle_t handle) {
  const int64_t BH = B * H, G = 4 * H;
  const StepOrder order{T, reverse};
  // a = x·w_ihᵀ for all T·B rows at once, into gates: [T·B,I]·[I,4H] -> [T·B,4H]
  gemm<scalar_t>(handle, false, true, T * B, G, I, x, I, w_ih, I, 0, gates, G);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = order.time(s);
    const bool first = s == 0;
    const scalar_t* h_prev = first ? h0 : out + order.prev_time(s) * BH;        // [B,H]
    const scalar_t* c_prev = first ? c0 : c + order.prev_time(s) * BH;          // [B,H]
    scalar_t* a = gates + t * B * G;                                            // [B,4H]
    gemm<scalar_t>(handle, false, true, B, G, H, h_prev, H, w_hh, H, 1, a, G);  // a += h·w_hhᵀ
    lstm_forward_kernel<scalar_t><<<pointwise_blocks(BH), kPointwiseThreads, 0, stream>>>(
        out + t * BH, c + t * BH, a, bias, c_prev, train, BH, H);
    check_cuda(cudaGetLastError(), "lstm_forward_kernel launch");
  }
}

// ----------------------------------------------------------------------------------------
// LSTM backward

template <typename scalar_t>
void lstm_backward(scalar_t* dx, scalar_t* dh0, scalar_t* dc0, scalar_t* dw_ih, scalar_t* dw_hh,
                   scalar_t* dbias, scalar_t* workspace, const scalar_t* dout, const scalar_t* dc,
                   const scalar_t* x, const scalar_t* h0, const scalar_t* c0, const scalar_t* w_ih,
                   const scalar_t* w_hh, const scalar_t* out, const scalar_t* c,
                   const scalar_t* gates, int64_t T, int64_t B, int64_t I, int64_t H, bool reverse,
                   cudaStream_t stream, cublasHandle_t handle) {
  const int64_t BH = B * H, G = 4 * H;
  const StepOrder order{T, reverse};
  scalar_t* da = workspace;                    // [T,B,4H]
  scalar_t* dh_carry = workspace + T * B * G;  // [B,H]: da_{t+1}·w_hh
  scalar_t* dc_carry = dh_carry + BH;          // [B,H]: dc_{t+1} ⊙ f_{t+1}
  // The forward's loop steps in reverse order.
  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = order.time(s);
    const bool first = s == 0;
    const scalar_t* c_prev = first ? c0 : c + order.prev_time(s) * BH;  // [B,H]
    // step 0 hands its carries to h0 and c0 (where asked for)
    scalar_t* dh_to = first ? dh0 : dh_carry;
    scalar_t* dc_to = first ? dc0 : dc_carry;
    lstm_backward_kernel<scalar_t><<<pointwise_blocks(BH), kPointwiseThreads, 0, stream>>>(
        da + t * B * G, dc_to, dh_carry, dc_carry, dout + t * BH, dc ? dc + t * BH : nullptr,
        gates + t * B * G, c + t * BH, c_prev, s != T - 1, BH, H);
    check_cuda(cudaGetLastError(), "lstm_backward_kernel launch");
    // in the forward pass a_t += h_{t-1}·w_hhᵀ, so dh_{t-1} = da_t·w_hh: [B,4H]·[4H,H]
    if (dh_to)
      gemm<scalar_t>(handle, false, false, B, H, G, da + t * B * G, G, w_hh, H, 0, dh_to, H);
  }

  // The rest is batched over all T·B rows.
  if (dw_ih) gemm<scalar_t>(handle, true, false, G, I, T * B, da, G, x, I, 0, dw_ih, I);  // daᵀ·x
  if (dw_hh) {  // Σ_t da_tᵀ·h_{t-1}: the step that read h0, then the rows of out
    const PrevStates p = split_prev_states(order, 0, T);
    gemm<scalar_t>(handle, true, false, G, H, B, da + p.first * B * G, G, h0, H, 0, dw_hh, H);
    if (p.hi > p.lo)
      gemm<scalar_t>(handle, true, false, G, H, (p.hi - p.lo) * B, da + p.lo * B * G, G,
                     out + p.prev_of_lo * BH, H, 1, dw_hh, H);
  }
  if (dbias) column_sum<scalar_t>(dbias, da, T * B, G, G, stream);                      // Σ da
  if (dx) gemm<scalar_t>(handle, false, false, T * B, I, G, da, G, w_ih, I, 0, dx, I);  // da·w_ih
}

// ----------------------------------------------------------------------------------------
// GRU pointwise kernels, over one step's n = B·H units (i = b·H + j); gate k of unit j is at
// column k·H + j of its row.

// gi [B, ldg]: on entry its first 3H columns hold x·w_ihᵀ (no bias). gh [B,3H]: h_{t-1}·w_hhᵀ
// (no bias). b_ih, b_hh [3H] or nullptr. When `keep` (training, ldg = 4H: gi is the step's
// block of saved), gi's row becomes r | z | n | gh_n + b_hn. h_prev [B,H]; h [B,H] written.
template <typename scalar_t>
__global__ void gru_forward_kernel(scalar_t* h, scalar_t* gi, const scalar_t* gh,
                                   const scalar_t* b_ih, const scalar_t* b_hh,
                                   const scalar_t* h_prev, bool keep, int64_t ldg, int64_t n,
                                   int64_t H) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / H, j = i % H;
    scalar_t* gib = gi + b * ldg + j;          // r at +0, z at +H, n at +2H
    const scalar_t* ghb = gh + b * 3 * H + j;  // likewise
    acc_t a[3], hh[3];  // the input and hidden parts of r, z, n, biases included
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      a[k] = Tr::load(gib[k * H]) + (b_ih ? Tr::load(b_ih[k * H + j]) : acc_t(0));
      hh[k] = Tr::load(ghb[k * H]) + (b_hh ? Tr::load(b_hh[k * H + j]) : acc_t(0));
    }
    const acc_t r = sigmoid_acc(a[0] + hh[0]), z = sigmoid_acc(a[1] + hh[1]);
    const acc_t nn = tanh_acc(a[2] + r * hh[2]);  // n = tanh(gi_n + r ⊙ gh_n)
    const acc_t hp = Tr::load(h_prev[i]);
    h[i] = Tr::store(nn + z * (hp - nn));  // h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}
    if (keep) {
      gib[0] = Tr::store(r);
      gib[H] = Tr::store(z);
      gib[2 * H] = Tr::store(nn);
      gib[3 * H] = Tr::store(hh[2]);
    }
  }
}

// In the forward pass this was h = (1−z)⊙n + z⊙h_{t-1} with n = tanh(a_n), a_n = gi_n +
// r⊙gh_n, r = σ(a_r), z = σ(a_z); so now, with dh = dout_t + the carry from step t+1:
// dn (at a_n) = dh⊙(1−z)⊙(1−n²), dz (at a_z) = dh⊙(h_{t-1}−n)⊙z(1−z), dr (at a_r) =
// dn⊙gh_n⊙r(1−r), and gh_n's own gradient is dn⊙r. dh_out gets dh⊙z, to which the step's GEMM
// adds dgh·w_hh. dg [B,4H] written (dr | dz | dn⊙r | dn); dh_out [B,H] written unless nullptr
// (it may be dh_carry: each thread reads its element before writing it); dh_carry [B,H] read
// when `carry`; dout, h_prev [B,H]; saved [B,4H].
template <typename scalar_t>
__global__ void gru_backward_kernel(scalar_t* dg, scalar_t* dh_out, const scalar_t* dh_carry,
                                    const scalar_t* dout, const scalar_t* saved,
                                    const scalar_t* h_prev, bool carry, int64_t n, int64_t H) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = (i / H) * 4 * H + i % H;  // this unit's r in saved and dg
    const acc_t r = Tr::load(saved[row]), z = Tr::load(saved[row + H]);
    const acc_t nn = Tr::load(saved[row + 2 * H]), gh_n = Tr::load(saved[row + 3 * H]);
    const acc_t dh = Tr::load(dout[i]) + (carry ? Tr::load(dh_carry[i]) : acc_t(0));
    const acc_t dn = dh * (acc_t(1) - z) * (acc_t(1) - nn * nn);
    dg[row] = Tr::store(dn * gh_n * r * (acc_t(1) - r));
    dg[row + H] = Tr::store(dh * (Tr::load(h_prev[i]) - nn) * z * (acc_t(1) - z));
    dg[row + 2 * H] = Tr::store(dn * r);
    dg[row + 3 * H] = Tr::store(dn);
    if (dh_out) dh_out[i] = Tr::store(dh * z);
  }
}

// ----------------------------------------------------------------------------------------
// GRU forward

template <typename scalar_t>
void gru_forward(scalar_t* out, scalar_t* saved, scalar_t* workspace, const scalar_t* x,
                 const scalar_t* h0, const scalar_t* w_ih, const scalar_t* w_hh,
                 const scalar_t* b_ih, const scalar_t* b_hh, int64_t T, int64_t B, int64_t I,
                 int64_t H, bool reverse, cudaStream_t stream, cublasHandle_t handle) {
  const int64_t BH = B * H, G = 3 * H;
  const StepOrder order{T, reverse};
  scalar_t* gh = workspace;  // [B,3H]
  // gi [T,B,3H] with row stride ldg: in training the first 3H columns of saved, which the
  // kernel then overwrites with r, z, n; in inference the rest of the workspace
  const int64_t ldg = saved ? 4 * H : G;
  scalar_t* gi = saved ? saved : workspace + B * G;
  // gi = x·w_ihᵀ for all T·B rows at once: [T·B,I]·[I,3H] -> [T·B,3H]
  gemm<scalar_t>(handle, false, true, T * B, G, I, x, I, w_ih, I, 0, gi, ldg);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = order.time(s);
    const scalar_t* h_prev = s == 0 ? h0 : out + order.prev_time(s) * BH;        // [B,H]
    gemm<scalar_t>(handle, false, true, B, G, H, h_prev, H, w_hh, H, 0, gh, G);  // h·w_hhᵀ
    gru_forward_kernel<scalar_t><<<pointwise_blocks(BH), kPointwiseThreads, 0, stream>>>(
        out + t * BH, gi + t * B * ldg, gh, b_ih, b_hh, h_prev, saved != nullptr, ldg, BH, H);
    check_cuda(cudaGetLastError(), "gru_forward_kernel launch");
  }
}

// ----------------------------------------------------------------------------------------
// GRU backward

template <typename scalar_t>
void gru_backward(scalar_t* dx, scalar_t* dh0, scalar_t* dw_ih, scalar_t* dw_hh, scalar_t* db_ih,
                  scalar_t* db_hh, scalar_t* workspace, const scalar_t* dout, const scalar_t* x,
                  const scalar_t* h0, const scalar_t* w_ih, const scalar_t* w_hh,
                  const scalar_t* out, const scalar_t* saved, int64_t T, int64_t B, int64_t I,
                  int64_t H, bool reverse, cudaStream_t stream, cublasHandle_t handle) {
  const int64_t BH = B * H, G = 3 * H, L = 4 * H;  // L: the row length of saved and dg
  const int64_t TB = T * B;
  const StepOrder order{T, reverse};
  scalar_t* dg = workspace;          // [T,B,4H]: dr | dz | dn⊙r | dn
  scalar_t* dh_carry = dg + TB * L;  // [B,H]: the gradient passed to the step before
  // The forward's loop steps in reverse order.
  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = order.time(s);
    const scalar_t* h_prev = s == 0 ? h0 : out + order.prev_time(s) * BH;  // [B,H]
    scalar_t* dh_to = s == 0 ? dh0 : dh_carry;  // step 0 hands its carry to h0 (if asked for)
    gru_backward_kernel<scalar_t><<<pointwise_blocks(BH), kPointwiseThreads, 0, stream>>>(
        dg + t * B * L, dh_to, dh_carry, dout + t * BH, saved + t * B * L, h_prev, s != T - 1, BH,
        H);
    check_cuda(cudaGetLastError(), "gru_backward_kernel launch");
    // in the forward pass gh = h_{t-1}·w_hhᵀ, so dh_{t-1} += dgh·w_hh: [B,3H]·[3H,H]
    if (dh_to)
      gemm<scalar_t>(handle, false, false, B, H, G, dg + t * B * L, L, w_hh, H, 1, dh_to, H);
  }

  // The rest is batched over all T·B rows. dgi = dg's columns [0,2H) and [3H,4H) (the n gate's
  // input part has dn, its hidden part dn⊙r); dgh = dg's columns [0,3H).
  const scalar_t* dg_n = dg + G;  // [T·B,H] with row stride 4H: dn
  if (dw_ih) {                    // dgiᵀ·x, the r and z rows, then the n rows
    gemm<scalar_t>(handle, true, false, 2 * H, I, TB, dg, L, x, I, 0, dw_ih, I);
    gemm<scalar_t>(handle, true, false, H, I, TB, dg_n, L, x, I, 0, dw_ih + 2 * H * I, I);
  }
  if (dw_hh) {  // Σ_t dgh_tᵀ·h_{t-1}: the step that read h0, then the rows of out
    const PrevStates p = split_prev_states(order, 0, T);
    gemm<scalar_t>(handle, true, false, G, H, B, dg + p.first * B * L, L, h0, H, 0, dw_hh, H);
    if (p.hi > p.lo)
      gemm<scalar_t>(handle, true, false, G, H, (p.hi - p.lo) * B, dg + p.lo * B * L, L,
                     out + p.prev_of_lo * BH, H, 1, dw_hh, H);
  }
  if (db_ih) {  // Σ dgi
    column_sum<scalar_t>(db_ih, dg, TB, 2 * H, L, stream);
    column_sum<scalar_t>(db_ih + 2 * H, dg_n, TB, H, L, stream);
  }
  if (db_hh) column_sum<scalar_t>(db_hh, dg, TB, G, L, stream);  // Σ dgh
  if (dx) {  // dgi·w_ih, the r and z columns, then the n columns
    gemm<scalar_t>(handle, false, false, TB, I, 2 * H, dg, L, w_ih, I, 0, dx, I);
    gemm<scalar_t>(handle, false, false, TB, I, H, dg_n, L, w_ih + 2 * H * I, I, 1, dx, I);
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------
// Launchers

void lstm_forward_cuda(void* out, void* c, void* gates, const void* x, const void* h0,
                       const void* c0, const void* w_ih, const void* w_hh, const void* bias,
                       int64_t T, int64_t B, int64_t I, int64_t H, DType dtype, bool reverse,
                       bool train, CudaPath path, cudaStream_t stream, cublasHandle_t handle) {
  begin("the LSTM", path, T, B, I, H, stream, handle);
  dispatch_dtype(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::scalar;
    auto in = [](const void* p) { return static_cast<const scalar_t*>(p); };
    lstm_forward<scalar_t>(static_cast<scalar_t*>(out), static_cast<scalar_t*>(c),
                           static_cast<scalar_t*>(gates), in(x), in(h0), in(c0), in(w_ih), in(w_hh),
                           in(bias), T, B, I, H, reverse, train, stream, handle);
  });
}

void lstm_backward_cuda(void* dx, void* dh0, void* dc0, void* dw_ih, void* dw_hh, void* dbias,
                        void* workspace, const void* dout, const void* dc, const void* x,
                        const void* h0, const void* c0, const void* w_ih, const void* w_hh,
                        const void* out, const void* c, const void* gates, int64_t T, int64_t B,
                        int64_t I, int64_t H, DType dtype, bool reverse, CudaPath path,
                        cudaStream_t stream, cublasHandle_t handle) {
  begin("the LSTM", path, T, B, I, H, stream, handle);
  dispatch_dtype(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::scalar;
    auto in = [](const void* p) { return static_cast<const scalar_t*>(p); };
    auto grad = [](void* p) { return static_cast<scalar_t*>(p); };
    lstm_backward<scalar_t>(grad(dx), grad(dh0), grad(dc0), grad(dw_ih), grad(dw_hh), grad(dbias),
                            grad(workspace), in(dout), in(dc), in(x), in(h0), in(c0), in(w_ih),
                            in(w_hh), in(out), in(c), in(gates), T, B, I, H, reverse, stream,
                            handle);
  });
}

void gru_forward_cuda(void* out, void* saved, void* workspace, const void* x, const void* h0,
                      const void* w_ih, const void* w_hh, const void* b_ih, const void* b_hh,
                      int64_t T, int64_t B, int64_t I, int64_t H, DType dtype, bool reverse,
                      CudaPath path, cudaStream_t stream, cublasHandle_t handle) {
  begin("the GRU", path, T, B, I, H, stream, handle);
  dispatch_dtype(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::scalar;
    auto in = [](const void* p) { return static_cast<const scalar_t*>(p); };
    gru_forward<scalar_t>(static_cast<scalar_t*>(out), static_cast<scalar_t*>(saved),
                          static_cast<scalar_t*>(workspace), in(x), in(h0), in(w_ih), in(w_hh),
                          in(b_ih), in(b_hh), T, B, I, H, reverse, stream, handle);
  });
}

void gru_backward_cuda(void* dx, void* dh0, void* dw_ih, void* dw_hh, void* db_ih, void* db_hh,
                       void* workspace, const void* dout, const void* x, const void* h0,
                       const void* w_ih, const void* w_hh, const void* out, const void* saved,
                       int64_t T, int64_t B, int64_t I, int64_t H, DType dtype, bool reverse,
                       CudaPath path, cudaStream_t stream, cublasHandle_t handle) {
  begin("the GRU", path, T, B, I, H, stream, handle);
  dispatch_dtype(dtype, [&](auto type) {
    using scalar_t = typename decltype(type)::scalar;
    auto in = [](const void* p) { return static_cast<const scalar_t*>(p); };
    auto grad = [](void* p) { return static_cast<scalar_t*>(p); };
    gru_backward<scalar_t>(grad(dx), grad(dh0), grad(dw_ih), grad(dw_hh), grad(db_ih), grad(db_hh),
                           grad(workspace), in(dout), in(x), in(h0), in(w_ih), in(w_hh), in(out),
                           in(saved), T, B, I, H, reverse, stream, handle);
  });
}

}  // namespace rnnlm_ext
