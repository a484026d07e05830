// CPU VAE-ReLU router, forward and backward (DoE §3.4, App. A.3).
//
// Forward: ONE GEMM for both encoder heads (h @ [w_mu; w_logvar].T, biases folded in by addmm), one
// vectorised pass per row for the reparameterisation + KL (eps drawn by a counter-based generator, so
// nothing but the [key, stream] pair is kept for the backward), the gate GEMM, then one pass for the
// activation and the gate telemetry. Backward: eps is regenerated into z, the gate's dlogits pass,
// two GEMMs for the gate, one pass for d[mu | logvar], and three GEMMs over the stacked encoder.
#include "doe_ext/tensor.h"

#include <atomic>
#include <vector>

#include "doe_ext/vae_relu_router.h"

namespace doe_ext {
namespace {

using vr::Eps;
using vr::eps_mode;

// The shared row math, compiled per ISA for float; double (gradcheck) needs no clones.
DOE_CLONES void fill_normal_f(float* out, int64_t dz, vr::Rng rng, uint64_t row) { vr::fill_normal(out, dz, rng, row); }
DOE_CLONES float reparam_f(const float* mulv, const float* noise, float* z, int64_t dz) {
  return vr::reparam_row(mulv, noise, z, dz);
}
double reparam_f(const double* mulv, const double* noise, double* z, int64_t dz) {
  return vr::reparam_row(mulv, noise, z, dz);
}
double reparam_f(const double* mulv, const float* noise, double* z, int64_t dz) {
  return vr::reparam_row(mulv, noise, z, dz);
}
DOE_CLONES void reparam_bwd(const float* mulv, const float* z, const float* g, float gkl, float* dmulv, int64_t dz,
                            bool stochastic) {
  vr::reparam_backward_row(mulv, z, g, gkl, dmulv, dz, stochastic);
}
void reparam_bwd(const double* mulv, const double* z, const double* g, double gkl, double* dmulv, int64_t dz,
                 bool stochastic) {
  vr::reparam_backward_row(mulv, z, g, gkl, dmulv, dz, stochastic);
}
DOE_CLONES int64_t relu_f(const float* l, float* g, int32_t* counts, int64_t K) { return vr::relu_row(l, g, counts, K); }
int64_t relu_f(const double* l, double* g, int32_t* counts, int64_t K) { return vr::relu_row(l, g, counts, K); }
DOE_CLONES void relu_bwd(const float* l, const float* gg, const float* gl, float* dl, int64_t K) {
  vr::relu_backward_row(l, gg, gl, dl, K);
}
void relu_bwd(const double* l, const double* gg, const double* gl, double* dl, int64_t K) {
  vr::relu_backward_row(l, gg, gl, dl, K);
}
DOE_CLONES void softmax_bwd(const float* p, const float* gg, const float* gl, float* dl, int64_t K) {
  vr::softmax_backward_row(p, gg, gl, dl, K);
}
void softmax_bwd(const double* p, const double* gg, const double* gl, double* dl, int64_t K) {
  vr::softmax_backward_row(p, gg, gl, dl, K);
}
DOE_CLONES float softmax_f(float* s, int64_t K) { return ka::softmax_row(s, K, 1.f); }
double softmax_f(double* s, int64_t K) { return ka::softmax_row(s, K, 1.0); }

vr::Rng read_rng(const std::optional<Tensor>& rng) {
  if (!rng.has_value()) return {0, 0, 0};
  const auto r = rng->contiguous();
  return vr::unpack_rng(r.data_ptr<int64_t>()[0], r.data_ptr<int64_t>()[1]);
}

// z[i] = mu + sigma * eps (or mu) for every row; kl[i] when kl is given.
template <typename T>
void reparameterise(const Tensor& mulv, const T* noise, T* z, T* kl, int64_t N, int64_t dz, Eps mode, vr::Rng rng) {
  const T* m = mulv.data_ptr<T>();
  torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    std::vector<float> eps(mode == Eps::kDrawn ? dz : 0);  // the row's eps, drawn just before use
    for (int64_t i = i0; i < i1; ++i) {
      const T* mi = m + i * 2 * dz;
      T* zi = z + i * dz;
      T k;
      if (mode == Eps::kDrawn) {
        fill_normal_f(eps.data(), dz, rng, uint64_t(i));
        k = reparam_f(mi, eps.data(), zi, dz);
      } else {
        k = reparam_f(mi, mode == Eps::kGiven ? noise + i * dz : nullptr, zi, dz);
      }
      if (kl) kl[i] = k;
    }
  });
}

