// cells_cuda.h — the CUDA launchers of the fused LSTM and GRU layers (cells_cuda.cu).
// Plain CUDA (raw pointers, sizes, a stream and a cuBLAS handle; no torch types), as
// rnn_cuda.h. Layouts and the math: lstm.h, gru.h.
//
// One implementation of the time loop, per step (rnn_cuda.h's PerStep): the input projection
// as one cuBLAS GEMM over all T·B rows; per step one GEMM with w_hh and one fused pointwise
// kernel (gates, state update, saved gates); the backward per step one pointwise kernel and
// one GEMM for the carried dh, then the weight and input gradients as GEMMs over all T·B rows
// and the bias gradients as deterministic column sums. `path` Persistent throws (there is no
// persistent kernel for these cells); Auto and PerStep run the per-step loop.
//
// Pointers are device pointers of the given dtype. Every gradient pointer may be nullptr:
// that gradient is then not computed. Gradients are written (=), never accumulated. Errors
// throw std::runtime_error with the reason. Nothing is allocated: the op passes workspaces.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gru.h"
#include "lstm.h"
#include "rnn_cuda.h"

namespace rnnlm_ext {

// ----------------------------------------------------------------------------------------
// LSTM: gates i, f, g, o stacked along the weights' rows. x [T,B,I], h0, c0 [B,H],
// w_ih [4H,I], w_hh [4H,H], bias [4H] (b_ih + b_hh) or nullptr.

// out, c [T,B,H]: every step's h and c, written. gates [T,B,4H]: the activated i | f | g | o
// of every step, kept for the backward, when train; in inference only the workspace that
// holds the pre-activations (its contents then undefined on return). T·B·4H elements either
// way.
void lstm_forward_cuda(void* out, void* c, void* gates, const void* x, const void* h0,
                       const void* c0, const void* w_ih, const void* w_hh, const void* bias,
                       int64_t T, int64_t B, int64_t I, int64_t H, DType dtype, bool reverse,
                       bool train, CudaPath path, cudaStream_t stream, cublasHandle_t handle);

// dx [T,B,I], dh0, dc0 [B,H], dw_ih [4H,I], dw_hh [4H,H], dbias [4H]: written when not
// nullptr. dout [T,B,H] (dh_n folded into its last step); dc [T,B,H] the gradient reaching
// every step's c (dc_n folded in), or nullptr for none. x … w_hh as in the forward, out, c,
// gates its outputs (train). workspace: lstm_backward_workspace_size (lstm.h) elements,
// overwritten: the gate gradients da [T,B,4H] and the gradients carried through h and c.
void lstm_backward_cuda(void* dx, void* dh0, void* dc0, void* dw_ih, void* dw_hh, void* dbias,
                        void* workspace, const void* dout, const void* dc, const void* x,
                        const void* h0, const void* c0, const void* w_ih, const void* w_hh,
                        const void* out, const void* c, const void* gates, int64_t T, int64_t B,
                        int64_t I, int64_t H, DType dtype, bool reverse, CudaPath path,
                        cudaStream_t stream, cublasHandle_t handle);

// ----------------------------------------------------------------------------------------
// GRU: layouts as gru.h. x [T,B,I], h0 [B,H], w_ih [3H,I], w_hh [3H,H], b_ih, b_hh [3H]
// (both or neither, nullptr).

// out [T,B,H] written; saved [T,B,4H] (r | z | n | gh_n) written when not nullptr (train).
// workspace: gru_forward_workspace_size (gru.h) elements, overwritten: the per-step gh
// [B,3H] and, in inference (no `saved` to hold it), the input projection gi [T,B,3H].
void gru_forward_cuda(void* out, void* saved, void* workspace, const void* x, const void* h0,
                      const void* w_ih, const void* w_hh, const void* b_ih, const void* b_hh,
                      int64_t T, int64_t B, int64_t I, int64_t H, DType dtype, bool reverse,
                      CudaPath path, cudaStream_t stream, cublasHandle_t handle);

// dx [T,B,I], dh0 [B,H], dw_ih [3H,I], dw_hh [3H,H], db_ih, db_hh [3H]: written when not
// nullptr. dout [T,B,H] (dh_n folded into its last step); out, saved the forward's (train).
// workspace: gru_backward_workspace_size (gru.h) elements, overwritten: every step's gate
// gradients [T,B,4H] (dr | dz | dn ⊙ r | dn) and the gradient carried to the previous step.
void gru_backward_cuda(void* dx, void* dh0, void* dw_ih, void* dw_hh, void* db_ih, void* db_hh,
                       void* workspace, const void* dout, const void* x, const void* h0,
                       const void* w_ih, const void* w_hh, const void* out, const void* saved,
                       int64_t T, int64_t B, int64_t I, int64_t H, DType dtype, bool reverse,
                       CudaPath path, cudaStream_t stream, cublasHandle_t handle);

}  // namespace rnnlm_ext
