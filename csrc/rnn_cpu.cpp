// rnn_cpu.cpp — whole-sequence forward and backward of one Elman RNN layer on the CPU.
// Dimensions and layouts: rnn.h. Order: helpers (GEMM, pointwise passes), forward, backward.
//
// Where the time goes: the input projection and the four weight/input gradients are large
// GEMMs over all T·B rows; only the per-step GEMM h_{t-1}·w_hhᵀ is sequential. At small sizes
// that per-step GEMM costs a few microseconds, so everything around it must cost less: no
// allocation, no dispatcher, no autograd node inside the time loop. The GEMMs therefore call
// the BLAS that libtorch exports (MKL's sgemm_/dgemm_) directly, and the bias + activation
// runs as one vectorised pass over the B×H block of the step.
#include "rnn.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define RNNLM_EXT_X86 1
#include <immintrin.h>
#endif

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
namespace {

// ----------------------------------------------------------------------------------------
// GEMM

void fortran_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                  const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
void fortran_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                  const double* b, int ldb, double beta, double* c, int ldc) {
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
    at::Tensor t = at::from_blob(const_cast<scalar_t*>(p), {trans ? cols : rows, trans ? rows : cols},
                                 {ld, 1}, options);
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
    if (!std::is_same<scalar_t, float>::value || !cblas_sgemm_pack_get_size ||
        !cblas_sgemm_pack || !cblas_sgemm_compute || std::max({M, N, K, ldw}) > INT_MAX)
      return;
    const size_t bytes = cblas_sgemm_pack_get_size(kB, int(M), int(N), int(K));
    packed_.reset(static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
    if (!packed_) return;
    cblas_sgemm_pack(kRowMajor, kB, trans_w ? kTrans : kNoTrans, int(M), int(N), int(K), 1.0f,
                     reinterpret_cast<const float*>(W), int(ldw), packed_.get());
  }
  void operator()(const scalar_t* A, int64_t lda, scalar_t beta, scalar_t* C, int64_t ldc) const {
    if (!packed_) return gemm<scalar_t>(false, trans_w_, M_, N_, K_, A, lda, W_, ldw_, beta, C, ldc);
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

// ----------------------------------------------------------------------------------------
// The time loop across threads. Waking a thread pool for every step's small GEMM costs more
// than the GEMM (an OpenMP fork/join per step, as a threaded BLAS call does), so the loop is
// split once: each thread owns a slice [c0,c1) of the H hidden columns for the whole sequence,
// computes its columns of every step with a single-threaded GEMM and the pointwise pass, and
// meets the others at one barrier per step (the next step reads every column). This is the
// CPU counterpart of the persistent GPU kernel.

constexpr int64_t kColumnAlign = 16;  // slices are multiples of one AVX-512 vector of floats

// How many threads share the time loop by hidden columns (1: the loop runs on the calling
// thread, with a helper beside it, below). Sharing needs a step's GEMM (B·H·H multiply-adds)
// large enough that the per-step barrier is small beside it, and enough columns per thread.
// Measured on this project's 2 cores, module forward+backward, two threads sharing columns
// against the helper: 64,64,1024 173 against 177 ms; 64,256,512 206 against 198 ms, 64,64,256
// 13.1 against 11.7 ms, 16,64,256 3.46 against 3.26 ms, 256,32,128 9.4 against 7.5 ms. So two
// threads share from 512 columns each. Three or more share from 128 columns each: the helper
// uses only two threads, and that rule is the earlier one, unmeasured here (2 cores).
constexpr int64_t kMinSplitColumns = 128;
constexpr int64_t kMinSplitColumnsOfTwo = 512;
constexpr int64_t kMinSplitWork = int64_t(1) << 19;

int column_threads(int64_t B, int64_t H) {
#ifdef _OPENMP
  if (!have_blas<float>()) return 1;  // the ATen fallback GEMM is not for parallel regions
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), H / kMinSplitColumns);
  const bool worth_it = threads >= 3 || (threads == 2 && H >= 2 * kMinSplitColumnsOfTwo);
  return worth_it && B * H * H >= kMinSplitWork ? int(threads) : 1;
#else
  return 1;
#endif
}

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

