// cpu_gemm.h — the CPU kernels' GEMM calls: the BLAS that libtorch exports, called directly.
//
// At small sizes a step's GEMM costs a few microseconds, so nothing around it may cost more:
// no allocation, no dispatcher, no autograd node. So the GEMMs call the BLAS that libtorch
// exports (MKL's sgemm_/dgemm_ on the x86 wheels) directly, with ATen's addmm as the portable
// fallback. Every cell's CPU kernel uses these. Row-major throughout, as in rnn.h.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <type_traits>

// Fortran BLAS exported by libtorch_cpu when torch is built with MKL (the x86 wheels) or
// OpenBLAS. Weak: on a torch build without them these resolve to nullptr and the ATen path runs.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));

// MKL's packed GEMM (exported by libtorch on the MKL builds; weak like the above, so a torch
// with another BLAS runs the per-step GEMMs through sgemm_ instead). The enum values are
// MKL's cblas ones: row-major 101, no-transpose 111, transpose 112, the B operand 162, and
// 151 for "this operand is packed".
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
// MKL's per-thread override of its thread count; returns the previous one (0: none set).
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace rnnlm_ext {
namespace cpu {

inline void fortran_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void fortran_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                         int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename scalar_t>
bool have_blas() {
  return std::is_same<scalar_t, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr;
}

// Row-major C[M,N] = op(A)[M,K] · op(B)[K,N] + beta·C, where op transposes when asked.
// lda/ldb/ldc are the row strides of A, B, C as stored. beta is 0 (C is written, whatever it
// held, NaN included) or 1 (C is accumulated into).
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
          int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const bool fits_int = std::max({M, N, K, lda, ldb, ldc}) <= INT_MAX;
  if (have_blas<scalar_t>() && fits_int) {
    // A row-major matrix is its transpose in column-major, so C = op(A)·op(B) is computed as
    // the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands, keep the transpose flags.
    fortran_gemm(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', int(N), int(M), int(K), scalar_t(1), B,
                 int(ldb), A, int(lda), beta, C, int(ldc));
    return;
  }
  // Portable path (a torch built without a Fortran BLAS): ATen's addmm on views of the buffers.
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<scalar_t*>(p),
                                 {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  c.addmm_(view(A, M, K, lda, trans_a), view(B, K, N, ldb, trans_b), beta, scalar_t(1));
}

// The per-step GEMM of the time loop, C[M,N] = A[M,K]·op(W) + beta·C, with the same weight
// operand W (a thread's slice of w_hh) at every step. MKL's sgemm_ repacks W into its
// blocked panel layout on every call; packing it once per sequence and calling the packed
// compute each step saves that: single-threaded on this project's Xeon, a 32×64×128 step
// went from 4.9 to 3.4 µs and a 64×512×1024 one from 555 to 401 µs (151–167 GFLOP/s, about
// one core's matmul rate). float64 and BLAS without packing call gemm() every step.
template <typename scalar_t>
class StepGemm {
 public:
  void prepare(bool trans_w, int64_t M, int64_t N, int64_t K, const scalar_t* W, int64_t ldw) {
    trans_w_ = trans_w, M_ = M, N_ = N, K_ = K, W_ = W, ldw_ = ldw;
    if (!std::is_same<scalar_t, float>::value || !cblas_sgemm_pack_get_size || !cblas_sgemm_pack ||
        !cblas_sgemm_compute || std::max({M, N, K, ldw}) > INT_MAX)
      return;
    const size_t bytes = cblas_sgemm_pack_get_size(kB, int(M), int(N), int(K));
    packed_.reset(static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
    if (!packed_) return;
    cblas_sgemm_pack(kRowMajor, kB, trans_w ? kTrans : kNoTrans, int(M), int(N), int(K), 1.0f,
                     reinterpret_cast<const float*>(W), int(ldw), packed_.get());
  }
  void operator()(const scalar_t* A, int64_t lda, scalar_t beta, scalar_t* C, int64_t ldc) const {
    if (!packed_)
      return gemm<scalar_t>(false, trans_w_, M_, N_, K_, A, lda, W_, ldw_, beta, C, ldc);
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(M_), int(N_), int(K_),
                        reinterpret_cast<const float*>(A), int(lda), packed_.get(), int(ldw_),
                        float(beta), reinterpret_cast<float*>(C), int(ldc));
  }

 private:
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kB = 162, kPacked = 151;
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  bool trans_w_ = false;
  int64_t M_ = 0, N_ = 0, K_ = 0, ldw_ = 0;
  const scalar_t* W_ = nullptr;
  std::unique_ptr<float, Free> packed_;
};

// While alive, MKL runs the calling thread's BLAS calls on that thread alone. A loop on one
// thread is one whose steps are too small to share, and MKL would otherwise fork and join
// its own threads inside every step's GEMM: at T,B,H = 16,64,64 that made the forward 11%
// and the backward 13% slower. A no-op on a BLAS other than MKL.
class OneBlasThread {
 public:
  OneBlasThread() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : -1) {}
  ~OneBlasThread() {
    if (previous_ >= 0) MKL_Set_Num_Threads_Local(previous_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_;
};

// Which BLAS the GEMMs call, for build_info.
inline const char* blas_name() {
  if (!sgemm_ || !dgemm_) return "ATen addmm";
  if (cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute)
    return "blas (sgemm_/dgemm_ exported by libtorch; float32 steps on MKL's packed GEMM)";
  return "blas (sgemm_/dgemm_ exported by libtorch)";
}

}  // namespace cpu
}  // namespace rnnlm_ext
