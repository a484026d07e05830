// decode_linear: out = x @ weight.T + bias for a few rows of x (a decoding step's tokens), reading
// weight once. Shared by the CPU and CUDA backends: argument checks and the row math.
#pragma once

#include <optional>

#include "doe_ext/checks.h"
#include "doe_ext/decode_linear_rows.h"
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

// The lean decoding step (csrc/cpu/decode_linear.cpp): a Llama decoder layer for one new token per
// sequence, in three CPU ops, each one call where transformers' modules make dozens. Dtypes as the CPU
// kernels of the contract (float16/bfloat16 in float32); no CUDA kernel (a GPU decodes with CUDA graphs).
inline void check_lean_dtype(const Tensor& t, const char* op, const char* name) {
  check_floating(t, op, name);
  DOE_CHECK(!stand_in_device(t).is_cuda(), op, ": expected `", name, "` on cpu (this op has no CUDA kernel), got ",
            device_str(stand_in_device(t)));
}

// `t` (None allowed when optional) on the device and of the dtype of `ref`, with the sizes `shape`
// (described by `layout`, e.g. "[out, in]").
inline void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                       std::vector<int64_t> shape, const char* layout, const char* op) {
  check_given(t, op, name);
  DOE_CHECK(t.dim() == static_cast<int64_t>(shape.size()) &&
                std::equal(shape.begin(), shape.end(), t.sizes().begin()),
            op, ": expected `", name, "` of shape ", shape_str(IntArrayRef(shape)), " ", layout, ", got shape ",
            shape_str(t.sizes()));
  check_same_device(t, ref, op, name, ref_name);
  check_same_dtype(t, ref, op, name, ref_name);
}
inline void check_like(const std::optional<Tensor>& t, const char* name, const Tensor& ref, const char* ref_name,
                       std::vector<int64_t> shape, const char* layout, const char* op) {
  if (t.has_value()) check_like(*t, name, ref, ref_name, std::move(shape), layout, op);
}

// A linear layer's weight `w` [out, in] (`in` = the width of `h`); returns out.
inline int64_t check_lean_weight(const Tensor& h, const Tensor& w, const char* name, int64_t in, const char* op) {
  check_dim(w, 2, op, name, "[out, in]");
  check_like(w, name, h, "h", {w.size(0), in}, "[out, in]", op);
  return w.size(0);
}

struct LeanSizes {
  int64_t R, d, H, G, D, I;  // rows, width, heads, kv heads, head_dim, MLP width (0 where an op has none)
};

inline LeanSizes check_lean_qkv(const Tensor& h, const Tensor& norm_weight, const Tensor& wq,
                                const std::optional<Tensor>& bq, const Tensor& wk, const std::optional<Tensor>& bk,
                                const Tensor& wv, const std::optional<Tensor>& bv, const Tensor& cos,
                                const Tensor& sin) {
  constexpr const char* op = "lean_qkv";
  check_given(op, {{"h", &h}, {"norm_weight", &norm_weight}, {"wq", &wq}, {"wk", &wk}, {"wv", &wv}, {"cos", &cos},
                   {"sin", &sin}});
  check_dim(h, 2, op, "h", "[R, d]");
  check_lean_dtype(h, op, "h");
  const int64_t R = h.size(0), d = h.size(1);
  check_like(norm_weight, "norm_weight", h, "h", {d}, "[d]", op);
  check_dim(cos, 2, op, "cos", "[R, head_dim]");
  const int64_t D = cos.size(1);
  DOE_CHECK(D > 0 && D % 2 == 0, op, ": expected `cos`.shape[1] (head_dim) even and positive, got shape ",
            shape_str(cos.sizes()));
  check_like(cos, "cos", h, "h", {R, D}, "[R, head_dim]", op);
  check_like(sin, "sin", h, "h", {R, D}, "[R, head_dim]", op);
  const int64_t q_out = check_lean_weight(h, wq, "wq", d, op);
  DOE_CHECK(q_out % D == 0 && q_out > 0, op, ": expected `wq`.shape[0] a positive multiple of head_dim ", D,
            " (`cos`.shape[1]), got shape ", shape_str(wq.sizes()));
  check_like(bq, "bq", h, "h", {q_out}, "[out]", op);
  const int64_t kv_out = check_lean_weight(h, wk, "wk", d, op);
  DOE_CHECK(kv_out % D == 0 && kv_out > 0, op, ": expected `wk`.shape[0] a positive multiple of head_dim ", D,
            " (`cos`.shape[1]), got shape ", shape_str(wk.sizes()));
  check_like(bk, "bk", h, "h", {kv_out}, "[out]", op);
  check_like(wv, "wv", h, "h", {kv_out, d}, "[out, in] (the shape of wk)", op);
  check_like(bv, "bv", h, "h", {kv_out}, "[out]", op);
  return {R, d, q_out / D, kv_out / D, D, 0};
}