// One thread's share of the time loop: thread `id` owns hidden columns [c0,c1).
struct Slice {
  int id;
  int64_t c0, c1;
  int64_t size() const { return c1 - c0; }
};

// prepare(slice) once on every thread, then for k = 0 … T-1: before(k, slice) on every
// thread, a barrier, then after(k, slice). Work that reads columns other threads wrote goes
// after the barrier. Threads whose slice is empty (H too small for all of them) only wait.
template <typename Prepare, typename Before, typename After>
void time_loop(int64_t T, int64_t H, int threads, const Prepare& prepare, const Before& before,
               const After& after) {
  if (threads <= 1) {
    const Slice all{0, 0, H};
    const OneBlasThread one_blas_thread;
    prepare(all);
    for (int64_t k = 0; k < T; ++k) {
      before(k, all);
      after(k, all);
    }
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = ((H + n - 1) / n + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
    const int64_t c0 = std::min(H, id * per), c1 = std::min(H, c0 + per);
    const Slice mine{int(id), c0, c1};
    if (c0 < c1) prepare(mine);
    for (int64_t k = 0; k < T; ++k) {
      if (c0 < c1) before(k, mine);
#pragma omp barrier
      if (c0 < c1) after(k, mine);
    }
  }
#endif
}

constexpr auto kNothing = [](int64_t, const Slice&) {};

// A loop whose hidden columns are too few to share runs on the calling thread, and a helper
// thread does the large GEMMs around it meanwhile, in chunks of steps: in the forward it
// projects the steps ahead of the loop, in the backward it takes the weight and bias
// gradients of each chunk of finished steps. Without the helper those GEMMs ran before or
// after the loop, which left one core idle for the whole loop.
//
// The caller never waits for the helper to start (waking a thread can take longer than a
// small layer's whole loop): work either may do is claimed, and what the helper has not
// claimed the caller does itself. So a team of one thread (inside another parallel region)
// is correct too, only not faster.
bool can_use_helper() {
#ifdef _OPENMP
  return have_blas<float>() && at::get_num_threads() >= 2;
#else
  return false;
#endif
}

// main() on the calling thread, helper() on a second one when the team has two.
template <typename Main, typename Helper>
void with_helper(const Main& main, const Helper& helper) {
#ifdef _OPENMP
#pragma omp parallel num_threads(2)
  {
    const OneBlasThread one_blas_thread;
    if (omp_get_thread_num() == 0) {
      main();
    } else {
      helper();
    }
  }
#else
  main();
#endif
}

// One turn of a wait loop: a pause instruction for the first turns (the other thread is
// normally a step or a chunk away), then yielding the core, so that a waiting thread does not
// hold it from the one it waits for when the machine has more threads than cores.
void spin_pause(int64_t& turns) {
#ifdef RNNLM_EXT_X86
  if (++turns < 4096) return _mm_pause();
#endif
  std::this_thread::yield();
}

// Chunks 0 … n-1 of work that two threads claim in order; each chunk runs once, on the thread
// that claimed it. Completion is published with release/acquire, so a thread that sees a chunk
// done sees what its work wrote.
class Chunks {
 public:
  explicit Chunks(int64_t n) : n_(n), done_(new std::atomic<bool>[size_t(n)]) {
    for (int64_t i = 0; i < n; ++i) done_[i].store(false, std::memory_order_relaxed);
  }
  // Claims the next unclaimed chunk and runs work(i) on it; false when none is left.
  template <typename Work>
  bool run_next(const Work& work) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) return false;
    work(i);
    done_[i].store(true, std::memory_order_release);
    return true;
  }
  // Returns once chunk i is done, running unclaimed chunks meanwhile.
  template <typename Work>
  void finish(int64_t i, const Work& work) {
    int64_t turns = 0;
    while (!done_[i].load(std::memory_order_acquire))
      if (!run_next(work)) spin_pause(turns);
  }

 private:
  const int64_t n_;
  std::unique_ptr<std::atomic<bool>[]> done_;
  std::atomic<int64_t> next_{0};
};

