// Branch-free float polynomials (Cephes) shared by the host and the device: they vectorise in CPU row
// loops (libm calls do not) and give the same numbers on both sides up to FMA contraction.
#pragma once

#include <math.h>
#include <stdint.h>

#include "doe_ext/math.h"

namespace doe_ext {
namespace poly {

DOE_HD float as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}
DOE_HD uint32_t as_uint(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// log(x) for normal x > 0: Cephes' logf (frexp by bit fiddling, degree-8 polynomial), branch-free.
DOE_HD float log_poly(float x) {
  const uint32_t bits = as_uint(x);
  float e = float(int32_t((bits >> 23) & 0xffu) - 126);
  float m = as_float((bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// sqrt(x) for x >= 0 without libm (whose errno contract keeps sqrtf out of vector loops): the
// bit-trick 1/sqrt estimate and two Newton steps (relative error ~1e-11 before rounding to float).
DOE_HD float sqrt_nr(float x) {
  float y = as_float(0x5f3759dfu - (as_uint(x) >> 1));
  y = y * (1.5f - 0.5f * x * y * y);
  y = y * (1.5f - 0.5f * x * y * y);
  return x * y;
}

// sin and cos of 2 pi u for u in [0, 1): quadrant from u exactly, Cephes' polynomials on [-pi/4, pi/4].
DOE_HD void sincos_2pi(float u, float& sin_out, float& cos_out) {
  const float q = floorf(4.f * u + 0.5f);               // 0..4
  const float x = (u - 0.25f * q) * 6.28318530717958648f;  // exact subtraction, |x| <= pi/4
  const float z = x * x;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
                  - 0.5f * z + 1.f;
  const int quad = int(q) & 3;
  sin_out = quad == 0 ? s : (quad == 1 ? c : (quad == 2 ? -s : -c));
  cos_out = quad == 0 ? c : (quad == 1 ? -s : (quad == 2 ? -c : s));
}

}  // namespace poly
}  // namespace doe_ext
