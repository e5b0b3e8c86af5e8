// cuda_common.h — what the CUDA kernels of every cell share (rnn_cuda.cu, cells_cuda.cu):
// error checks, the dtypes' storage and accumulation types, the row-major cuBLAS GEMM, the
// activations, pointwise launch shape and the deterministic column sum. nvcc only (device code).
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "rnn_cuda.h"

namespace rnnlm_ext {

// ----------------------------------------------------------------------------------------
// Errors

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("rnnlm_ext: ") + what + ": " + cudaGetErrorString(err));
}

inline void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("rnnlm_ext: ") + what + ": " +
                             cublasGetStatusString(status));
}

// Puts the cuBLAS handle on `stream`. torch's getCurrentCUDABlasHandle() has already done so
// and given the handle torch's own workspace; cublasSetStream unconditionally resets the
// handle's workspace to cuBLAS's default pool (cuBLAS docs), which would undo that (cuBLAS
// then allocates outside torch's allocator, which breaks CUDA graph capture). So the stream is
// set only where the handle is on another one.
inline void set_stream(cublasHandle_t handle, cudaStream_t stream) {
  cudaStream_t current = nullptr;
  check_cublas(cublasGetStream(handle, &current), "cublasGetStream");
  if (current != stream) check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
}

// cuBLAS takes int sizes and leading dimensions; the weights have `gates` blocks of H rows
// (1 for the Elman cell).
inline void check_int_range(int64_t T, int64_t B, int64_t I, int64_t H, int64_t gates = 1) {
  if (T * B > INT_MAX || I > INT_MAX || gates * H > INT_MAX)
    throw std::runtime_error("rnnlm_ext: T·B = " + std::to_string(T * B) +
                             ", I = " + std::to_string(I) + " and " + std::to_string(gates) +
                             "·H = " + std::to_string(gates * H) +
                             " must each fit in an int for cuBLAS");
}

// ----------------------------------------------------------------------------------------
// Dtypes: storage type scalar_t, accumulation type acc_t, and their cuBLAS names. The
// conversions are explicit functions because torch builds with __CUDA_NO_HALF_CONVERSIONS__.

template <typename scalar_t>
struct Traits;

template <>
struct Traits<float> {
  using acc_t = float;
  static constexpr cudaDataType_t data = CUDA_R_32F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};

template <>
struct Traits<double> {
  using acc_t = double;
  static constexpr cudaDataType_t data = CUDA_R_64F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_64F;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};

template <>
struct Traits<__half> {
  using acc_t = float;
  static constexpr cudaDataType_t data = CUDA_R_16F;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Traits<__nv_bfloat16> {
  using acc_t = float;
  static constexpr cudaDataType_t data = CUDA_R_16BF;
  static constexpr cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename scalar_t>
struct TypeTag {
  using scalar = scalar_t;
};

// Calls f(TypeTag<scalar_t>{}) for the runtime dtype.
template <typename F>
void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float16: return f(TypeTag<__half>{});
    case DType::BFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  throw std::runtime_error("rnnlm_ext: unknown dtype");
}

// ----------------------------------------------------------------------------------------
// Activations in acc_t, float32 or float64. Exact library calls, not the fast intrinsics: the
// float32 parity tolerances need them (setup.py builds without --use_fast_math).

__device__ inline float tanh_acc(float z) { return tanhf(z); }
__device__ inline double tanh_acc(double z) { return tanh(z); }
// σ(z) = 1/(1 + e^−z): 0 for very negative z (e^−z = inf), NaN kept
__device__ inline float sigmoid_acc(float z) { return 1.0f / (1.0f + expf(-z)); }
__device__ inline double sigmoid_acc(double z) { return 1.0 / (1.0 + exp(-z)); }

// ----------------------------------------------------------------------------------------
// GEMM

// Row-major C[M,N] = op(A)[M,K] · op(B)[K,N] + beta·C, as rnn_cpu.cpp's gemm: lda/ldb/ldc are
// the row strides as stored, beta is 0 (C written, NaN included) or 1 (C accumulated into).
// A row-major matrix is its transpose in column-major, so cuBLAS computes the column-major
// Cᵀ = op(B)ᵀ·op(A)ᵀ: operands swapped, transpose flags kept.
template <typename scalar_t>
void gemm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
          typename Traits<scalar_t>::acc_t beta, scalar_t* C, int64_t ldc) {
  using Tr = Traits<scalar_t>;
  const typename Tr::acc_t alpha = 1;
  check_cublas(
      cublasGemmEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                   int(N), int(M), int(K), &alpha, B, Tr::data, int(ldb), A, Tr::data, int(lda),
                   &beta, C, Tr::data, int(ldc), Tr::compute, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

// ----------------------------------------------------------------------------------------
// Pointwise kernels run a grid-stride loop over one step's [B,H] block of n = B·H elements.

constexpr int kPointwiseThreads = 256;

inline int pointwise_blocks(int64_t n) {
  return int(std::min<int64_t>((n + kPointwiseThreads - 1) / kPointwiseThreads, 65535));
}

// Internal linkage: each .cu file gets its own copy of the kernel and its launcher (no -rdc,
// no kernel symbol shared across files).
namespace {

// db[j] = Σ_r dz[r,j] over the first n columns of dz [rows, ld] -> db [n]. A block sums 32
// columns: its 32×32 threads read coalesced rows, then add the 32 partial sums of each column
// in a fixed order (deterministic, no atomics). `partial` needs no padding column against bank
// conflicts: a warp (fixed threadIdx.y, threadIdx.x = 0 … 31) writes one row of it, and the
// summing warp's lanes read one row per iteration too (lane x at column x), so every access
// is 32 consecutive words.
template <typename scalar_t>
__global__ void column_sum_kernel(scalar_t* db, const scalar_t* dz, int64_t rows, int64_t n,
                                  int64_t ld) {
  using Tr = Traits<scalar_t>;
  using acc_t = typename Tr::acc_t;
  __shared__ acc_t partial[32][32];
  const int64_t j = blockIdx.x * int64_t(32) + threadIdx.x;
  acc_t sum = 0;
  if (j < n)
    for (int64_t r = threadIdx.y; r < rows; r += 32) sum += Tr::load(dz[r * ld + j]);
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    acc_t total = 0;
    for (int y = 0; y < 32; ++y) total += partial[y][threadIdx.x];
    db[j] = Tr::store(total);
  }
}

// db [n] = the column sums of dz's first n columns, dz [rows, ld], on `stream`.
template <typename scalar_t>
void column_sum(scalar_t* db, const scalar_t* dz, int64_t rows, int64_t n, int64_t ld,
                cudaStream_t stream) {
  column_sum_kernel<scalar_t><<<int((n + 31) / 32), dim3(32, 32), 0, stream>>>(db, dz, rows, n, ld);
  check_cuda(cudaGetLastError(), "column_sum_kernel launch");
}

}  // namespace

}  // namespace rnnlm_ext
