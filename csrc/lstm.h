// lstm.h — the fused LSTM layer (one layer, one direction, whole sequence): layouts, what the
// forward keeps for the backward, and the CPU kernels' declarations (lstm_cpu.cpp).
// Plain C++: no torch types. Dimensions T, B, I, H and the step order: rnn.h.
//
// Layouts (row-major, contiguous). Gates stack along rows in PyTorch's order i, f, g, o:
//   x     [T,B,I]    h0, c0 [B,H]
//   w_ih  [4H,I]     w_hh [4H,H]
//   bias  [4H]       b_ih + b_hh (they only ever appear summed), or nullptr
//   out   [T,B,H]    every h_t (h_n is out[T-1], or out[0] when reversed)
//   c     [T,B,H]    every cell state c_t (c_n likewise)
//   gates [T,B,4H]   per step the activated i | f | g | o (training only)
//
// Forward:
//   a   = x·w_ihᵀ + bias                 one GEMM over all T·B rows
//   a  += h_{t-1}·w_hhᵀ                  one GEMM per step, [B,4H]
//   i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
//   c_t = f ⊙ c_{t-1} + i ⊙ g    h_t = o ⊙ tanh(c_t)   gates and update in one pass per row
//
// Backward, given dout, dc [T,B,H] (dh_n, dc_n already folded into their last step; dc may be
// absent: zero), step by step in the reverse of the forward's order, with dh = dout_t + what
// step t+1 passed back through h, and tc = tanh(c_t) recomputed:
//   dc_t = dc_t + (the carry through c) + dh ⊙ o ⊙ (1 − tc²)
//   do = dh ⊙ tc ⊙ o(1 − o)   di = dc_t ⊙ g ⊙ i(1 − i)   df = dc_t ⊙ c_{t-1} ⊙ f(1 − f)
//   dg = dc_t ⊙ i ⊙ (1 − g²)   da = [di, df, dg, do]
//   carry through c: dc_t ⊙ f     through h: dh_{t-1} = da·w_hh   (one GEMM per step)
// then over all T·B rows: dw_ih = daᵀ·x   dx = da·w_ih   dw_hh = Σ_t da_tᵀ·h_{t-1}
//   dbias = Σ da   (the same for b_ih and b_hh)
// All gradients are written (=), never accumulated, as in rnn.h.
#pragma once

#include <cstdint>

#include "rnn.h"

namespace rnnlm_ext {

// Scratch elements the CPU forward needs: the per-step h_{t-1}·w_hhᵀ [B,4H] and, in
// inference (no `gates` to hold it), the pre-activations a [T,B,4H].
inline int64_t lstm_forward_workspace_size(int64_t T, int64_t B, int64_t H, bool train) {
  return B * 4 * H + (train ? 0 : T * B * 4 * H);
}

// out, c [T,B,H] written. gates [T,B,4H] written when not nullptr (training): the backward
// needs i, f, g, o (their derivatives are functions of their values); tanh(c_t) it recomputes
// from c. Inference passes nullptr and keeps nothing but out and c (the op's results).
// workspace: lstm_forward_workspace_size elements, overwritten.
template <typename scalar_t>
void lstm_forward_cpu(scalar_t* out, scalar_t* c, scalar_t* gates, scalar_t* workspace,
                      const scalar_t* x, const scalar_t* h0, const scalar_t* c0,
                      const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* bias, int64_t T,
                      int64_t B, int64_t I, int64_t H, bool reverse);

// Scratch elements the CPU backward needs: every step's gate gradients da [T,B,4H] and the
// gradients carried to the previous step through h and through c, [B,H] each.
inline int64_t lstm_backward_workspace_size(int64_t T, int64_t B, int64_t H) {
  return T * B * 4 * H + 2 * B * H;
}

// dout [T,B,H]; dc [T,B,H] or nullptr (no gradient reached c: zero); x, h0, c0, w_ih, w_hh
// as in the forward; out, c [T,B,H] and gates [T,B,4H] the forward's. Each gradient pointer
// may be nullptr: that gradient is then not computed.
// dx [T,B,I]  dh0, dc0 [B,H]  dw_ih [4H,I]  dw_hh [4H,H]  dbias [4H].
// workspace: lstm_backward_workspace_size elements, overwritten.
template <typename scalar_t>
void lstm_backward_cpu(scalar_t* dx, scalar_t* dh0, scalar_t* dc0, scalar_t* dw_ih, scalar_t* dw_hh,
                       scalar_t* dbias, scalar_t* workspace, const scalar_t* dout,
                       const scalar_t* dc, const scalar_t* x, const scalar_t* h0,
                       const scalar_t* c0, const scalar_t* w_ih, const scalar_t* w_hh,
                       const scalar_t* out, const scalar_t* c, const scalar_t* gates, int64_t T,
                       int64_t B, int64_t I, int64_t H, bool reverse);

}  // namespace rnnlm_ext
