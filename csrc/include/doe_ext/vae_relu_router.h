// vae_relu_router (DoE §3.4, App. A.3): argument checks and the row math shared by the CPU and CUDA
// backends, including the counter-based noise generator, so both draw the same eps for a given rng.
#pragma once

#include "doe_ext/tensor.h"

#include <optional>
#include <string>
#include <vector>

#include "doe_ext/checks.h"
#include "doe_ext/math.h"
#include "doe_ext/poly_math.h"

namespace doe_ext {

struct VaeRouterSizes {
  int64_t N;   // tokens (product of h's leading dims)
  int64_t d;   // hidden width
  int64_t dz;  // latent width
  int64_t K;   // knowledge blocks (gates)
};

inline void check_vector(const Tensor& t, int64_t n, const char* op, const char* name, const char* what,
                         const Tensor& ref) {
  check_dim(t, 1, op, name, what);
  check_size(t, 0, n, op, name, what);
  check_same_device(t, ref, op, name, "h");
  check_same_dtype(t, ref, op, name, "h");
}

inline void check_activation(const std::string& activation, const char* op) {
  DOE_CHECK(activation == "relu" || activation == "softmax", op,
            ": expected `activation` to be \"relu\" or \"softmax\", got \"", activation, "\"");
}

// h, w_mu, w_logvar, w_gate against each other: every size the kernels derive comes from here.
inline VaeRouterSizes check_weights(const char* op, const Tensor& h, const Tensor& w_mu,
                                    const Tensor& w_logvar, const Tensor& w_gate) {
  check_min_dim(h, 1, op, "h", "[..., d]");
  check_floating(h, op, "h");
  const int64_t d = h.size(-1);
  check_dim(w_mu, 2, op, "w_mu", "[dz, d]");
  check_same_device(w_mu, h, op, "w_mu", "h");
  check_same_dtype(w_mu, h, op, "w_mu", "h");
  check_size(w_mu, 1, d, op, "w_mu", "d, the last dim of h");
  const int64_t dz = w_mu.size(0);
  DOE_CHECK(dz >= 1, op, ": expected `w_mu` to have at least one latent dim (dz >= 1), got shape ",
            shape_str(w_mu.sizes()));
  check_dim(w_logvar, 2, op, "w_logvar", "[dz, d]");
  check_same_device(w_logvar, h, op, "w_logvar", "h");
  check_same_dtype(w_logvar, h, op, "w_logvar", "h");
  check_size(w_logvar, 0, dz, op, "w_logvar", "dz, the first dim of w_mu");
  check_size(w_logvar, 1, d, op, "w_logvar", "d, the last dim of h");
  check_dim(w_gate, 2, op, "w_gate", "[K, dz]");
  check_same_device(w_gate, h, op, "w_gate", "h");
  check_same_dtype(w_gate, h, op, "w_gate", "h");
  check_size(w_gate, 1, dz, op, "w_gate", "dz, the first dim of w_mu");
  const int64_t K = w_gate.size(0);
  DOE_CHECK(K >= 1, op, ": expected `w_gate` to hold at least one knowledge block (K >= 1), got shape ",
            shape_str(w_gate.sizes()));
  return {multiply_integers(h.sizes().slice(0, h.dim() - 1)), d, dz, K};
}

// A tensor of h's leading dims and the given last dim (none: h's leading dims only), on h's device and dtype.
inline void check_rows_like(const Tensor& t, const Tensor& h, std::optional<int64_t> last, const char* op,
                            const char* name, const char* what) {
  auto expected = h.sizes().vec();
  if (last.has_value()) expected.back() = *last; else expected.pop_back();
  check_same_device(t, h, op, name, "h");
  check_same_dtype(t, h, op, name, "h");
  DOE_CHECK(t.sizes().vec() == expected, op, ": expected `", name, "` of shape ", IntArrayRef(expected),
            " (", what, " with h's leading dims), got ", shape_str(t.sizes()));
}

// eps: `noise` when given, else drawn from `rng`; training needs one of them (eval uses none).
inline void check_noise_rng(const char* op, const Tensor& h, int64_t dz, const std::optional<Tensor>& noise,
                            const std::optional<Tensor>& rng, bool training) {
  DOE_CHECK(!training || noise.has_value() || rng.has_value(), op, ": training without `noise` needs `rng` (an "
              "int64 [2] Philox key/stream); doe_ext.ops.vae_relu_router draws it from torch's generator");
  if (noise.has_value()) check_rows_like(*noise, h, dz, op, "noise", "[..., dz]");
  if (rng.has_value()) {
    const auto& r = *rng;
    check_index(r, op, "rng");
    check_same_device(r, h, op, "rng", "h");
    DOE_CHECK(r.dim() == 1 && r.size(0) == 2, op, ": expected `rng` of shape [2] (Philox key, stream), got ",
              shape_str(r.sizes()));
  }
}

inline VaeRouterSizes check_vae_relu_router(const Tensor& h, const Tensor& w_mu, const Tensor& b_mu,
                                            const Tensor& w_logvar, const Tensor& b_logvar,
                                            const Tensor& w_gate, const Tensor& b_gate,
                                            const std::optional<Tensor>& noise,
                                            const std::optional<Tensor>& rng, bool training,
                                            const std::string& activation) {
  constexpr const char* op = "vae_relu_router";
  check_given(op, {{"h", &h}, {"w_mu", &w_mu}, {"b_mu", &b_mu}, {"w_logvar", &w_logvar}, {"b_logvar", &b_logvar},
                   {"w_gate", &w_gate}, {"b_gate", &b_gate}});
  check_activation(activation, op);
  const auto sz = check_weights(op, h, w_mu, w_logvar, w_gate);
  check_vector(b_mu, sz.dz, op, "b_mu", "[dz]", h);
  check_vector(b_logvar, sz.dz, op, "b_logvar", "[dz]", h);
  check_vector(b_gate, sz.K, op, "b_gate", "[K]", h);
  check_noise_rng(op, h, sz.dz, noise, rng, training);
  return sz;
}

namespace vr {

// ---- eps ~ N(0, 1): Philox4x32-10 (Salmon et al., SC'11) + one Box-Muller cosine branch ----------
// One Philox call (counter = (j / 4, row, stream), key) gives four 32-bit words, i.e. two Box-Muller
// pairs: eps[row, 4g .. 4g+3] = r01 cos(2 pi u1), r01 sin(2 pi u1), r23 cos(2 pi u3), r23 sin(2 pi u3)
// with r = sqrt(-2 log u).
// A pure function of (key, stream, row, j): the backward regenerates eps instead of storing it, and
// CPU and CUDA draw the same numbers (log/cos are the polynomials below, not libm's).

DOE_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

DOE_HD void normal4(uint32_t k0, uint32_t k1, uint32_t stream, uint64_t row, uint32_t g, float& n0, float& n1,
                    float& n2, float& n3) {
  uint32_t c0 = g, c1 = uint32_t(row), c2 = uint32_t(row >> 32), c3 = stream;
  philox4x32_10(c0, c1, c2, c3, k0, k1);
  constexpr float k2m24 = 5.9604644775390625e-8f;  // 24 random bits per uniform
  const float r01 = poly::sqrt_nr(-2.f * poly::log_poly((float(c0 >> 8) + 0.5f) * k2m24));  // u in (0, 1)
  const float r23 = poly::sqrt_nr(-2.f * poly::log_poly((float(c2 >> 8) + 0.5f) * k2m24));
  float s, c;
  poly::sincos_2pi(float(c1 >> 8) * k2m24, s, c);  // u in [0, 1)
  n0 = r01 * c;
  n1 = r01 * s;
  poly::sincos_2pi(float(c3 >> 8) * k2m24, s, c);
  n2 = r23 * c;
  n3 = r23 * s;
}

// eps[row, j] alone (the CUDA kernels: a thread per element; the CPU fills whole rows with fill_normal).
DOE_HD float normal(uint32_t k0, uint32_t k1, uint32_t stream, uint64_t row, uint32_t j) {
  float n[4];
  normal4(k0, k1, stream, row, j >> 2, n[0], n[1], n[2], n[3]);
  return n[j & 3];
}

struct Rng {
  uint32_t k0, k1, stream;
};
DOE_HD Rng unpack_rng(int64_t key, int64_t stream) {
  return {uint32_t(uint64_t(key)), uint32_t(uint64_t(key) >> 32), uint32_t(uint64_t(stream))};
}

// eps[row, 0 .. dz) into out, one Philox call per four elements.
DOE_HD void fill_normal(float* out, int64_t dz, Rng rng, uint64_t row) {
  const int64_t groups = dz / 4;
  DOE_SIMD
  for (int64_t g = 0; g < groups; ++g)
    normal4(rng.k0, rng.k1, rng.stream, row, uint32_t(g), out[4 * g], out[4 * g + 1], out[4 * g + 2], out[4 * g + 3]);
  if (dz % 4) {
    float n[4];
    normal4(rng.k0, rng.k1, rng.stream, row, uint32_t(groups), n[0], n[1], n[2], n[3]);
    for (int64_t q = 0; q < dz % 4; ++q) out[4 * groups + q] = n[q];
  }
}

// Where eps comes from: none (eval, z = mu), the caller's noise, or drawn from the Philox stream.
enum class Eps { kNone = 0, kGiven = 1, kDrawn = 2 };

// One latent element: z = mu + exp(lv / 2) * eps (or mu), and the element's term of 2 * KL.
template <typename acc_t>
DOE_HD acc_t reparam_one(acc_t mu, acc_t lv, acc_t eps, bool stochastic, acc_t& z) {
  const acc_t s = exp_(acc_t(0.5) * lv);
  z = stochastic ? mu + s * eps : mu;
  return s * s + mu * mu - acc_t(1) - lv;
}

// Its backward: g = dL/dz, gkl = dL/dkl of the row. sigma * eps is z - mu (z rebuilt by the
// forward's code), so eps is never needed here.
template <typename acc_t>
DOE_HD void reparam_grad_one(acc_t mu, acc_t lv, acc_t z, acc_t g, acc_t gkl, bool stochastic, acc_t& dmu,
                             acc_t& dlv) {
  const acc_t s = exp_(acc_t(0.5) * lv);
  const acc_t s_eps = stochastic ? z - mu : acc_t(0);
  dmu = g + gkl * mu;
  dlv = acc_t(0.5) * (g * s_eps + gkl * (s * s - acc_t(1)));
}

// Reparameterisation and KL of one row. mulv = [mu (dz) | logvar (dz)]; writes z; returns the row's
// KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 * sum(exp(logvar) + mu^2 - 1 - logvar).
// noise: eps of the row (null in eval), the caller's or from fill_normal.
template <typename T, typename E, typename acc_t = T>
DOE_HD acc_t reparam_row(const T* mulv, const E* noise, T* z, int64_t dz) {
  acc_t kl = 0;
  DOE_SIMD_REDUCE(+, kl)
  for (int64_t j = 0; j < dz; ++j) {
    acc_t zj;
    kl += reparam_one(acc_t(mulv[j]), acc_t(mulv[dz + j]), noise ? acc_t(noise[j]) : acc_t(0), noise != nullptr, zj);
    z[j] = T(zj);
  }
  return acc_t(0.5) * kl;
}

// Backward of reparam_row + KL: dz = dL/dz on entry; writes dmulv = [dL/dmu | dL/dlogvar].
template <typename T, typename acc_t = T>
DOE_HD void reparam_backward_row(const T* mulv, const T* z, const T* dz_, acc_t gkl, T* dmulv, int64_t dz,
                                 bool stochastic) {
  DOE_SIMD
  for (int64_t j = 0; j < dz; ++j) {
    acc_t dmu, dlv;
    reparam_grad_one(acc_t(mulv[j]), acc_t(mulv[dz + j]), acc_t(z[j]), acc_t(dz_[j]), gkl, stochastic, dmu, dlv);
    dmulv[j] = T(dmu);
    dmulv[dz + j] = T(dlv);
  }
}

// gates = relu(logits) in place of a copy; returns the number of active (> 0) gates of the row.
template <typename T>
DOE_HD int64_t relu_row(const T* logits, T* gates, int32_t* counts, int64_t K) {
  int64_t active = 0;
  DOE_SIMD_REDUCE(+, active)
  for (int64_t k = 0; k < K; ++k) {
    const T l = logits[k];
    const bool on = l > T(0);
    gates[k] = on || l != l ? l : T(0);  // relu(NaN) = NaN, as torch.relu: a diverging router shows
    counts[k] += on ? 1 : 0;
    active += on ? 1 : 0;
  }
  return active;
}

// dL/dlogits of the activation plus the direct logits gradient. Either grad may be null.
template <typename T>
DOE_HD void relu_backward_row(const T* logits, const T* gg, const T* gl, T* dl, int64_t K) {
  if (gg == nullptr) {
    DOE_SIMD
    for (int64_t k = 0; k < K; ++k) dl[k] = gl ? gl[k] : T(0);
    return;
  }
  DOE_SIMD
  for (int64_t k = 0; k < K; ++k) dl[k] = (logits[k] > T(0) ? gg[k] : T(0)) + (gl ? gl[k] : T(0));
}

template <typename T>
DOE_HD void softmax_backward_row(const T* p, const T* gg, const T* gl, T* dl, int64_t K) {
  if (gg == nullptr) {
    DOE_SIMD
    for (int64_t k = 0; k < K; ++k) dl[k] = gl ? gl[k] : T(0);
    return;
  }
  T dot = 0;
  DOE_SIMD_REDUCE(+, dot)
  for (int64_t k = 0; k < K; ++k) dot += p[k] * gg[k];
  DOE_SIMD
  for (int64_t k = 0; k < K; ++k) dl[k] = p[k] * (gg[k] - dot) + (gl ? gl[k] : T(0));
}

// ---- host helpers of both backends ----

// Every tensor the backward reads, checked before any is touched; sizes from the same tensors the kernels use.
inline VaeRouterSizes check_backward(const std::optional<Tensor>& grad_gates,
                                     const std::optional<Tensor>& grad_logits,
                                     const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& grad_z,
                                     const Tensor& h, const Tensor& w_mu, const Tensor& w_logvar,
                                     const Tensor& w_gate, const Tensor& mu_logvar, const Tensor& gates,
                                     const Tensor& logits, const std::optional<Tensor>& noise,
                                     const std::optional<Tensor>& rng, bool training,
                                     const std::string& activation) {
  constexpr const char* op = "vae_relu_router_bwd";
  check_given(op, {{"h", &h}, {"w_mu", &w_mu}, {"w_logvar", &w_logvar}, {"w_gate", &w_gate}, {"mu_logvar", &mu_logvar},
                   {"gates", &gates}, {"logits", &logits}});
  check_activation(activation, op);
  const auto sz = check_weights(op, h, w_mu, w_logvar, w_gate);
  check_rows_like(mu_logvar, h, 2 * sz.dz, op, "mu_logvar", "[..., 2 dz]");
  check_rows_like(gates, h, sz.K, op, "gates", "[..., K]");
  check_rows_like(logits, h, sz.K, op, "logits", "[..., K]");
  if (grad_gates.has_value()) check_rows_like(*grad_gates, h, sz.K, op, "grad_gates", "[..., K]");
  if (grad_logits.has_value()) check_rows_like(*grad_logits, h, sz.K, op, "grad_logits", "[..., K]");
  if (grad_kl.has_value()) check_rows_like(*grad_kl, h, std::nullopt, op, "grad_kl", "[...]");
  if (grad_z.has_value()) check_rows_like(*grad_z, h, sz.dz, op, "grad_z", "[..., dz]");
  check_noise_rng(op, h, sz.dz, noise, rng, training);
  return sz;
}

inline Eps eps_mode(bool training, const std::optional<Tensor>& noise, const std::optional<Tensor>& rng) {
  if (!training) return Eps::kNone;
  return noise.has_value() ? Eps::kGiven : Eps::kDrawn;  // check_noise_rng refused training with neither
}

}  // namespace vr
}  // namespace doe_ext
