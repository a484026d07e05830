// LoRA experts (DMoE §3.2, eq. 6; PEFT's layout A [r, in], B [out, r], delta = s * B @ A).
// Shared by the CPU and CUDA backends: argument checks, lora_merge (one GEMM with beta = 1: a
// single pass over W, the same ATen code on both devices), and the row math of multi_lora_linear.
#pragma once

#include "doe_ext/tensor.h"

#include <string>

#include "doe_ext/checks.h"
#include "doe_ext/math.h"

namespace doe_ext {

// lora_a [E, r, in], lora_b [E, out, r] (a bank of E experts of rank r) for a weight [out, in].
inline void check_lora_bank(const Tensor& lora_a, const Tensor& lora_b, const Tensor& ref,
                            const char* ref_name, int64_t out_features, int64_t in_features, const char* op) {
  check_dim(lora_a, 3, op, "lora_a", "[E, r, in]");
  check_dim(lora_b, 3, op, "lora_b", "[E, out, r]");
  check_same_device(lora_a, ref, op, "lora_a", ref_name);
  check_same_device(lora_b, ref, op, "lora_b", ref_name);
  check_same_dtype(lora_a, ref, op, "lora_a", ref_name);
  check_same_dtype(lora_b, ref, op, "lora_b", ref_name);
  check_size(lora_b, 0, lora_a.size(0), op, "lora_b", "E, the experts of lora_a");
  check_size(lora_b, 2, lora_a.size(1), op, "lora_b", "r, the rank of lora_a");
  const std::string in_what = std::string("in, the input features of ") + ref_name;
  const std::string out_what = std::string("out, the output features of ") + ref_name;
  check_size(lora_a, 2, in_features, op, "lora_a", in_what.c_str());
  check_size(lora_b, 1, out_features, op, "lora_b", out_what.c_str());
}

// weight_name: "weight" (the merges) or "grad_out" (the backward, whose [out, in] must match the bank's).
inline void check_lora_merge(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                             const Tensor& scales, const char* op, const char* weight_name = "weight") {
  check_given(op, {{weight_name, &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b}, {"scales", &scales}});
  check_dim(weight, 2, op, weight_name, "[out, in]");
  check_floating(weight, op, weight_name);
  if (std::string(weight_name) == "grad_out" && lora_a.dim() == 3 && lora_b.dim() == 3) {
    DOE_CHECK(weight.size(0) == lora_b.size(1) && weight.size(1) == lora_a.size(2), op,
              ": expected `grad_out` of shape [out, in] = [", lora_b.size(1), ", ", lora_a.size(2),
              "] (lora_b's out, lora_a's in), got ", shape_str(weight.sizes()));
  }
  check_lora_bank(lora_a, lora_b, weight, weight_name, weight.size(0), weight.size(1), op);
  check_dim(scales, 1, op, "scales", "[E]");
  check_same_device(scales, weight, op, "scales", weight_name);
  check_same_dtype(scales, weight, op, "scales", weight_name);
  check_size(scales, 0, lora_a.size(0), op, "scales", "E, the experts of lora_a");
}

// ATen's has_internal_overlap == MemOverlap::Yes: some dim of more than one element has stride 0
// (an expanded tensor), so two of its elements share memory.
inline bool has_internal_overlap(const Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) == 0) return true;
  return false;
}

// lora_merge_ writes into weight: the merge's checks, then no overlapping memory (as torch's own in-place ops).
inline void check_lora_merge_inplace(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                                     const Tensor& scales) {
  check_lora_merge(weight, lora_a, lora_b, scales, "lora_merge_");
  DOE_CHECK(!has_internal_overlap(weight), "lora_merge_: `weight` has overlapping memory "
              "(an expanded tensor?), so an in-place merge would write some of its elements more than once; merge "
              "into weight.clone(), or call lora_merge");
}

// C [out, E*r] with C[o, e*r + q] = scales[e] * lora_b[e, o, q], so that
// sum_e scales[e] * lora_b[e] @ lora_a[e] = C @ lora_a.view(E*r, in): the merge is one GEMM of
// inner size E*r over W (beta = 1), which reads and writes W once.
inline Tensor lora_merge_coefficients(const Tensor& lora_b, const Tensor& scales) {
  const int64_t E = lora_b.size(0), out = lora_b.size(1), r = lora_b.size(2);
  return (lora_b * scales.view({E, 1, 1})).permute({1, 0, 2}).reshape({out, E * r});
}