template <typename T>
void forward(const Tensor& h2, const Tensor& w_stack, const Tensor& b_stack, const Tensor& w_gate,
             const Tensor& b_gate, const T* noise, Eps mode, vr::Rng rng, bool relu, Tensor& gates2,
             Tensor& logits2, T* kl, Tensor& z2, Tensor& mulv2, Tensor& counts, Tensor& zero_rows) {
  const int64_t N = h2.size(0), dz = w_gate.size(1), K = w_gate.size(0);
  addmm_out(mulv2, b_stack, h2, w_stack.t());
  reparameterise<T>(mulv2, noise, z2.data_ptr<T>(), kl, N, dz, mode, rng);
  addmm_out(logits2, b_gate, z2, w_gate.t());
  const T* l = logits2.data_ptr<T>();
  T* g = gates2.data_ptr<T>();
  std::vector<std::atomic<int64_t>> total(K + 1);
  torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> c(K, 0);
    int64_t zeros = 0;
    for (int64_t i = i0; i < i1; ++i) {
      int64_t active;
      if (relu) {
        active = relu_f(l + i * K, g + i * K, c.data(), K);
      } else {
        T* gi = g + i * K;
        for (int64_t k = 0; k < K; ++k) gi[k] = l[i * K + k];
        softmax_f(gi, K);
        active = relu_f(gi, gi, c.data(), K);  // counts the (positive) probabilities, leaves them as they are
      }
      zeros += active == 0;
    }
    for (int64_t k = 0; k < K; ++k) total[k] += c[k];
    total[K] += zeros;
  });
  auto* cp = counts.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) cp[k] = total[k].load();
  zero_rows.fill_(total[K].load());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> vae_relu_router_fwd_cpu(
    const Tensor& h, const Tensor& w_mu, const Tensor& b_mu, const Tensor& w_logvar,
    const Tensor& b_logvar, const Tensor& w_gate, const Tensor& b_gate,
    const std::optional<Tensor>& noise, const std::optional<Tensor>& rng, bool training,
    std::string_view activation) {
  const std::string act(activation);
  const auto sz = check_vae_relu_router(h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, noise, rng, training, act);
  if (is_half(h)) {  // float32 math, the outputs in h's dtype (as on CUDA)
    const auto dt = h.scalar_type();
    auto [gates, logits, kl, z, mulv, counts, zero_rows] = vae_relu_router_fwd_cpu(
        up(h), up(w_mu), up(b_mu), up(w_logvar), up(b_logvar), up(w_gate), up(b_gate), up(noise), rng, training,
        activation);
    return {gates.to(dt), logits.to(dt), kl.to(dt), z.to(dt), mulv.to(dt), counts, zero_rows};
  }
  const Eps mode = eps_mode(training, noise, rng);
  auto gates = empty(leading_with(h, sz.K), h.options());
  auto logits = empty(leading_with(h, sz.K), h.options());
  auto kl = empty(h.sizes().slice(0, h.dim() - 1), h.options());
  auto z = empty(leading_with(h, sz.dz), h.options());  // a temporary the caller may keep (decoder input)
  auto mulv = empty(leading_with(h, 2 * sz.dz), h.options());
  auto counts = zeros({sz.K}, h.options().dtype(kLong));
  auto zero_rows = zeros({}, h.options().dtype(kLong));
  if (sz.N == 0) return {gates, logits, kl, z, mulv, counts, zero_rows};
  const auto h2 = as_rows(h, sz.N);
  const auto w_stack = cat({w_mu, w_logvar}, 0);
  const auto b_stack = cat({b_mu, b_logvar}, 0);
  const auto wg = w_gate.contiguous();
  const auto noise2 = mode == Eps::kGiven ? noise->reshape({sz.N, sz.dz}).contiguous() : Tensor();
  auto gates2 = gates.view({sz.N, sz.K}), logits2 = logits.view({sz.N, sz.K});
  auto mulv2 = mulv.view({sz.N, 2 * sz.dz});
  auto z2 = z.view({sz.N, sz.dz});
  const auto r = read_rng(rng);
  DOE_DISPATCH_FLOATING_TYPES(h.scalar_type(), "vae_relu_router_fwd_cpu", [&] {
    forward<scalar_t>(h2, w_stack, b_stack, wg, b_gate, noise2.defined() ? noise2.data_ptr<scalar_t>() : nullptr,
                      mode, r, act == "relu", gates2, logits2, kl.data_ptr<scalar_t>(), z2, mulv2, counts, zero_rows);
  });
  return {gates, logits, kl, z, mulv, counts, zero_rows};
}

