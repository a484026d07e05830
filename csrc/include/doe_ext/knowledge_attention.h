// knowledge_attention: out = residual + softmax(q @ z_key.T * scale) @ z_value   (DoE eq. 1-3)
// Shared by the CPU and CUDA backends: argument checks and the flattened problem size.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

#include <optional>

#include "doe_ext/checks.h"

namespace doe_ext {

struct KnowledgeAttentionSizes {
  int64_t N;   // tokens (product of q's leading dims)
  int64_t dk;  // query/key width
  int64_t dv;  // value width
  int64_t K;   // knowledge blocks
};

inline KnowledgeAttentionSizes check_knowledge_attention(const at::Tensor& q, const at::Tensor& z_key,
                                                         const at::Tensor& z_value,
                                                         const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "knowledge_attention";
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
  TORCH_CHECK(z_key.size(0) >= 1, op, ": expected `z_key` to hold at least one knowledge block (K >= 1), got shape ",
              shape_str(z_key.sizes()));
  check_size(z_value, 0, z_key.size(0), op, "z_value", "K, the first dim of z_key");
  const int64_t dv = z_value.size(1);
  if (residual.has_value()) {
    const auto& r = *residual;
    check_same_device(r, q, op, "residual", "q");
    check_same_dtype(r, q, op, "residual", "q");
    auto expected = q.sizes().vec();
    expected.back() = dv;
    TORCH_CHECK(r.sizes().vec() == expected, op, ": expected `residual` of shape ", c10::IntArrayRef(expected),
                " ([..., dv] with q's leading dims), got ", shape_str(r.sizes()));
  }
  const int64_t N = c10::multiply_integers(q.sizes().slice(0, q.dim() - 1));
  return {N, dk, dv, z_key.size(0)};
}

}  // namespace doe_ext