// How many steps the backward loop has finished, published the same way.
class Progress {
 public:
  void publish(int64_t steps) { done_.store(steps, std::memory_order_release); }
  void wait_for(int64_t steps) const {
    int64_t turns = 0;
    while (done_.load(std::memory_order_acquire) < steps) spin_pause(turns);
  }

 private:
  std::atomic<int64_t> done_{0};
};

// Steps per chunk: at least 64 rows. Small chunks keep the helper close behind (backward) or
// just ahead of (forward) the loop, so little of its work is left when the loop ends.
// Module forward+backward with 64- against 256-row chunks: 16,64,256 3.26 against 3.81 ms,
// 64,64,256 11.7 against 12.8 ms, 16,64,64 0.464 against 0.489 ms.
int64_t chunk_steps(int64_t B) { return std::max<int64_t>(1, 64 / B); }

enum class Isa { Scalar, Avx2, Avx512 };

// The vector path follows ATen's CPU capability, which honours ATEN_CPU_CAPABILITY: the tests
// run each path on one machine (ATEN_CPU_CAPABILITY=avx2 or default), as torch's own do.
Isa isa() {
  static const Isa chosen = [] {
#ifdef RNNLM_EXT_X86
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::Avx512;
    if (capability == "AVX2") return Isa::Avx2;
#endif
    return Isa::Scalar;
  }();
  return chosen;
}

// h[r,:] = tanh(h[r,:] + b) for one row of n elements, vectorised. The tail goes through
// the same vector code (masked, or via a padded copy) so that an element's value never
// depends on its position in the row.
#ifdef RNNLM_EXT_X86
// float: tanh|x| = −expm1(−2|x|) / (2 + expm1(−2|x|)), with expm1 from a Cody–Waite range
// reduction and a degree-8 Taylor polynomial: ≤ 2.5 ulp over all floats (checked against
// float64 tanh on 2.2M points), about 3x faster here than SLEEF's 1-ulp call, and exact
// enough that the per-step rounding stays far under the float32 parity tolerance. Written
// as vector code because the time loop calls it on every step's B×H block.
// |x| is clamped at 9, where tanh is 1 in float32; min(9, x) keeps a NaN a NaN.
#define RNNLM_TANH_CONSTANTS                                                        \
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f,           \
                  kLn2Lo = -2.12194440e-4f;                                        \
  constexpr float kC[7] = {1.f / 40320, 1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, \
                           1.f / 6, 0.5f};

