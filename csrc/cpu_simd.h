// cpu_simd.h — vectorised activations for the CPU kernels' pointwise passes: tanh and σ over a row,
// on the vector path ATen's CPU capability names (AVX-512, AVX2, or scalar code).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#define RNNLM_EXT_X86 1
#include <immintrin.h>
#endif

namespace rnnlm_ext {
namespace cpu {

enum class Isa { Scalar, Avx2, Avx512 };

// The vector path follows ATen's CPU capability, which honours ATEN_CPU_CAPABILITY: the tests
// run each path on one machine (ATEN_CPU_CAPABILITY=avx2 or default), as torch's own do.
inline Isa isa() {
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
// float: below |x| = 0.55, tanh|x| = |x| + |x|·z·P(z), z = x², P a degree-4 least-squares fit
// of (tanh x − x)/x³ (made for this file: ≤ 0.75 ulp, as SLEEF's 1-ulp tanh); above, 1 −
// 2e/(1 + e), e = exp(−2|x|) from a Cody–Waite range reduction and a degree-8 Taylor
// polynomial, exact near 1, where 1 − h² in the backward needs it. Written as vector code
// because the time loop calls it on every step's B×H block. The first version (−expm1/(2 +
// expm1) everywhere, ≤ 2.5 ulp, clamped at 9) made saturated gradients up to 60x further from
// float64 than nn.RNN's. |x| is clamped at 10, where tanh rounds to 1 in float32 (at 9 it does
// not); min(10, x) keeps a NaN a NaN.
#define RNNLM_TANH_CONSTANTS                                                                      \
  constexpr float kNearOne = 0.55f;                                                               \
  constexpr float kP[5] = {-6.2643592379e-03f, 2.1064131236e-02f, -5.3850295059e-02f,             \
                           1.3332564438e-01f, -3.3333316799e-01f};                                \
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f; \
  constexpr float kC[7] = {1.f / 40320, 1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f};

struct Simd {
  __attribute__((target("avx2,fma"))) static __m256 tanh8(__m256 x) {
    RNNLM_TANH_CONSTANTS
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    const __m256 a =
        _mm256_min_ps(_mm256_set1_ps(10.0f), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
    // |x| <= kNearOne: tanh a = a + a·z·P(z), z = a²
    const __m256 z = _mm256_mul_ps(a, a);
    __m256 poly = _mm256_set1_ps(kP[0]);
    for (int k = 1; k < 5; ++k) poly = _mm256_fmadd_ps(poly, z, _mm256_set1_ps(kP[k]));
    const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(a, z), poly, a);
    // above: tanh a = 1 − 2e/(1 + e), e = exp(−2a) = 2^n·(1 + expm1(r))
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
    const __m256 e = _mm256_fmadd_ps(scale, p, scale);
    const __m256 large =
        _mm256_sub_ps(_mm256_set1_ps(1.0f),
                      _mm256_div_ps(_mm256_add_ps(e, e), _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    const __m256 t =
        _mm256_blendv_ps(small, large, _mm256_cmp_ps(a, _mm256_set1_ps(kNearOne), _CMP_GT_OQ));
    return _mm256_or_ps(t, sign);
  }
  __attribute__((target("avx512f"))) static __m512 tanh16(__m512 x) {
    RNNLM_TANH_CONSTANTS
    const __m512i sign_bit = _mm512_set1_epi32(int(0x80000000u));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), sign_bit);
    const __m512 abs_x = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, _mm512_castps_si512(x)));
    const __m512 a = _mm512_min_ps(_mm512_set1_ps(10.0f), abs_x);
    const __m512 z = _mm512_mul_ps(a, a);  // as tanh8
    __m512 poly = _mm512_set1_ps(kP[0]);
    for (int k = 1; k < 5; ++k) poly = _mm512_fmadd_ps(poly, z, _mm512_set1_ps(kP[k]));
    const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(a, z), poly, a);
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
    const __m512 e = _mm512_fmadd_ps(scale, p, scale);
    const __m512 large =
        _mm512_sub_ps(_mm512_set1_ps(1.0f),
                      _mm512_div_ps(_mm512_add_ps(e, e), _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
    const __m512 t = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask(a, _mm512_set1_ps(kNearOne), _CMP_GT_OQ), small, large);
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

// float: σ(x) = 1 / (1 + e^−|x|) for x ≥ 0, e^−|x| / (1 + e^−|x|) for x < 0, with e^−|x| from
// the same range reduction and polynomial as tanh. Unlike 0.5·tanh(x/2) + 0.5, which loses
// all relative accuracy as σ → 0 (cancellation against 0.5), this keeps a few ulp everywhere
// a GRU gate lives. |x| is clamped at 87.5, past the last x whose σ is a normal float
// (−87.34), so that 2^n stays one (n ≥ −126); min(87.5, x) keeps a NaN a NaN.
struct SimdSigmoid {
  __attribute__((target("avx2,fma"))) static __m256 sigmoid8(__m256 x) {
    RNNLM_TANH_CONSTANTS
    const __m256 a =
        _mm256_min_ps(_mm256_set1_ps(87.5f), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x));
    const __m256 y = _mm256_sub_ps(_mm256_setzero_ps(), a);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), y);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kC[0]);
    for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kC[k]));
    p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r);  // expm1(r)
    const __m256 scale = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    const __m256 e = _mm256_fmadd_ps(scale, p, scale);  // e^−|x|
    const __m256 one = _mm256_set1_ps(1.0f);
    // blendv takes e where x's sign bit is set
    return _mm256_div_ps(_mm256_blendv_ps(one, e, x), _mm256_add_ps(one, e));
  }
  __attribute__((target("avx512f"))) static __m512 sigmoid16(__m512 x) {
    RNNLM_TANH_CONSTANTS
    const __m512i sign_bit = _mm512_set1_epi32(int(0x80000000u));
    const __m512 abs_x = _mm512_castsi512_ps(_mm512_andnot_si512(sign_bit, _mm512_castps_si512(x)));
    const __m512 a = _mm512_min_ps(_mm512_set1_ps(87.5f), abs_x);
    const __m512 y = _mm512_sub_ps(_mm512_setzero_ps(), a);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), y);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kC[0]);
    for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kC[k]));
    p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r);  // expm1(r)
    const __m512 scale = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
    const __m512 e = _mm512_fmadd_ps(scale, p, scale);  // e^−|x|
    const __m512 one = _mm512_set1_ps(1.0f);
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
  }
  __attribute__((target("avx2,fma"))) static void sigmoid_avx2(float* a, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(a + j, sigmoid8(_mm256_loadu_ps(a + j)));
    if (j < n) {
      alignas(32) float tmp[8] = {};
      for (int64_t k = j; k < n; ++k) tmp[k - j] = a[k];
      _mm256_store_ps(tmp, sigmoid8(_mm256_load_ps(tmp)));
      for (int64_t k = j; k < n; ++k) a[k] = tmp[k - j];
    }
  }
  __attribute__((target("avx512f"))) static void sigmoid_avx512(float* a, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_ps(a + j, sigmoid16(_mm512_loadu_ps(a + j)));
    if (j < n) {
      const __mmask16 m = __mmask16((1u << (n - j)) - 1);
      _mm512_mask_storeu_ps(a + j, m, sigmoid16(_mm512_maskz_loadu_ps(m, a + j)));
    }
  }
};

