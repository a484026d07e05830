// decode_linear's row math, shared by the CPU kernels (csrc/cpu/decode_linear.cpp) and the A/B probe
// benchmarks/ab_gemv_streams.cpp: plain loops over pointers, no tensor types.
#pragma once

#include <stdint.h>

#include "doe_ext/math.h"

namespace doe_ext {
namespace dl {

// out[m * ld + o] = b + <w, x[m]> for m in [m0, m0 + 4): four accumulator chains over one row w of the
// weight (read from memory once, then from L1), vectorised along the row.
template <typename T>
DOE_HD void dot4(const T* w, const T* x, int64_t in, T b, T* out, int64_t ld) {
  const T *x0 = x, *x1 = x + in, *x2 = x + 2 * in, *x3 = x + 3 * in;
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  DOE_SIMD_REDUCE(+, a0, a1, a2, a3)
  for (int64_t c = 0; c < in; ++c) {
    const T wc = w[c];
    a0 += wc * x0[c];
    a1 += wc * x1[c];
    a2 += wc * x2[c];
    a3 += wc * x3[c];
  }
  out[0] = a0 + b;
  out[ld] = a1 + b;
  out[2 * ld] = a2 + b;
  out[3 * ld] = a3 + b;
}

template <typename T>
DOE_HD T dot1(const T* w, const T* x, int64_t in) {
  T acc = 0;
  DOE_SIMD_REDUCE(+, acc)
  for (int64_t c = 0; c < in; ++c) acc += w[c] * x[c];
  return acc;
}

// a[s] = <w_s, x> for four weight rows w_0..w_3: four accumulator chains in one pass over x. Each chain
// sums in the order of dot1's, so a[s] is bit for bit dot1(w_s, x, in).
template <typename T>
DOE_HD void dot1x4(const T* w0, const T* w1, const T* w2, const T* w3, const T* x, int64_t in, T* a) {
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  DOE_SIMD_REDUCE(+, a0, a1, a2, a3)
  for (int64_t c = 0; c < in; ++c) {
    const T xc = x[c];
    a0 += w0[c] * xc;
    a1 += w1[c] * xc;
    a2 += w2[c] * xc;
    a3 += w3[c] * xc;
  }
  a[0] = a0;
  a[1] = a1;
  a[2] = a2;
  a[3] = a3;
}

// Rows [o0, o1) of out [M, ld] = x [M, in] @ w.T + b: each weight row read once. Four input rows or more:
// each weight row's dot products with them in groups of four, then one at a time. Fewer (decoding at
// batch 1-3): four weight rows at a time, one from each quarter of the range, so that four sequential
// streams are read from memory at once; one row at a time, a core reads the weights some 1.5x slower
// (benchmarks/README.md, "Four streams per core"). Either way each output is dot1's or dot4's sum.
template <typename T>
DOE_HD void rows(const T* w, const T* x, const T* b, T* out, int64_t M, int64_t in, int64_t ld, int64_t o0,
                 int64_t o1) {
  if (M < 4) {
    const int64_t q = (o1 - o0) / 4;
    for (int64_t i = 0; i < q; ++i) {
      const int64_t r[4] = {o0 + i, o0 + q + i, o0 + 2 * q + i, o0 + 3 * q + i};
      for (int64_t m = 0; m < M; ++m) {
        T a[4];
        dot1x4(w + r[0] * in, w + r[1] * in, w + r[2] * in, w + r[3] * in, x + m * in, in, a);
        for (int s = 0; s < 4; ++s) out[m * ld + r[s]] = a[s] + (b ? b[r[s]] : T(0));
      }
    }
    o0 += 4 * q;  // the last (o1 - o0) % 4 rows: below
  }
  for (int64_t o = o0; o < o1; ++o) {
    const T* wr = w + o * in;
    const T bo = b ? b[o] : T(0);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dot4(wr, x + m * in, in, bo, out + m * ld + o, ld);
    for (; m < M; ++m) out[m * ld + o] = dot1(wr, x + m * in, in) + bo;
  }
}

}  // namespace dl
}  // namespace doe_ext
