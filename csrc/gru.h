// gru.h — the fused GRU layer (one layer, one direction, whole sequence): layouts, what the
// forward keeps for the backward, and the CPU kernels' declarations (gru_cpu.cpp).
// Plain C++: no torch types. Dimensions T, B, I, H and the step order: rnn.h.
//
// Layouts (row-major, contiguous). Gates stack along rows in PyTorch's order r, z, n:
//   x     [T,B,I]    h0 [B,H]
//   w_ih  [3H,I]     w_hh [3H,H]
//   b_ih  [3H]       b_hh [3H]     both or neither (nullptr): b_hn sits inside r ⊙ (…), so the
//                                  two n-biases cannot be merged (the r and z ones can)
//   out   [T,B,H]    every h_t (h_n is out[T-1], or out[0] when reversed)
//   saved [T,B,4H]   per step r | z | n | gh_n, where gh_n = h_{t-1}·W_hnᵀ + b_hn
//
// Forward:
//   gi  = x·w_ihᵀ + b_ih                one GEMM over all T·B rows
//   gh  = h_{t-1}·w_hhᵀ + b_hh          one GEMM per step, [B,3H]
//   r = σ(gi_r + gh_r)   z = σ(gi_z + gh_z)   n = tanh(gi_n + r ⊙ gh_n)
//   h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}    gates and update in one pass over the step's block
//
// Backward, given dout [T,B,H] (dh_n already folded into its last step), step by step in the
// reverse of the forward's order, dh = dout_t + what step t+1 passed back:
//   dn = dh ⊙ (1 − z) ⊙ (1 − n²)   dz = dh ⊙ (h_{t-1} − n) ⊙ z(1 − z)   dr = dn ⊙ gh_n ⊙ r(1 − r)
//   dgi = [dr, dz, dn]   dgh = [dr, dz, dn ⊙ r]   dh_{t-1} = dh ⊙ z + dgh·w_hh  (one GEMM per step)
// then over all T·B rows: dw_ih = dgiᵀ·x   dx = dgi·w_ih   dw_hh = Σ_t dgh_tᵀ·h_{t-1}
//   db_ih = Σ dgi   db_hh = Σ dgh
// All gradients are written (=), never accumulated, as in rnn.h.
#pragma once

#include <cstdint>

#include "rnn.h"

namespace rnnlm_ext {

// Scratch elements the CPU forward needs: the per-step gh [B,3H] and, in inference (no
// `saved` to hold it), the input projection gi [T,B,3H].
inline int64_t gru_forward_workspace_size(int64_t T, int64_t B, int64_t H, bool train) {
  return B * 3 * H + (train ? 0 : T * B * 3 * H);
}

// out [T,B,H] written. saved [T,B,4H] written when not nullptr (training): the backward needs
// r, z, n (their derivatives are functions of their values) and gh_n (dr needs it, and it
// is not recoverable from out without repeating the step's GEMM). Inference passes nullptr
// and keeps nothing. workspace: gru_forward_workspace_size elements, overwritten.
template <typename scalar_t>
void gru_forward_cpu(scalar_t* out, scalar_t* saved, scalar_t* workspace, const scalar_t* x,
                     const scalar_t* h0, const scalar_t* w_ih, const scalar_t* w_hh,
                     const scalar_t* b_ih, const scalar_t* b_hh, int64_t T, int64_t B, int64_t I,
                     int64_t H, bool reverse);

// Scratch elements the CPU backward needs: every step's gate gradients [T,B,4H] (dr | dz |
// dn ⊙ r | dn: dgh is the first 3H columns, dgi the first 2H and the last H) and the
// gradient carried to the previous step [B,H].
inline int64_t gru_backward_workspace_size(int64_t T, int64_t B, int64_t H) {
  return T * B * 4 * H + B * H;
}

// dout [T,B,H]; x, h0, w_ih, w_hh as in the forward; out [T,B,H] and saved [T,B,4H] the
// forward's. Each gradient pointer may be nullptr: that gradient is then not computed.
// dx [T,B,I]  dh0 [B,H]  dw_ih [3H,I]  dw_hh [3H,H]  db_ih [3H]  db_hh [3H].
// workspace: gru_backward_workspace_size elements, overwritten.
template <typename scalar_t>
void gru_backward_cpu(scalar_t* dx, scalar_t* dh0, scalar_t* dw_ih, scalar_t* dw_hh,
                      scalar_t* db_ih, scalar_t* db_hh, scalar_t* workspace, const scalar_t* dout,
                      const scalar_t* x, const scalar_t* h0, const scalar_t* w_ih,
                      const scalar_t* w_hh, const scalar_t* out, const scalar_t* saved, int64_t T,
                      int64_t B, int64_t I, int64_t H, bool reverse);

}  // namespace rnnlm_ext