template <typename T>
void backward(const T* gg, const T* gl, const T* gk, const Tensor& gz, const Tensor& h2, const Tensor& w_stack,
              const Tensor& w_gate, const Tensor& mulv2, const Tensor& gates2, const Tensor& logits2,
              const T* noise, Eps mode, vr::Rng rng, bool relu, Tensor& dh, Tensor& dw_mu, Tensor& db_mu,
              Tensor& dw_lv, Tensor& db_lv, Tensor& dw_gate, Tensor& db_gate) {
  const int64_t N = h2.size(0), dz = w_gate.size(1), K = w_gate.size(0);
  // z, rebuilt (eps regenerated) for the gate's weight gradient and for sigma * eps = z - mu.
  auto z = empty({N, dz}, h2.options());
  T* zp = z.data_ptr<T>();
  reparameterise<T>(mulv2, noise, zp, nullptr, N, dz, mode, rng);
  auto dl = empty({N, K}, h2.options());
  T* dlp = dl.data_ptr<T>();
  const T* lp = logits2.data_ptr<T>();
  const T* gp = gates2.data_ptr<T>();
  torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* ggi = gg ? gg + i * K : nullptr;
      const T* gli = gl ? gl + i * K : nullptr;
      if (relu) {
        relu_bwd(lp + i * K, ggi, gli, dlp + i * K, K);
      } else {
        softmax_bwd(gp + i * K, ggi, gli, dlp + i * K, K);
      }
    }
  });
  mm_out(dw_gate, dl.t(), z);
  sum_out(db_gate, dl, {0});
  auto dzt = gz.defined() ? addmm(gz, dl, w_gate) : mm(dl, w_gate);
  dl.reset();
  auto dmulv = empty({N, 2 * dz}, h2.options());
  const T* mp = mulv2.data_ptr<T>();
  const T* dzp = dzt.data_ptr<T>();
  T* dmp = dmulv.data_ptr<T>();
  const bool stochastic = mode != Eps::kNone;
  torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      reparam_bwd(mp + i * 2 * dz, zp + i * dz, dzp + i * dz, gk ? gk[i] : T(0), dmp + i * 2 * dz, dz, stochastic);
  });
  z.reset();
  dzt.reset();
  // dh is allocated only now, once the [N, dz] temporaries are gone: the peak stays below eager's.
  dh = empty(dh.sizes(), h2.options());
  auto dh2 = dh.view({N, h2.size(1)});
  mm_out(dh2, dmulv, w_stack);
  // One GEMM for both encoder heads' weight gradients: BLAS is much slower on the heads' strided
  // halves of dmulv (measured 1.6x for half the work) than on the whole, and the split is a 2 dz x d copy.
  const auto dw = mm(dmulv.t(), h2);
  const auto db = dmulv.sum(0);
  dw_mu.copy_(dw.narrow(0, 0, dz));
  dw_lv.copy_(dw.narrow(0, dz, dz));
  db_mu.copy_(db.narrow(0, 0, dz));
  db_lv.copy_(db.narrow(0, dz, dz));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> vae_relu_router_bwd_cpu(
    const std::optional<Tensor>& grad_gates, const std::optional<Tensor>& grad_logits,
    const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& grad_z, const Tensor& h, const Tensor& w_mu,
    const Tensor& w_logvar, const Tensor& w_gate, const Tensor& mu_logvar, const Tensor& gates,
    const Tensor& logits, const std::optional<Tensor>& noise, const std::optional<Tensor>& rng,
    bool training, std::string_view activation) {
  const std::string act(activation);
  const auto sz = vr::check_backward(grad_gates, grad_logits, grad_kl, grad_z, h, w_mu, w_logvar, w_gate, mu_logvar,
                                     gates, logits, noise, rng, training, act);
  if (is_half(h)) {
    const auto dt = h.scalar_type();
    auto [dh, dw_mu, db_mu, dw_lv, db_lv, dw_gate, db_gate] = vae_relu_router_bwd_cpu(
        up(grad_gates), up(grad_logits), up(grad_kl), up(grad_z), up(h), up(w_mu), up(w_logvar), up(w_gate),
        up(mu_logvar), up(gates), up(logits), up(noise), rng, training, activation);
    return {dh.to(dt), dw_mu.to(dt), db_mu.to(dt), dw_lv.to(dt), db_lv.to(dt), dw_gate.to(dt), db_gate.to(dt)};
  }
  const int64_t N = sz.N, d = sz.d, dz = sz.dz, K = sz.K;
  const Eps mode = eps_mode(training, noise, rng);
  // Allocated by backward(), after its temporaries are freed; a meta placeholder carries the shape.
  auto dh = empty(h.sizes(), h.options().device(Device(DeviceType::Meta)));
  auto dw_mu = empty({dz, d}, h.options()), dw_lv = empty({dz, d}, h.options());
  auto db_mu = empty({dz}, h.options()), db_lv = empty({dz}, h.options());
  auto dw_gate = empty({K, dz}, h.options()), db_gate = empty({K}, h.options());
  if (N == 0) {
    for (auto* t : {&dw_mu, &dw_lv, &db_mu, &db_lv, &dw_gate, &db_gate}) t->zero_();
    dh = empty(h.sizes(), h.options());
    return {dh, dw_mu, db_mu, dw_lv, db_lv, dw_gate, db_gate};
  }
  const auto h2 = as_rows(h, N);
  const auto w_stack = cat({w_mu, w_logvar}, 0);
  const auto wg = w_gate.contiguous();
  const auto mulv2 = mu_logvar.reshape({N, 2 * dz}).contiguous();
  const auto gates2 = gates.reshape({N, K}).contiguous(), logits2 = logits.reshape({N, K}).contiguous();
  const auto gg = grad_gates.has_value() ? grad_gates->reshape({N, K}).contiguous() : Tensor();
  const auto gl = grad_logits.has_value() ? grad_logits->reshape({N, K}).contiguous() : Tensor();
  const auto gk = grad_kl.has_value() ? grad_kl->reshape({N}).contiguous() : Tensor();
  const auto gz = grad_z.has_value() ? grad_z->reshape({N, dz}) : Tensor();
  const auto noise2 = mode == Eps::kGiven ? noise->reshape({N, dz}).contiguous() : Tensor();
  const auto r = read_rng(rng);
  DOE_DISPATCH_FLOATING_TYPES(h.scalar_type(), "vae_relu_router_bwd_cpu", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    backward<scalar_t>(ptr(gg), ptr(gl), ptr(gk), gz, h2, w_stack, wg, mulv2, gates2, logits2, ptr(noise2), mode, r,
                       act == "relu", dh, dw_mu, db_mu, dw_lv, db_lv, dw_gate, db_gate);
  });
  return {dh, dw_mu, db_mu, dw_lv, db_lv, dw_gate, db_gate};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("vae_relu_router_fwd", TORCH_BOX(&vae_relu_router_fwd_cpu));
  m.impl("vae_relu_router_bwd", TORCH_BOX(&vae_relu_router_bwd_cpu));
}

}  // namespace doe_ext
