// rnn_cuda.h — the CUDA launchers of the fused Elman RNN layer (rnn_cuda.cu).
// Plain CUDA (raw pointers, sizes, a stream and a cuBLAS handle; no torch types), so that the
// kernels compile with nvcc alone. Dimensions, layouts and the math: rnn.h.
//
// Two implementations of the sequential part (the input projection and the weight/input
// gradients are cuBLAS GEMMs over all T·B rows in both):
//   PerStep     one cuBLAS GEMM per step plus one fused pointwise kernel (bias + act forward,
//               act' backward). Any size.
//   Persistent  one cooperative kernel for the whole sequence: each block keeps R rows of w_hh
//               (of w_hhᵀ in the backward) in shared memory for all T steps and the grid
//               synchronises once per step. Only where rnn_persistent_fits() says so.
//
// Pointers are device pointers of the given dtype. Every gradient pointer may be nullptr:
// that gradient is then not computed. Gradients are written (=), never accumulated.
// Errors (a CUDA or cuBLAS failure, a size over cuBLAS's int range, the persistent path asked
// for where it does not fit) throw std::runtime_error with the reason.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rnn.h"

namespace rnnlm_ext {

// float16 and bfloat16 are stored as such and accumulated in float32; float32 in float32
// (TF32 only if the handle's math mode allows it); float64 in float64.
enum class DType { Float32, Float64, Float16, BFloat16 };

// Auto: Persistent where rnn_persistent_fits(), else PerStep. Persistent where it does not
// fit throws.
enum class CudaPath { Auto, PerStep, Persistent };

// Whether the persistent kernels (forward and backward) can run a layer with batch B and H
// hidden units of `dtype` on the current device: B small enough for their FMA loop to compete
// with cuBLAS (B <= 64), H's rows spread over at most one block per SM within the rows-per-
// block limit (16), that slice of w_hh in shared memory, and the whole grid co-resident
// (cooperative launch).
bool rnn_persistent_fits(int64_t B, int64_t H, DType dtype);

// out: [T,B,H] written. x [T,B,I], h0 [B,H], w_ih [H,I], w_hh [H,H], b [H] or nullptr.
void rnn_forward_cuda(void* out, const void* x, const void* h0, const void* w_ih, const void* w_hh,
                      const void* b, int64_t T, int64_t B, int64_t I, int64_t H, DType dtype,
                      Activation act, bool reverse, CudaPath path, cudaStream_t stream,
                      cublasHandle_t handle);

// dx [T,B,I], dh0 [B,H], dw_ih [H,I], dw_hh [H,H], db [H]: written when not nullptr.
// dz: [T,B,H] workspace, overwritten. dout [T,B,H] (dh_n folded into its last step), x, h0,
// w_ih, w_hh and out as in (and from) the forward.
void rnn_backward_cuda(void* dx, void* dh0, void* dw_ih, void* dw_hh, void* db, void* dz,
                       const void* dout, const void* x, const void* h0, const void* w_ih,
                       const void* w_hh, const void* out, int64_t T, int64_t B, int64_t I,
                       int64_t H, DType dtype, Activation act, bool reverse, CudaPath path,
                       cudaStream_t stream, cublasHandle_t handle);

}  // namespace rnnlm_ext