inline Tensor lora_merge_impl(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                              const Tensor& scales) {
  check_lora_merge(weight, lora_a, lora_b, scales, "lora_merge");
  const int64_t E = lora_a.size(0), r = lora_a.size(1), in = lora_a.size(2);
  if (E * r == 0) return weight.clone();
  return addmm(weight, lora_merge_coefficients(lora_b, scales), lora_a.reshape({E * r, in}));
}

inline void lora_merge_inplace_impl(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                                    const Tensor& scales) {
  check_lora_merge_inplace(weight, lora_a, lora_b, scales);
  const int64_t E = lora_a.size(0), r = lora_a.size(1), in = lora_a.size(2);
  if (E * r == 0 || weight.numel() == 0) return;
  addmm_out(weight, weight, lora_merge_coefficients(lora_b, scales), lora_a.reshape({E * r, in}));
}

// With M = B_e^T G [r, in] per expert (one GEMM over all experts):
// d lora_a[e] = s_e M_e, d scales[e] = <M_e, A_e>, d lora_b[e] = s_e G A_e^T (a second GEMM).
inline std::tuple<Tensor, Tensor, Tensor> lora_merge_bwd_impl(const Tensor& grad_out,
                                                              const Tensor& lora_a,
                                                              const Tensor& lora_b,
                                                              const Tensor& scales) {
  check_lora_merge(grad_out, lora_a, lora_b, scales, "lora_merge_bwd", "grad_out");
  const int64_t E = lora_a.size(0), r = lora_a.size(1), in = lora_a.size(2), out = lora_b.size(1);
  if (E * r == 0) return {zeros_like(lora_a), zeros_like(lora_b), zeros_like(scales)};
  const auto a2 = lora_a.reshape({E * r, in});
  const auto s3 = scales.view({E, 1, 1});
  const auto m = mm(lora_b.permute({0, 2, 1}).reshape({E * r, out}), grad_out).view({E, r, in});
  auto grad_scales = (m * lora_a).sum({1, 2});
  auto grad_a = m * s3;
  auto grad_b = mm(grad_out, a2.t()).view({out, E, r}).permute({1, 0, 2}) * s3;
  return {grad_a, grad_b.contiguous(), grad_scales};
}

// multi_lora_linear: x [T, in], weight [out, in], bias [out]?, bank lora_a [N, r, in] /
// lora_b [N, out, r], indices int64 [T, k] (-1: empty slot), scales [T, k].
struct MultiLoraSizes {
  int64_t T, in, out, N, r, k;
};

inline MultiLoraSizes check_multi_lora_linear(const Tensor& x, const Tensor& weight,
                                              const std::optional<Tensor>& bias, const Tensor& lora_a,
                                              const Tensor& lora_b, const Tensor& indices,
                                              const Tensor& scales) {
  constexpr const char* op = "multi_lora_linear";
  check_given(op, {{"x", &x}, {"weight", &weight}, {"lora_a", &lora_a}, {"lora_b", &lora_b}, {"indices", &indices},
                   {"scales", &scales}});
  check_dim(x, 2, op, "x", "[T, in]");
  check_floating(x, op, "x");
  check_linear(x, weight, bias, op);
  check_lora_bank(lora_a, lora_b, x, "x", weight.size(0), x.size(1), op);
  check_index(indices, op, "indices");
  check_dim(indices, 2, op, "indices", "[T, k]");
  check_same_device(indices, x, op, "indices", "x");
  check_size(indices, 0, x.size(0), op, "indices", "T, the tokens of x");
  check_dim(scales, 2, op, "scales", "[T, k]");
  check_same_device(scales, x, op, "scales", "x");
  check_same_dtype(scales, x, op, "scales", "x");
  DOE_CHECK(scales.sizes() == indices.sizes(), op, ": expected `scales` of shape ", shape_str(indices.sizes()),
            " (the shape of `indices`), got ", shape_str(scales.sizes()));
  return {x.size(0), x.size(1), weight.size(0), lora_a.size(0), lora_a.size(1), indices.size(1)};
}