struct Simd {
  __attribute__((target("avx2,fma"))) static __m256 tanh8(__m256 x) {
    RNNLM_TANH_CONSTANTS
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    const __m256 a = _mm256_min_ps(_mm256_set1_ps(9.0f), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
    const __m256 y = _mm256_mul_ps(_mm256_set1_ps(-2.0f), a);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), y);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kC[0]);
    for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC[k]));
    p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r);  // expm1(r)
    const __m256 scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    const __m256 em1 = _mm256_fmadd_ps(scale, p, _mm256_sub_ps(scale, _mm256_set1_ps(1.0f)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(_mm256_setzero_ps(), em1),
                                   _mm256_add_ps(_mm256_set1_ps(2.0f), em1));
    return _mm256_or_ps(t, sign);
  }
  __attribute__((target("avx512f"))) static __m512 tanh16(__m512 x) {
    RNNLM_TANH_CONSTANTS
    const __m512i sign_bit = _mm512_set1_epi32(int(0x80000000u));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), sign_bit);
    const __m512 abs_x = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, _mm512_castps_si512(x)));
    const __m512 a = _mm512_min_ps(_mm512_set1_ps(9.0f), abs_x);
    const __m512 y = _mm512_mul_ps(_mm512_set1_ps(-2.0f), a);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), y);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kC[0]);
    for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[k]));
    p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r);  // expm1(r)
    const __m512 scale = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
    const __m512 em1 = _mm512_fmadd_ps(scale, p, _mm512_sub_ps(scale, _mm512_set1_ps(1.0f)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_setzero_ps(), em1),
                                   _mm512_add_ps(_mm512_set1_ps(2.0f), em1));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
  }
  __attribute__((target("avx2,fma"))) static void tanh_avx2(float* h, const float* b, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 v = _mm256_loadu_ps(h + j);
      if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + j));
      _mm256_storeu_ps(h + j, tanh8(v));
    }
    if (j < n) {
      alignas(32) float tmp[8] = {};
      for (int64_t k = j; k < n; ++k) tmp[k - j] = b ? h[k] + b[k] : h[k];
      _mm256_store_ps(tmp, tanh8(_mm256_load_ps(tmp)));
      for (int64_t k = j; k < n; ++k) h[k] = tmp[k - j];
    }
  }
  __attribute__((target("avx512f"))) static void tanh_avx512(float* h, const float* b, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      __m512 v = _mm512_loadu_ps(h + j);
      if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + j));
      _mm512_storeu_ps(h + j, tanh16(v));
    }
    if (j < n) {
      const __mmask16 m = __mmask16((1u << (n - j)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(m, h + j);
      if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + j));
      _mm512_mask_storeu_ps(h + j, m, tanh16(v));
    }
  }
};

#endif

// float32 goes through the vector code; float64 (for checking, not for speed) through std::tanh.
template <typename scalar_t>
void tanh_row(scalar_t* h, const scalar_t* b, int64_t n) {
#ifdef RNNLM_EXT_X86
  const Isa path = isa();
  if (std::is_same<scalar_t, float>::value && path != Isa::Scalar) {
    auto* hf = reinterpret_cast<float*>(h);
    const auto* bf = reinterpret_cast<const float*>(b);
    if (path == Isa::Avx512) return Simd::tanh_avx512(hf, bf, n);
    return Simd::tanh_avx2(hf, bf, n);
  }
#endif
  for (int64_t j = 0; j < n; ++j) h[j] = std::tanh(b ? h[j] + b[j] : h[j]);
}

// In the forward pass: h = act(h + b) over a [rows,n] block with row stride ld, in place (h
// holds the pre-activation P_t + h_{t-1}·w_hhᵀ on entry). b [n] may be nullptr.
template <typename scalar_t>
void bias_act_forward(scalar_t* h, const scalar_t* b, int64_t rows, int64_t n, int64_t ld,
                      Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* hr = h + r * ld;
    if (act == Activation::Tanh) {
      tanh_row(hr, b, n);
    } else if (b) {
      for (int64_t j = 0; j < n; ++j) hr[j] = std::max(hr[j] + b[j], scalar_t(0));
    } else {
      for (int64_t j = 0; j < n; ++j) hr[j] = std::max(hr[j], scalar_t(0));
    }
  }
}

