// knowledge_attention: out = residual + softmax(q @ z_key.T * scale) @ z_value   (DoE eq. 1-3)
// Shared by the CPU and CUDA backends: argument checks and the flattened problem size.
#pragma once

#include "doe_ext/tensor.h"

#include <optional>

#include "doe_ext/checks.h"

namespace doe_ext {

struct KnowledgeAttentionSizes {
  int64_t N;   // tokens (product of q's leading dims)
  int64_t dk;  // query/key width
  int64_t dv;  // value width
  int64_t K;   // knowledge blocks
};

inline KnowledgeAttentionSizes check_knowledge_attention(const Tensor& q, const Tensor& z_key,
                                                         const Tensor& z_value,
                                                         const std::optional<Tensor>& residual) {
  constexpr const char* op = "knowledge_attention";
  check_given(op, {{"q", &q}, {"z_key", &z_key}, {"z_value", &z_value}});
  check_min_dim(q, 1, op, "q", "[..., dk]");
  check_dim(z_key, 2, op, "z_key", "[K, dk]");
  check_dim(z_value, 2, op, "z_value", "[K, dv]");
  check_floating(q, op, "q");
  check_same_device(z_key, q, op, "z_key", "q");
  check_same_device(z_value, q, op, "z_value", "q");
  check_same_dtype(z_key, q, op, "z_key", "q");
  check_same_dtype(z_value, q, op, "z_value", "q");
  const int64_t dk = q.size(-1);
  check_size(z_key, 1, dk, op, "z_key", "dk, the last dim of q");
  DOE_CHECK(z_key.size(0) >= 1, op, ": expected `z_key` to hold at least one knowledge block (K >= 1), got shape ",
            shape_str(z_key.sizes()));
  check_size(z_value, 0, z_key.size(0), op, "z_value", "K, the first dim of z_key");
  const int64_t dv = z_value.size(1);
  if (residual.has_value()) {
    const auto& r = *residual;
    check_same_device(r, q, op, "residual", "q");
    check_same_dtype(r, q, op, "residual", "q");
    auto expected = q.sizes().vec();
    expected.back() = dv;
    DOE_CHECK(r.sizes().vec() == expected, op, ": expected `residual` of shape ", IntArrayRef(expected),
              " ([..., dv] with q's leading dims), got ", shape_str(r.sizes()));
  }
  const int64_t N = multiply_integers(q.sizes().slice(0, q.dim() - 1));
  return {N, dk, dv, z_key.size(0)};
}

// knowledge_attention_bwd: the forward's checks, then grad_out [..., dv], lse [...] (float32; float64
// for float64 q) and probs (empty, or [..., K]) against q, as the forward wrote them.
inline KnowledgeAttentionSizes check_knowledge_attention_bwd(const Tensor& grad_out, const Tensor& q,
                                                             const Tensor& z_key, const Tensor& z_value,
                                                             const Tensor& lse, const Tensor& probs) {
  constexpr const char* op = "knowledge_attention_bwd";
  check_given(op, {{"grad_out", &grad_out}, {"q", &q}, {"z_key", &z_key}, {"z_value", &z_value}, {"lse", &lse},
                   {"probs", &probs}});
  const auto sz = check_knowledge_attention(q, z_key, z_value, std::nullopt);
  const auto lead = q.sizes().slice(0, q.dim() - 1);
  auto with_last = [&](int64_t last) {
    auto s = q.sizes().vec();
    s.back() = last;
    return s;
  };
  check_same_device(grad_out, q, op, "grad_out", "q");
  check_same_dtype(grad_out, q, op, "grad_out", "q");
  DOE_CHECK(grad_out.sizes().vec() == with_last(sz.dv), op, ": expected `grad_out` of shape ",
            IntArrayRef(with_last(sz.dv)), " ([..., dv], the output's), got ", shape_str(grad_out.sizes()));
  check_same_device(lse, q, op, "lse", "q");
  const auto lse_type = q.scalar_type() == kDouble ? kDouble : kFloat;
  DOE_CHECK(lse.scalar_type() == lse_type, op, ": expected `lse` of dtype ", dtype_name(lse_type),
            " (the forward's log-sum-exp), got ", dtype_name(lse.scalar_type()));
  DOE_CHECK(lse.sizes() == lead, op, ": expected `lse` of shape ", shape_str(lead),
            " (q's leading dims: one per row), got ", shape_str(lse.sizes()));
  check_same_device(probs, q, op, "probs", "q");  // also when empty: the forward allocates it on q's device
  if (probs.numel() > 0 || probs.dim() > 1) {
    check_same_dtype(probs, q, op, "probs", "q");
    DOE_CHECK(probs.sizes().vec() == with_last(sz.K), op, ": expected `probs` empty or of shape ",
              IntArrayRef(with_last(sz.K)), " ([..., K]), got ", shape_str(probs.sizes()));
  }
  return sz;
}

}  // namespace doe_ext