inline LeanSizes check_lean_attention(const Tensor& h, const Tensor& q, const Tensor& k, const Tensor& v,
                                      const std::optional<Tensor>& mask, const Tensor& wo,
                                      const std::optional<Tensor>& bo) {
  constexpr const char* op = "lean_attention";
  check_given(op, {{"h", &h}, {"q", &q}, {"k", &k}, {"v", &v}, {"wo", &wo}});
  check_dim(h, 2, op, "h", "[R, d]");
  check_lean_dtype(h, op, "h");
  const int64_t R = h.size(0), d = h.size(1);
  check_dim(q, 4, op, "q", "[R, heads, 1, head_dim]");
  check_dim(k, 4, op, "k", "[R, kv_heads, T, head_dim]");
  const int64_t H = q.size(1), D = q.size(3), G = k.size(1), T = k.size(2);
  check_like(q, "q", h, "h", {R, H, 1, D}, "[R, heads, 1, head_dim]", op);
  check_like(k, "k", h, "h", {R, G, T, D}, "[R, kv_heads, T, head_dim]", op);
  check_like(v, "v", h, "h", {R, G, T, D}, "[R, kv_heads, T, head_dim] (the shape of k)", op);
  DOE_CHECK(G > 0 && H % G == 0, op, ": expected `q`.shape[1] (heads, ", H, ") a multiple of `k`.shape[1] (kv_heads, ",
            G, ")");
  if (mask.has_value()) {
    check_dim(*mask, 2, op, "mask", "[R, T]");
    DOE_CHECK(mask->scalar_type() == kBool, op, ": expected `mask` of dtype bool, got ",
              dtype_name(mask->scalar_type()));
    check_same_device(*mask, h, op, "mask", "h");
    DOE_CHECK(mask->size(0) == R && mask->size(1) == T, op, ": expected `mask` of shape [", R, ", ", T,
              "] [R, T] (T: `k`.shape[2]), got shape ", shape_str(mask->sizes()));
  }
  check_like(wo, "wo", h, "h", {d, H * D}, "[d, heads * head_dim]", op);
  check_like(bo, "bo", h, "h", {d}, "[d]", op);
  return {R, d, H, G, D, 0};
}

inline LeanSizes check_lean_mlp(const Tensor& h, const Tensor& norm_weight, const Tensor& w_gate,
                                const std::optional<Tensor>& b_gate, const Tensor& w_up,
                                const std::optional<Tensor>& b_up, const Tensor& w_down,
                                const std::optional<Tensor>& b_down) {
  constexpr const char* op = "lean_mlp";
  check_given(op, {{"h", &h}, {"norm_weight", &norm_weight}, {"w_gate", &w_gate}, {"w_up", &w_up},
                   {"w_down", &w_down}});
  check_dim(h, 2, op, "h", "[R, d]");
  check_lean_dtype(h, op, "h");
  const int64_t R = h.size(0), d = h.size(1);
  check_like(norm_weight, "norm_weight", h, "h", {d}, "[d]", op);
  const int64_t I = check_lean_weight(h, w_gate, "w_gate", d, op);
  check_like(b_gate, "b_gate", h, "h", {I}, "[out]", op);
  check_like(w_up, "w_up", h, "h", {I, d}, "[out, in] (the shape of w_gate)", op);
  check_like(b_up, "b_up", h, "h", {I}, "[out]", op);
  check_like(w_down, "w_down", h, "h", {d, I}, "[d, intermediate] (intermediate: `w_gate`.shape[0])", op);
  check_like(b_down, "b_down", h, "h", {d}, "[d]", op);
  return {R, d, 0, 0, 0, I};
}

}  // namespace doe_ext