// In the forward pass this was h = act(z), so now dz = (carry + dout) ⊙ act'(h), with act'
// taken from the saved output h: tanh' = 1 − h², relu' = [h > 0]. Over a [rows,n] block with
// row stride ld; dz holds the carried gradient dz_{t+1}·w_hh on entry when `carry` is true,
// and is overwritten.
template <typename scalar_t>
void act_backward(scalar_t* dz, const scalar_t* dout, const scalar_t* h, bool carry, int64_t rows,
                  int64_t n, int64_t ld, Activation act) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* __restrict__ dzr = dz + r * ld;
    const scalar_t* __restrict__ doutr = dout + r * ld;
    const scalar_t* __restrict__ hr = h + r * ld;
    // Vectorised, branch-free loops (setup.py's -fno-trapping-math lets GCC turn the relu
    // select into a vector compare-and-mask; as a branch on h > 0, mispredicted half the
    // time, the relu backward loop ran 4x slower than tanh's).
    if (act == Activation::Tanh && carry) {
      for (int64_t j = 0; j < n; ++j) dzr[j] = (dzr[j] + doutr[j]) * (scalar_t(1) - hr[j] * hr[j]);
    } else if (act == Activation::Tanh) {
      for (int64_t j = 0; j < n; ++j) dzr[j] = doutr[j] * (scalar_t(1) - hr[j] * hr[j]);
    } else if (carry) {
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t g = dzr[j] + doutr[j];
        dzr[j] = hr[j] > scalar_t(0) ? g : scalar_t(0);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) dzr[j] = hr[j] > scalar_t(0) ? doutr[j] : scalar_t(0);
    }
  }
}

}  // namespace

const char* cpu_gemm_backend() {
  if (!sgemm_ || !dgemm_) return "ATen addmm";
  if (cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute)
    return "blas (sgemm_/dgemm_ exported by libtorch; float32 steps on MKL's packed GEMM)";
  return "blas (sgemm_/dgemm_ exported by libtorch)";
}

const char* cpu_activation_backend() {
  switch (isa()) {
    case Isa::Avx512: return "avx512 (float32 tanh vectorised)";
    case Isa::Avx2: return "avx2 (float32 tanh vectorised)";
    default: return "scalar (std::tanh)";
  }
}

// ----------------------------------------------------------------------------------------
// Forward

template <typename scalar_t>
void rnn_forward_cpu(scalar_t* out, const scalar_t* x, const scalar_t* h0, const scalar_t* w_ih,
                     const scalar_t* w_hh, const scalar_t* b, int64_t T, int64_t B, int64_t I,
                     int64_t H, Activation act, bool reverse) {
  const int64_t BH = B * H;
  // P = x·w_ihᵀ of steps [s0,s1) (in the loop's order), written straight into their rows of
  // out: [rows,I]·[I,H] -> [rows,H]
  auto project = [&](int64_t s0, int64_t s1) {
    const int64_t t0 = reverse ? T - s1 : s0;  // the steps' time indices are [t0, t0+s1-s0)
    gemm<scalar_t>(false, true, (s1 - s0) * B, H, I, x + t0 * B * I, I, w_ih, I, 0, out + t0 * BH,
                   H);
  };
  // this thread's step: h_prev[B,H]·w_hh[c0:c1]ᵀ with w_hh's rows c0…c1 packed once
  auto prepare = [&](StepGemm<scalar_t>& g, const Slice& slice) {
    g.prepare(true, B, slice.size(), H, w_hh + slice.c0 * H, H);
  };
  auto step = [&](int64_t s, const Slice& slice, const StepGemm<scalar_t>& g) {
    const int64_t t = reverse ? T - 1 - s : s;
    const scalar_t* h_prev = s == 0 ? h0 : out + (reverse ? t + 1 : t - 1) * BH;  // [B,H]
    scalar_t* h = out + t * BH + slice.c0;                        // [B,c1-c0], row stride H
    g(h_prev, H, 1, h, H);  // h = P_t + h_prev·w_hh[c0:c1]ᵀ
    bias_act_forward(h, b ? b + slice.c0 : nullptr, B, slice.size(), H, act);
  };

  const int threads = column_threads(B, H);
  if (threads == 1 && can_use_helper()) {
    // the caller runs the steps; chunks of the projection are claimed by whichever thread
    // gets to them first, the helper ahead of the steps or the caller when it finds its next
    // step's chunk unclaimed
    const int64_t chunk = chunk_steps(B);
    Chunks projection((T + chunk - 1) / chunk);
    auto project_chunk = [&](int64_t i) { project(i * chunk, std::min(T, (i + 1) * chunk)); };
    with_helper([&] {
      const Slice all{0, 0, H};
      StepGemm<scalar_t> g;
      prepare(g, all);
      for (int64_t s = 0; s < T; ++s) {
        projection.finish(s / chunk, project_chunk);
        step(s, all, g);
      }
    }, [&] {
      while (projection.run_next(project_chunk)) {
      }
    });
    return;
  }
  project(0, T);
  std::vector<StepGemm<scalar_t>> step_gemm(threads);
  time_loop(T, H, threads, [&](const Slice& slice) { prepare(step_gemm[slice.id], slice); },
            [&](int64_t s, const Slice& slice) { step(s, slice, step_gemm[slice.id]); }, kNothing);
}