// The backward's extra arguments: grad_out [T, out] and the forward's xa [T, k, r].
inline MultiLoraSizes check_multi_lora_linear_bwd(const Tensor& grad_out, const Tensor& x,
                                                  const Tensor& weight, const Tensor& lora_a,
                                                  const Tensor& lora_b, const Tensor& indices,
                                                  const Tensor& scales, const Tensor& xa) {
  check_given("multi_lora_linear_bwd", {{"grad_out", &grad_out}, {"x", &x}, {"weight", &weight}, {"lora_a", &lora_a},
                                        {"lora_b", &lora_b}, {"indices", &indices}, {"scales", &scales}, {"xa", &xa}});
  const auto sz = check_multi_lora_linear(x, weight, std::nullopt, lora_a, lora_b, indices, scales);
  DOE_CHECK(grad_out.sizes() == IntArrayRef({sz.T, sz.out}), "multi_lora_linear_bwd: expected `grad_out` of shape [",
            sz.T, ", ", sz.out, "], got ", shape_str(grad_out.sizes()));
  DOE_CHECK(xa.sizes() == IntArrayRef({sz.T, sz.k, sz.r}), "multi_lora_linear_bwd: expected `xa` of shape [",
            sz.T, ", ", sz.k, ", ", sz.r, "], got ", shape_str(xa.sizes()));
  check_same_device(grad_out, x, "multi_lora_linear_bwd", "grad_out", "x");
  check_same_dtype(grad_out, x, "multi_lora_linear_bwd", "grad_out", "x");
  check_same_device(xa, x, "multi_lora_linear_bwd", "xa", "x");
  const bool half = x.scalar_type() == kHalf || x.scalar_type() == kBFloat16;
  const auto xa_type = half ? kFloat : x.scalar_type();  // the forward keeps xa in float32 for half x
  DOE_CHECK(xa.scalar_type() == xa_type, "multi_lora_linear_bwd: expected `xa` of dtype ", dtype_name(xa_type),
            " (the forward's, for `x` of dtype ", dtype_name(x.scalar_type()), "), got ", dtype_name(xa.scalar_type()));
  return sz;
}

[[noreturn]] inline void fail_multi_lora_index(int64_t t, int64_t j, int64_t value, int64_t N) {
  DOE_CHECK(false, "multi_lora_linear: `indices` out of range: got ", value, " at [", t, ", ", j,
            "], expected -1 (empty slot) or 0 <= i < ", N, " (experts in `lora_a`/`lora_b`)");
}

namespace lora {

DOE_HD bool index_ok(int64_t i, int64_t N) { return i >= -1 && i < N; }

// sum_c a[c] * b[c] over c = c0, c0 + cs, ... < width (CPU: (0, width, 1), vectorised; a CUDA lane:
// (lane, width, 32), then a warp reduction).
template <typename acc_t, typename T>
DOE_HD acc_t dot(const T* a, const T* b, int64_t c0, int64_t width, int64_t cs) {
  acc_t acc = 0;
  DOE_SIMD_REDUCE(+, acc)
  for (int64_t c = c0; c < width; c += cs) acc += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return acc;
}

// y[c] += a * x[c], c in [0, n): the CPU's low-rank row updates, one per rank component.
template <typename T>
DOE_HD void axpy(T* y, T a, const T* x, int64_t n) {
  DOE_SIMD
  for (int64_t c = 0; c < n; ++c) y[c] += a * x[c];
}

// sum_q coef[q] * m[q * ld + c]: column c of coef^T @ m for one expert's [r, width] matrix m.
template <typename acc_t, typename T>
DOE_HD acc_t lowrank_column(const acc_t* coef, const T* m, int64_t r, int64_t ld, int64_t c) {
  acc_t acc = 0;
  for (int64_t q = 0; q < r; ++q) acc += coef[q] * static_cast<acc_t>(m[q * ld + c]);
  return acc;
}

}  // namespace lora
}  // namespace doe_ext
