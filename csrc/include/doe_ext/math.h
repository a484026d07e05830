// Scalar math shared by the CPU and CUDA kernels (__host__ __device__), so the CPU tests exercise
// the very lines the GPU runs.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DOE_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU kernels wrap these in per-ISA clones (target_clones), which only get
// vector code if the helper is inlined into each clone.
#define DOE_HD inline __attribute__((always_inline))
#endif

// Marks a host loop for vectorisation (reductions may be reassociated; needs -fopenmp-simd).
// Nothing in CUDA translation units, whose hot loops are on the device.
#ifdef __CUDACC__
#define DOE_SIMD
#define DOE_SIMD_REDUCE(op, ...)
#else
#define DOE_PRAGMA(x) _Pragma(#x)
#define DOE_SIMD DOE_PRAGMA(omp simd)
#define DOE_SIMD_REDUCE(op, ...) DOE_PRAGMA(omp simd reduction(op : __VA_ARGS__))
#endif

// A CPU function built for several ISAs and picked at load time (GCC function multiversioning):
// wrap a DOE_HD helper in one so the helper's loops get AVX-512/AVX2 code in a portable binary.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define DOE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DOE_CLONES
#endif

namespace doe_ext {

#ifndef __CUDA_ARCH__
// expf for host loops: Cephes' range reduction and degree-6 polynomial (about 2 ulp), branch-free
// so that a loop of it vectorises (a libm call does not). Inputs below -87.3 give ~1e-38, not 0.
DOE_HD float host_expf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, built in the exponent field
  return p * __builtin_bit_cast(float, bits);
}
#endif

DOE_HD float exp_(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  return host_expf(x);
#endif
}
DOE_HD double exp_(double x) { return ::exp(x); }
DOE_HD float log_(float x) { return ::logf(x); }
DOE_HD double log_(double x) { return ::log(x); }

namespace ka {

// s[0..K) holds the raw scores q·z_k; on return it holds softmax(scale * s). Returns the row's
// log-sum-exp of the scaled scores, which is all the backward needs to rebuild the probabilities.
template <typename acc_t>
DOE_HD acc_t softmax_row(acc_t* s, int64_t K, acc_t scale) {
  acc_t m = -INFINITY;
  DOE_SIMD_REDUCE(max, m)
  for (int64_t k = 0; k < K; ++k) m = s[k] * scale > m ? s[k] * scale : m;
  DOE_SIMD
  for (int64_t k = 0; k < K; ++k) s[k] = exp_(s[k] * scale - m);
  acc_t sum = 0;
  DOE_SIMD_REDUCE(+, sum)
  for (int64_t k = 0; k < K; ++k) sum += s[k];
  const acc_t inv = acc_t(1) / sum;
  DOE_SIMD
  for (int64_t k = 0; k < K; ++k) s[k] *= inv;
  return m + log_(sum);
}

// Raw scores -> probabilities, from the log-sum-exp saved by the forward.
template <typename acc_t>
DOE_HD void probs_from_lse(acc_t* s, int64_t K, acc_t scale, acc_t lse) {
  DOE_SIMD
  for (int64_t k = 0; k < K; ++k) s[k] = exp_(s[k] * scale - lse);
}

// Softmax backward with the score scale folded in: dp holds dL/dp on entry and
// dL/d(raw score) = scale * p * (dp - <p, dp>) on return.
template <typename acc_t>
DOE_HD void softmax_backward_row(const acc_t* p, acc_t* dp, int64_t K, acc_t scale) {
  acc_t dot = 0;
  DOE_SIMD_REDUCE(+, dot)
  for (int64_t k = 0; k < K; ++k) dot += p[k] * dp[k];
  DOE_SIMD
  for (int64_t k = 0; k < K; ++k) dp[k] = scale * p[k] * (dp[k] - dot);
}

}  // namespace ka
}  // namespace doe_ext
