// Argument checks shared by every op. Each message names the op, the argument and what was
// expected, so a user can fix the call without reading the source.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace doe_ext {

inline std::string shape_str(at::IntArrayRef s) { return c10::str(s); }

// torch's spelling of a dtype ("float32", not ATen's "Float"), as users write it.
inline std::string dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(st);
  }
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": expected `", name, "` to be ", dim, "-D ", layout, ", got ",
              t.dim(), "-D tensor of shape ", shape_str(t.sizes()));
}

inline void check_min_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                          const char* layout) {
  TORCH_CHECK(t.dim() >= dim, op, ": expected `", name, "` to have at least ", dim,
              " dimension(s) ", layout, ", got shape ", shape_str(t.sizes()));
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                       const char* name, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": expected `", name, "`.shape[", dim, "] == ",
              expected, " (", what, "), got shape ", shape_str(t.sizes()));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected `", name, "` on ", ref.device(),
              " (the device of `", ref_name, "`), got ", t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected `", name, "` of dtype ",
              dtype_name(ref.scalar_type()), " (the dtype of `", ref_name, "`), got ",
              dtype_name(t.scalar_type()));
}

// The floating dtypes of the contract: float32/float64/float16/bfloat16 on the CPU (the half
// types in float32 math, see `up`); float32/float16/bfloat16 on CUDA.
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  const bool half = st == at::kHalf || st == at::kBFloat16;
  if (t.is_cuda()) {
    TORCH_CHECK(st == at::kFloat || half, op, ": expected `", name,
                "` of dtype float32, float16 or bfloat16 on CUDA, got ", dtype_name(st));
  } else {
    TORCH_CHECK(t.is_cpu(), op, ": expected `", name, "` on cpu or cuda, got ", t.device());
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || half, op, ": expected `", name,
                "` of dtype float32, float64, float16 or bfloat16 on cpu, got ", dtype_name(st));
  }
}

// float16 / bfloat16 on the CPU: after the checks (on the caller's tensors, so the messages name
// them), a kernel calls itself on float32 copies (`up`) and rounds its outputs once at the end, so
// every sum accumulates in float32, as on CUDA. Tensors of other dtypes pass through uncopied.
inline bool is_half(const at::Tensor& t) {
  return t.defined() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
}
inline at::Tensor up(const at::Tensor& t) { return is_half(t) ? t.to(at::kFloat) : t; }
inline std::optional<at::Tensor> up(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(up(*t)) : t;
}

inline void check_index(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": expected `", name, "` of dtype int64, got ",
              dtype_name(t.scalar_type()));
}

// A tensor's [..., d] as a 2-D [N, d] matrix with unit stride along d (a view when possible).
inline at::Tensor as_rows(const at::Tensor& t, int64_t N) {
  auto r = t.reshape({N, t.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

// The shape [..., last] from t's leading dims.
inline std::vector<int64_t> leading_with(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

}  // namespace doe_ext
