// CPU knowledge attention, forward and backward.
//
// Rows of q are processed in blocks of kBlockRows: the block's scores, probabilities, value
// product and residual add stay in cache, and only out (plus one log-sum-exp per row) is written.
// The GEMMs go through ATen (MKL/oneDNN); the row math is the shared host/device code of math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "doe_ext/knowledge_attention.h"
#include "doe_ext/math.h"

namespace doe_ext {
namespace {

constexpr int64_t kBlockRows = 128;

// q as a 2-D [N, dk] matrix with unit stride along dk (a view when possible, no copy).
at::Tensor as_rows(const at::Tensor& t, int64_t N) {
  auto r = t.reshape({N, t.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

template <typename T>
void forward_blocks(const at::Tensor& q2, const at::Tensor& zk, const at::Tensor& zv,
                    const at::Tensor& res2, at::Tensor& out2, at::Tensor& lse1, at::Tensor& probs2,
                    T scale) {
  const int64_t N = q2.size(0), K = zk.size(0);
  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;
  T* lse = lse1.data_ptr<T>();
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    auto s_buf = at::empty({kBlockRows, K}, q2.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlockRows, m = std::min(kBlockRows, N - r0);
      auto s = s_buf.narrow(0, 0, m);
      at::mm_out(s, q2.narrow(0, r0, m), zk.t());  // raw scores [m, K]
      T* sp = s.data_ptr<T>();
      for (int64_t i = 0; i < m; ++i) lse[r0 + i] = ka::softmax_row<T>(sp + i * K, K, scale);
      if (probs2.defined()) probs2.narrow(0, r0, m).copy_(s);
      auto o = out2.narrow(0, r0, m);
      if (res2.defined()) {
        o.copy_(res2.narrow(0, r0, m));
        at::addmm_out(o, o, s, zv);  // out = residual + P @ z_value
      } else {
        at::mm_out(o, s, zv);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knowledge_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& z_key, const at::Tensor& z_value,
    const std::optional<at::Tensor>& residual, double scale, bool return_probs) {
  const auto sz = check_knowledge_attention(q, z_key, z_value, residual);
  auto out = at::empty(leading_with(q, sz.dv), q.options());
  auto lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options());
  auto probs = return_probs ? at::empty(leading_with(q, sz.K), q.options()) : at::empty({0}, q.options());
  if (sz.N == 0) return {out, lse, probs};
  const auto q2 = as_rows(q, sz.N);
  const auto zk = z_key.contiguous(), zv = z_value.contiguous();
  const auto res2 = residual.has_value() ? as_rows(*residual, sz.N) : at::Tensor();
  auto out2 = out.view({sz.N, sz.dv});
  auto lse1 = lse.view({sz.N});
  auto probs2 = return_probs ? probs.view({sz.N, sz.K}) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knowledge_attention_fwd_cpu", [&] {
    forward_blocks<scalar_t>(q2, zk, zv, res2, out2, lse1, probs2, static_cast<scalar_t>(scale));
  });
  return {out, lse, probs};
}

// Backward. Per block: rebuild P from the saved log-sum-exp, dP = g @ z_value.T, dS by the softmax
// backward, dq = dS @ z_key. The weight gradients P.T @ g and dS.T @ q are summed per chunk of
// blocks (one chunk per thread, fixed split), then over chunks in order: deterministic for a given
// thread count.
template <typename T>
void backward_blocks(const at::Tensor& g2, const at::Tensor& q2, const at::Tensor& zk,
                     const at::Tensor& zv, const at::Tensor& lse1, at::Tensor& dq2,
                     at::Tensor& dzk_parts, at::Tensor& dzv_parts, T scale) {
  const int64_t N = q2.size(0), K = zk.size(0);
  const int64_t nblocks = (N + kBlockRows - 1) / kBlockRows;
  const int64_t nchunks = dzk_parts.size(0);
  const T* lse = lse1.data_ptr<T>();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    auto p_buf = at::empty({kBlockRows, K}, q2.options());
    auto dp_buf = at::empty({kBlockRows, K}, q2.options());
    for (int64_t c = c0; c < c1; ++c) {
      auto dzk = dzk_parts[c], dzv = dzv_parts[c];
      for (int64_t b = c * nblocks / nchunks; b < (c + 1) * nblocks / nchunks; ++b) {
        const int64_t r0 = b * kBlockRows, m = std::min(kBlockRows, N - r0);
        auto p = p_buf.narrow(0, 0, m), dp = dp_buf.narrow(0, 0, m);
        auto qb = q2.narrow(0, r0, m), gb = g2.narrow(0, r0, m);
        at::mm_out(p, qb, zk.t());
        T* pp = p.data_ptr<T>();
        T* dpp = dp.data_ptr<T>();
        for (int64_t i = 0; i < m; ++i) ka::probs_from_lse<T>(pp + i * K, K, scale, lse[r0 + i]);
        at::addmm_out(dzv, dzv, p.t(), gb);  // dz_value += P.T @ g
        at::mm_out(dp, gb, zv.t());          // dP = g @ z_value.T
        for (int64_t i = 0; i < m; ++i) ka::softmax_backward_row<T>(pp + i * K, dpp + i * K, K, scale);
        auto dqb = dq2.narrow(0, r0, m);
        at::mm_out(dqb, dp, zk);              // dq = dS @ z_key
        at::addmm_out(dzk, dzk, dp.t(), qb);  // dz_key += dS.T @ q
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knowledge_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& z_key,
    const at::Tensor& z_value, const at::Tensor& lse, double scale) {
  const auto sz = check_knowledge_attention(q, z_key, z_value, std::nullopt);
  TORCH_CHECK(grad_out.sizes().vec() == leading_with(q, sz.dv),
              "knowledge_attention_bwd: expected `grad_out` of shape [..., dv] matching the output, got ",
              shape_str(grad_out.sizes()));
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (sz.N == 0) return {dq, at::zeros_like(z_key), at::zeros_like(z_value)};
  const int64_t nblocks = (sz.N + kBlockRows - 1) / kBlockRows;
  const int64_t nchunks = std::min<int64_t>(at::get_num_threads(), nblocks);
  auto dzk_parts = at::zeros({nchunks, sz.K, sz.dk}, q.options());
  auto dzv_parts = at::zeros({nchunks, sz.K, sz.dv}, q.options());
  const auto q2 = as_rows(q, sz.N), g2 = as_rows(grad_out, sz.N);
  const auto zk = z_key.contiguous(), zv = z_value.contiguous();
  auto dq2 = dq.view({sz.N, sz.dk});
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "knowledge_attention_bwd_cpu", [&] {
    backward_blocks<scalar_t>(g2, q2, zk, zv, lse.reshape({sz.N}).contiguous(), dq2, dzk_parts,
                              dzv_parts, static_cast<scalar_t>(scale));
  });
  if (nchunks == 1) return {dq, dzk_parts[0], dzv_parts[0]};
  return {dq, dzk_parts.sum(0), dzv_parts.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("knowledge_attention_fwd", &knowledge_attention_fwd_cpu);
  m.impl("knowledge_attention_bwd", &knowledge_attention_bwd_cpu);
}

}  // namespace doe_ext