// ----------------------------------------------------------------------------------------
// Backward

template <typename scalar_t>
void rnn_backward_cpu(scalar_t* dx, scalar_t* dh0, scalar_t* dw_ih, scalar_t* dw_hh, scalar_t* db,
                      scalar_t* dz, const scalar_t* dout, const scalar_t* x, const scalar_t* h0,
                      const scalar_t* w_ih, const scalar_t* w_hh, const scalar_t* out, int64_t T,
                      int64_t B, int64_t I, int64_t H, Activation act, bool reverse) {
  const int64_t BH = B * H;
  const int64_t first = reverse ? T - 1 : 0;  // the step that read h0
  // The forward's steps in reverse order (k counts them; s is the forward's step number, t
  // the time index; `prev` is the step whose output was this step's h_{t-1}). A thread that
  // owns columns [c0,c1) of every dz_t finishes them (act'); once all columns of dz_t are
  // finished, it writes its columns of the previous step's carry from all of dz_t.
  auto prepare = [&](StepGemm<scalar_t>& g, const Slice& slice) {
    // this thread's carry: dz_t[B,H]·w_hh[:, c0:c1], w_hh's columns c0…c1 packed once
    g.prepare(false, B, slice.size(), H, w_hh + slice.c0, H);
  };
  auto finish_dz = [&](int64_t k, const Slice& slice) {
    const int64_t s = T - 1 - k;
    const int64_t t = reverse ? T - 1 - s : s;
    // in the forward pass this was h_t = act(P_t + h_{t-1}·w_hhᵀ + b), so dz_t = dh_t ⊙ act'(h_t)
    // with dh_t = dout_t + dz_{t+1}·w_hh (the carry, already in dz_t except at the last step)
    const int64_t at = t * BH + slice.c0;
    act_backward(dz + at, dout + at, out + at, s != T - 1, B, slice.size(), H, act);
  };
  auto carry = [&](int64_t k, const Slice& slice, const StepGemm<scalar_t>& g) {
    const int64_t s = T - 1 - k;
    if (s == 0) return;
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t prev = reverse ? t + 1 : t - 1;
    // ... and through h_{t-1}·w_hhᵀ: carry dz_t·w_hh[:, c0:c1] into the previous step's slot
    g(dz + t * BH, H, 0, dz + prev * BH + slice.c0, H);
  };
  // The weight and bias gradients of the steps k0 … k1-1 (a run of consecutive time indices),
  // written when `write` (the first run), else added.
  auto weight_grads = [&](int64_t k0, int64_t k1, bool write) {
    const int64_t ta = reverse ? k0 : T - k1, tb = reverse ? k1 : T - k0;  // times [ta,tb)
    const scalar_t beta = write ? 0 : 1;
    if (dw_ih)  // dz[ta:tb]ᵀ·x[ta:tb]
      gemm<scalar_t>(true, false, H, I, (tb - ta) * B, dz + ta * BH, H, x + ta * B * I, I, beta,
                     dw_ih, I);
    if (dw_hh) {
      // Σ_t dz_tᵀ·h_{t-1}: the step that read h0, if in the run, then the others, whose
      // h_{t-1} are rows of out shifted by one step, contiguous: no copy
      scalar_t b0 = beta;
      const bool has_first = ta <= first && first < tb;
      if (has_first) {
        gemm<scalar_t>(true, false, H, H, B, dz + first * BH, H, h0, H, b0, dw_hh, H);
        b0 = 1;
      }
      const int64_t lo = has_first && !reverse ? ta + 1 : ta;
      const int64_t hi = has_first && reverse ? tb - 1 : tb;
      if (hi > lo) {
        const scalar_t* h_rows = out + (reverse ? lo + 1 : lo - 1) * BH;
        gemm<scalar_t>(true, false, H, H, (hi - lo) * B, dz + lo * BH, H, h_rows, H, b0, dw_hh, H);
      }
    }
    if (db) {
      if (write) std::fill(db, db + H, scalar_t(0));
      for (int64_t r = ta * B; r < tb * B; ++r)
        for (int64_t j = 0; j < H; ++j) db[j] += dz[r * H + j];
    }
  };
  // dx = dz·w_ih for the steps k0 … k1-1
  auto input_grad = [&](int64_t k0, int64_t k1) {
    const int64_t ta = reverse ? k0 : T - k1, tb = reverse ? k1 : T - k0;  // times [ta,tb)
    gemm<scalar_t>(false, false, (tb - ta) * B, I, H, dz + ta * BH, H, w_ih, I, 0, dx + ta * B * I,
                   I);
  };
  auto dh0_grad = [&] {
    if (dh0) gemm<scalar_t>(false, false, B, H, H, dz + first * BH, H, w_hh, H, 0, dh0, H);
  };

  const int threads = column_threads(B, H);
  if (threads == 1 && can_use_helper()) {
    // the caller runs the steps, then dh0 and dx; the helper follows the steps, taking the
    // weight and bias gradients of each chunk of finished ones, then whatever chunks of dx
    // the caller has not claimed yet. If the helper has not started by the time the caller
    // is done, the caller takes the weight gradients too, in the same chunks: the same GEMMs
    // in the same order, so the result does not depend on who ran them.
    Progress finished;
    std::atomic<bool> weight_grads_taken{false};
    auto chunked_weight_grads = [&] {
      const int64_t chunk = chunk_steps(B);
      for (int64_t k0 = 0; k0 < T; k0 += chunk) {
        const int64_t k1 = std::min(T, k0 + chunk);
        finished.wait_for(k1);
        weight_grads(k0, k1, k0 == 0);
      }
    };
    const int64_t dx_chunk = std::max<int64_t>(1, 256 / B);  // rows enough for an efficient GEMM
    Chunks dx_chunks(dx ? (T + dx_chunk - 1) / dx_chunk : 0);
    auto dx_work = [&](int64_t i) { input_grad(i * dx_chunk, std::min(T, (i + 1) * dx_chunk)); };
    with_helper([&] {
      const Slice all{0, 0, H};
      StepGemm<scalar_t> g;
      prepare(g, all);
      for (int64_t k = 0; k < T; ++k) {
        finish_dz(k, all);
        finished.publish(k + 1);
        carry(k, all, g);
      }
      dh0_grad();
      while (dx_chunks.run_next(dx_work)) {
      }
      if (!weight_grads_taken.exchange(true)) chunked_weight_grads();
    }, [&] {
      if (!weight_grads_taken.exchange(true)) chunked_weight_grads();
      finished.wait_for(T);  // dx reads every step's dz
      while (dx_chunks.run_next(dx_work)) {
      }
    });
    return;
  }
  std::vector<StepGemm<scalar_t>> step_gemm(threads);
  time_loop(T, H, threads, [&](const Slice& slice) { prepare(step_gemm[slice.id], slice); },
            finish_dz,
            [&](int64_t k, const Slice& slice) { carry(k, slice, step_gemm[slice.id]); });
  // The rest is batched over all T·B rows.
  dh0_grad();
  if (dx) input_grad(0, T);
  weight_grads(0, T, true);
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
