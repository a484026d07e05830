// dual_embedding: out = cat(token_weight[token_ids], topic_weight[topic_ids] or 0, -1)   (DoE §3.3)
// Shared by the CPU and CUDA backends: argument checks, the id-range error, and the row math
// (gather one token's row; reduce one run of sorted ids into a gradient row).
#pragma once

#include "doe_ext/tensor.h"

#include "doe_ext/checks.h"
#include "doe_ext/math.h"

namespace doe_ext {

struct DualEmbeddingSizes {
  int64_t N;   // tokens (elements of token_ids)
  int64_t V;   // rows of token_weight
  int64_t d;   // token embedding width
  int64_t K;   // rows of topic_weight
  int64_t dk;  // topic embedding width
};

inline DualEmbeddingSizes check_dual_embedding(const Tensor& token_ids, const Tensor& topic_ids,
                                               const Tensor& token_weight, const Tensor& topic_weight) {
  constexpr const char* op = "dual_embedding";
  check_given(op, {{"token_ids", &token_ids}, {"topic_ids", &topic_ids}, {"token_weight", &token_weight},
                   {"topic_weight", &topic_weight}});
  check_index(token_ids, op, "token_ids");
  check_index(topic_ids, op, "topic_ids");
  DOE_CHECK(topic_ids.sizes() == token_ids.sizes(), op, ": expected `topic_ids` of shape ",
            shape_str(token_ids.sizes()), " (the shape of `token_ids`), got ", shape_str(topic_ids.sizes()));
  check_dim(token_weight, 2, op, "token_weight", "[V, d]");
  check_dim(topic_weight, 2, op, "topic_weight", "[K, dk]");
  check_floating(token_weight, op, "token_weight");
  check_same_device(topic_weight, token_weight, op, "topic_weight", "token_weight");
  check_same_device(token_ids, token_weight, op, "token_ids", "token_weight");
  check_same_device(topic_ids, token_weight, op, "topic_ids", "token_weight");
  check_same_dtype(topic_weight, token_weight, op, "topic_weight", "token_weight");
  return {token_ids.numel(), token_weight.size(0), token_weight.size(1), topic_weight.size(0),
          topic_weight.size(1)};
}

inline void check_padding_idx(int64_t padding_idx, int64_t V) {
  DOE_CHECK(padding_idx == -1 || (padding_idx >= 0 && padding_idx < V),
            "dual_embedding: expected `padding_idx` of -1 (none) or in [0, ", V, ") (rows of `token_weight`), got ",
            padding_idx);
}

// The backward's arguments: the forward's, and grad_out [..., d + dk] of the tables' dtype.
inline DualEmbeddingSizes check_dual_embedding_bwd(const Tensor& grad_out, const Tensor& token_ids,
                                                   const Tensor& topic_ids, const Tensor& token_weight,
                                                   const Tensor& topic_weight, int64_t padding_idx) {
  check_given(grad_out, "dual_embedding_bwd", "grad_out");
  const auto sz = check_dual_embedding(token_ids, topic_ids, token_weight, topic_weight);
  check_padding_idx(padding_idx, sz.V);
  auto expected = token_ids.sizes().vec();
  expected.push_back(sz.d + sz.dk);
  DOE_CHECK(grad_out.sizes().vec() == expected, "dual_embedding_bwd: expected `grad_out` of shape ",
            IntArrayRef(expected), " ([..., d + dk]), got ", shape_str(grad_out.sizes()));
  check_same_device(grad_out, token_weight, "dual_embedding_bwd", "grad_out", "token_weight");
  check_same_dtype(grad_out, token_weight, "dual_embedding_bwd", "grad_out", "token_weight");
  return sz;
}

// The error for an id out of range, raised by both backends once the bad value is known.
[[noreturn]] inline void fail_dual_embedding_id(bool is_topic, int64_t position, int64_t value, int64_t rows) {
  if (is_topic) {
    DOE_CHECK(false, "dual_embedding: `topic_ids` out of range: got ", value, " at flat position ", position,
              ", expected -1 (no label) or 0 <= id < ", rows, " (rows of `topic_weight`)");
  }
  DOE_CHECK(false, "dual_embedding: `token_ids` out of range: got ", value, " at flat position ", position,
            ", expected 0 <= id < ", rows, " (rows of `token_weight`)");
}

namespace de {

DOE_HD bool token_id_ok(int64_t id, int64_t V) { return id >= 0 && id < V; }
DOE_HD bool topic_id_ok(int64_t id, int64_t K) { return id >= -1 && id < K; }

// dst[c] = src[c] (or 0 when src is null: an unlabeled topic), c in [c0, c1) with stride cs. The
// CPU calls it with (0, width, 1); a CUDA thread block with (threadIdx.x, width, blockDim.x).
template <typename T>
DOE_HD void copy_row(T* dst, const T* src, int64_t c0, int64_t width, int64_t cs) {
  if (src == nullptr) {
    for (int64_t c = c0; c < width; c += cs) dst[c] = T(0);
  } else {
    for (int64_t c = c0; c < width; c += cs) dst[c] = src[c];
  }
}

// dst[c] += src[c]: one token's gradient added to its table row (the CPU walks a run row by row,
// vectorised along c; per column this is the same sum, in the same order, as reduce_run_column).
template <typename T>
DOE_HD void add_row(T* dst, const T* src, int64_t width) {
  DOE_SIMD
  for (int64_t c = 0; c < width; ++c) dst[c] += src[c];
}

// Column c of one gradient row: the sum of grad_out[pos[i], col0 + c] over the run pos[0..n), in the
// order given (token order: the sort is stable), so the result is bitwise the same on every run.
template <typename acc_t, typename T>
DOE_HD acc_t reduce_run_column(const T* grad, int64_t ld, int64_t col, const int64_t* pos, int64_t n) {
  acc_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<acc_t>(grad[pos[i] * ld + col]);
  return acc;
}

}  // namespace de
}  // namespace doe_ext
