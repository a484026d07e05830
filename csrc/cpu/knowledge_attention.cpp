// CPU knowledge attention, forward and backward.
//
// Six GEMMs (two forward, four backward) over whole matrices through ATen (MKL), and every
// elementwise step fused into one vectorised pass per row: the row math is the shared host/device
// code of math.h. Whole-matrix GEMMs beat row blocks that stay in cache here: the GEMMs are ~80%
// of the time and MKL loses more on small blocks than the blocks save in traffic (measured, see
// benchmarks/README.md). Deterministic for a given thread count.
#include "doe_ext/tensor.h"

#include "doe_ext/knowledge_attention.h"
#include "doe_ext/math.h"

namespace doe_ext {
namespace {

// The shared row math, compiled per ISA; float is the hot case, double is for gradcheck.
DOE_CLONES float softmax_row(float* s, int64_t K, float scale) { return ka::softmax_row(s, K, scale); }
DOE_CLONES void probs_from_lse(float* s, int64_t K, float scale, float lse) { ka::probs_from_lse(s, K, scale, lse); }
DOE_CLONES void softmax_backward_row(const float* p, float* dp, int64_t K, float scale) {
  ka::softmax_backward_row(p, dp, K, scale);
}
double softmax_row(double* s, int64_t K, double scale) { return ka::softmax_row(s, K, scale); }
void probs_from_lse(double* s, int64_t K, double scale, double lse) { ka::probs_from_lse(s, K, scale, lse); }
void softmax_backward_row(const double* p, double* dp, int64_t K, double scale) {
  ka::softmax_backward_row(p, dp, K, scale);
}

// Forward: S = q @ z_key.T (one GEMM), the scaled softmax and log-sum-exp in one vectorised pass per
// row (in place, straight into probs when they are kept), then out = residual + P @ z_value (one
// GEMM whose beta=1 does the residual add).
template <typename T>
void forward(const Tensor& q2, const Tensor& zk, const Tensor& zv, const Tensor& res2,
             Tensor& out2, Tensor& lse1, Tensor& probs2, T scale) {
  const int64_t N = q2.size(0), K = zk.size(0);
  auto s = probs2.defined() ? probs2 : empty({N, K}, q2.options());
  mm_out(s, q2, zk.t());
  T* sp = s.data_ptr<T>();
  T* lse = lse1.data_ptr<T>();
  torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) lse[i] = softmax_row(sp + i * K, K, scale);
  });
  if (res2.defined()) {
    addmm_out(out2, res2, s, zv);
  } else {
    mm_out(out2, s, zv);
  }
}

// Backward: P (kept by the forward, or rebuilt from lse), dz_value = P.T @ g, dP = g @ z_value.T,
// the softmax backward (with the scale) in one pass per row, dq = dS @ z_key, dz_key = dS.T @ q.
template <typename T>
void backward(const Tensor& g2, const Tensor& q2, const Tensor& zk, const Tensor& zv,
              const Tensor& lse1, const Tensor& probs2, Tensor& dq2, Tensor& dzk,
              Tensor& dzv, T scale) {
  const int64_t N = q2.size(0), K = zk.size(0);
  Tensor p = probs2;
  if (!p.defined()) {
    p = mm(q2, zk.t());
    T* pp = p.data_ptr<T>();
    const T* lse = lse1.data_ptr<T>();
    torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) probs_from_lse(pp + i * K, K, scale, lse[i]);
    });
  }
  mm_out(dzv, p.t(), g2);
  auto dp = mm(g2, zv.t());
  const T* pp = p.data_ptr<T>();
  T* dpp = dp.data_ptr<T>();
  torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) softmax_backward_row(pp + i * K, dpp + i * K, K, scale);
  });
  mm_out(dq2, dp, zk);
  mm_out(dzk, dp.t(), q2);
}

std::tuple<Tensor, Tensor, Tensor> knowledge_attention_fwd_cpu(
    const Tensor& q, const Tensor& z_key, const Tensor& z_value,
    const std::optional<Tensor>& residual, double scale, bool return_probs) {
  const auto sz = check_knowledge_attention(q, z_key, z_value, residual);
  if (is_half(q)) {  // float32 math; lse stays float32, as on CUDA
    auto [out, lse, probs] = knowledge_attention_fwd_cpu(up(q), up(z_key), up(z_value), up(residual), scale, return_probs);
    return {out.to(q.scalar_type()), lse, probs.to(q.scalar_type())};
  }
  auto out = empty(leading_with(q, sz.dv), q.options());
  auto lse = empty(q.sizes().slice(0, q.dim() - 1), q.options());
  auto probs = return_probs ? empty(leading_with(q, sz.K), q.options()) : empty({0}, q.options());
  if (sz.N == 0) return {out, lse, probs};
  const auto q2 = as_rows(q, sz.N);
  const auto zk = z_key.contiguous(), zv = z_value.contiguous();
  const auto res2 = residual.has_value() ? as_rows(*residual, sz.N) : Tensor();
  auto out2 = out.view({sz.N, sz.dv});
  auto lse1 = lse.view({sz.N});
  auto probs2 = return_probs ? probs.view({sz.N, sz.K}) : Tensor();
  DOE_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knowledge_attention_fwd_cpu", [&] {
    forward<scalar_t>(q2, zk, zv, res2, out2, lse1, probs2, static_cast<scalar_t>(scale));
  });
  return {out, lse, probs};
}

std::tuple<Tensor, Tensor, Tensor> knowledge_attention_bwd_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& z_key,
    const Tensor& z_value, const Tensor& lse, const Tensor& probs, double scale) {
  const auto sz = check_knowledge_attention_bwd(grad_out, q, z_key, z_value, lse, probs);
  if (is_half(q)) {
    const auto dt = q.scalar_type();
    auto [dq, dzk, dzv] = knowledge_attention_bwd_cpu(up(grad_out), up(q), up(z_key), up(z_value), lse, up(probs), scale);
    return {dq.to(dt), dzk.to(dt), dzv.to(dt)};
  }
  auto dq = empty(q.sizes(), q.options());
  if (sz.N == 0) return {dq, zeros_like(z_key), zeros_like(z_value)};
  const auto q2 = as_rows(q, sz.N), g2 = as_rows(grad_out, sz.N);
  const auto zk = z_key.contiguous(), zv = z_value.contiguous();
  auto dq2 = dq.view({sz.N, sz.dk});
  const auto probs2 = probs.numel() > 0 ? as_rows(probs, sz.N).contiguous() : Tensor();
  if (probs2.defined()) check_size(probs2, 1, sz.K, "knowledge_attention_bwd", "probs", "K");
  auto dzk = empty_like(zk), dzv = empty_like(zv);
  DOE_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knowledge_attention_bwd_cpu", [&] {
    backward<scalar_t>(g2, q2, zk, zv, lse.reshape({sz.N}).contiguous(), probs2, dq2, dzk, dzv,
                       static_cast<scalar_t>(scale));
  });
  return {dq, dzk, dzv};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("knowledge_attention_fwd", TORCH_BOX(&knowledge_attention_fwd_cpu));
  m.impl("knowledge_attention_bwd", TORCH_BOX(&knowledge_attention_bwd_cpu));
}

}  // namespace doe_ext