#endif

// a[:] = σ(a[:]) over one row of n elements, in place; float32 vectorised as tanh_row is.
template <typename scalar_t>
void sigmoid_row(scalar_t* a, int64_t n) {
#ifdef RNNLM_EXT_X86
  const Isa path = isa();
  if (std::is_same<scalar_t, float>::value && path != Isa::Scalar) {
    auto* af = reinterpret_cast<float*>(a);
    if (path == Isa::Avx512) return SimdSigmoid::sigmoid_avx512(af, n);
    return SimdSigmoid::sigmoid_avx2(af, n);
  }
#endif
  for (int64_t j = 0; j < n; ++j) a[j] = scalar_t(1) / (scalar_t(1) + std::exp(-a[j]));
}

// For a cell's elementwise row loops (plain C++ that GCC vectorises): compiled for AVX-512,
// AVX2 and the baseline, the one the CPU has chosen at load time. Without it they would run on
// the baseline's 16-byte vectors: the LSTM backward's row loop took 3x longer.
#if defined(RNNLM_EXT_X86) && !defined(__clang__)
#define RNNLM_EXT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RNNLM_EXT_VECTOR_CLONES
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

// What the vector path is, for build_info.
inline const char* isa_name() {
  switch (isa()) {
    case Isa::Avx512: return "avx512 (float32 tanh and sigmoid vectorised)";
    case Isa::Avx2: return "avx2 (float32 tanh and sigmoid vectorised)";
    default: return "scalar (std::tanh, std::exp)";
  }
}

}  // namespace cpu
}  // namespace rnnlm_ext
