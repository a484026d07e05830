// decode_linear: out = x @ weight.T + bias for a few rows of x (a decoding step's tokens), reading
// weight once. Shared by the CPU and CUDA backends: argument checks and the row math.
#pragma once

#include <optional>

#include "doe_ext/checks.h"
#include "doe_ext/math.h"

namespace doe_ext {

// Rows up to which the CPU kernel streams the weight; more rows are a GEMM (compute-bound), ATen's.
constexpr int64_t kDecodeLinearMaxRows = 8;

struct DecodeLinearSizes {
  int64_t M, in, out;
};

inline DecodeLinearSizes check_decode_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  constexpr const char* op = "decode_linear";
  check_given(op, {{"x", &x}, {"weight", &weight}});
  check_dim(x, 2, op, "x", "[M, in]");
  check_floating(x, op, "x");
  check_linear(x, weight, bias, op);
  return {x.size(0), x.size(1), weight.size(0)};
}

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

// Rows [o0, o1) of out [M, ld] = x [M, in] @ w.T + b: each weight row read once, its dot products with
// the input rows in groups of four, then one at a time.
template <typename T>
DOE_HD void rows(const T* w, const T* x, const T* b, T* out, int64_t M, int64_t in, int64_t ld, int64_t o0,
                 int64_t o1) {
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
