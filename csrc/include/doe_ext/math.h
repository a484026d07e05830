// Scalar math shared by the CPU and CUDA kernels (__host__ __device__), so the CPU tests exercise
// the very lines the GPU runs.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define DOE_HD __host__ __device__ __forceinline__
#else
#define DOE_HD inline
#endif

namespace doe_ext {

DOE_HD float exp_(float x) { return ::expf(x); }
DOE_HD double exp_(double x) { return ::exp(x); }
DOE_HD float log_(float x) { return ::logf(x); }
DOE_HD double log_(double x) { return ::log(x); }

namespace ka {

// s[0..K) holds the raw scores q·z_k; on return it holds softmax(scale * s). Returns the row's
// log-sum-exp of the scaled scores, which is all the backward needs to rebuild the probabilities.
template <typename acc_t>
DOE_HD acc_t softmax_row(acc_t* s, int64_t K, acc_t scale) {
  acc_t m = -INFINITY;
  for (int64_t k = 0; k < K; ++k) m = s[k] * scale > m ? s[k] * scale : m;
  acc_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    s[k] = exp_(s[k] * scale - m);
    sum += s[k];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t k = 0; k < K; ++k) s[k] *= inv;
  return m + log_(sum);
}

// Raw scores -> probabilities, from the log-sum-exp saved by the forward.
template <typename acc_t>
DOE_HD void probs_from_lse(acc_t* s, int64_t K, acc_t scale, acc_t lse) {
  for (int64_t k = 0; k < K; ++k) s[k] = exp_(s[k] * scale - lse);
}

// Softmax backward with the score scale folded in: dp holds dL/dp on entry and
// dL/d(raw score) = scale * p * (dp - <p, dp>) on return.
template <typename acc_t>
DOE_HD void softmax_backward_row(const acc_t* p, acc_t* dp, int64_t K, acc_t scale) {
  acc_t dot = 0;
  for (int64_t k = 0; k < K; ++k) dot += p[k] * dp[k];
  for (int64_t k = 0; k < K; ++k) dp[k] = scale * p[k] * (dp[k] - dot);
}

}  // namespace ka
}  // namespace doe_ext
