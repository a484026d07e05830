// Argument checks shared by every op. Each message names the op, the argument and what was
// expected, so a user can fix the call without reading the source.
#pragma once

#include "doe_ext/tensor.h"

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace doe_ext {

// A Python None passed for a tensor argument reaches a kernel as an undefined tensor: refused by name.
inline void check_given(const Tensor& t, const char* op, const char* name) {
  DOE_CHECK(t.defined(), op, ": expected `", name, "` to be a Tensor, got None");
}

// Every required tensor argument of an op given, checked in schema order before anything else, so
// the first None is the one named whatever the other arguments are.
inline void check_given(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> args) {
  for (const auto& [name, t] : args) check_given(*t, op, name);
}

inline void check_dim(const Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  check_given(t, op, name);
  DOE_CHECK(t.dim() == dim, op, ": expected `", name, "` to be ", dim, "-D ", layout, ", got ",
            t.dim(), "-D tensor of shape ", shape_str(t.sizes()));
}

inline void check_min_dim(const Tensor& t, int64_t dim, const char* op, const char* name,
                          const char* layout) {
  check_given(t, op, name);
  DOE_CHECK(t.dim() >= dim, op, ": expected `", name, "` to have at least ", dim,
            " dimension(s) ", layout, ", got shape ", shape_str(t.sizes()));
}

inline void check_size(const Tensor& t, int64_t dim, int64_t expected, const char* op,
                       const char* name, const char* what) {
  DOE_CHECK(t.size(dim) == expected, op, ": expected `", name, "`.shape[", dim, "] == ",
            expected, " (", what, "), got shape ", shape_str(t.sizes()));
}

// The device a tensor stands for: its own, except while doe_ext::_check_<op> runs an op's checks for its
// fake kernel on meta stand-ins of FakeTensors (torch_bindings.cpp): each stand-in then reports its
// FakeTensor's device, so torch.compile and eager reject the same calls with the same messages.
struct DeviceStandIn {
  AtenTensorHandle handle;  // shared by every copy of a stable Tensor
  Device device;
};
inline std::vector<DeviceStandIn>& device_stand_ins() {
  static thread_local std::vector<DeviceStandIn> stand_ins;
  return stand_ins;
}
inline Device stand_in_device(const Tensor& t) {
  for (const auto& s : device_stand_ins())
    if (s.handle == t.get()) return s.device;
  return t.device();
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  check_given(t, op, name);
  check_given(ref, op, ref_name);
  DOE_CHECK(stand_in_device(t) == stand_in_device(ref), op, ": expected `", name, "` on ", stand_in_device(ref),
            " (the device of `", ref_name, "`), got ", stand_in_device(t));
}

inline void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  check_given(t, op, name);
  check_given(ref, op, ref_name);
  DOE_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected `", name, "` of dtype ",
            dtype_name(ref.scalar_type()), " (the dtype of `", ref_name, "`), got ",
            dtype_name(t.scalar_type()));
}

// The floating dtypes of the contract: float32/float64/float16/bfloat16 on the CPU (the half
// types in float32 math, see `up`); float32/float16/bfloat16 on CUDA; any of them on the meta device
// (shape inference for a model built there).
inline void check_floating(const Tensor& t, const char* op, const char* name) {
  check_given(t, op, name);
  const auto st = t.scalar_type();
  const bool half = st == kHalf || st == kBFloat16;
  const auto dev = stand_in_device(t);
  if (dev.is_cuda()) {
    DOE_CHECK(st == kFloat || half, op, ": expected `", name,
              "` of dtype float32, float16 or bfloat16 on CUDA, got ", dtype_name(st));
  } else {
    DOE_CHECK(is_cpu(dev) || is_meta(dev), op, ": expected `", name, "` on cpu or cuda, got ", device_str(dev));
    DOE_CHECK(st == kFloat || st == kDouble || half, op, ": expected `", name,
              "` of dtype float32, float64, float16 or bfloat16 on ", is_cpu(dev) ? "cpu" : "meta", ", got ",
              dtype_name(st));
  }
}

// float16 / bfloat16 on the CPU: after the checks (on the caller's tensors, so the messages name
// them), a kernel calls itself on float32 copies (`up`) and rounds its outputs once at the end, so
// every sum accumulates in float32, as on CUDA. Tensors of other dtypes pass through uncopied.
inline bool is_half(const Tensor& t) {
  return t.defined() && (t.scalar_type() == kHalf || t.scalar_type() == kBFloat16);
}
inline Tensor up(const Tensor& t) { return is_half(t) ? t.to(kFloat) : t; }
inline std::optional<Tensor> up(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(up(*t)) : t;
}

// A linear layer's weight [out, in] and bias [out] (None: no bias) for x [..., in], as `op` names them.
inline void check_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const char* op) {
  check_dim(weight, 2, op, "weight", "[out, in]");
  check_same_device(weight, x, op, "weight", "x");
  check_same_dtype(weight, x, op, "weight", "x");
  check_size(weight, 1, x.size(-1), op, "weight", "in, the last dim of x");
  if (bias.has_value()) {
    check_dim(*bias, 1, op, "bias", "[out]");
    check_same_device(*bias, x, op, "bias", "x");
    check_same_dtype(*bias, x, op, "bias", "x");
    check_size(*bias, 0, weight.size(0), op, "bias", "out, the first dim of weight");
  }
}

inline void check_index(const Tensor& t, const char* op, const char* name) {
  check_given(t, op, name);
  DOE_CHECK(t.scalar_type() == kLong, op, ": expected `", name, "` of dtype int64, got ",
            dtype_name(t.scalar_type()));
}

// The first element of the int64 CPU tensor `ids` (row-major order, positions below `limit`) whose
// value `bad` rejects: its flat position (-1: none) and value. Read by stride, never copied: a bad
// id in an expanded or strided index tensor is found before anything of its size is allocated.
struct BadId {
  int64_t position = -1, value = 0;
};
template <typename F>
BadId first_bad_id(const Tensor& ids, F bad, int64_t limit = std::numeric_limits<int64_t>::max()) {
  const int64_t n = std::min(ids.numel(), limit);
  if (n == 0) return {};
  const int64_t* p = ids.const_data_ptr<int64_t>();
  if (ids.is_contiguous()) {
    for (int64_t i = 0; i < n; ++i)
      if (bad(p[i])) return {i, p[i]};
    return {};
  }
  const auto sizes = ids.sizes(), strides = ids.strides();
  std::vector<int64_t> idx(sizes.size(), 0);
  int64_t off = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (bad(p[off])) return {i, p[off]};
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {  // the next index, odometer-style
      if (++idx[d] < sizes[d]) {
        off += strides[d];
        break;
      }
      off -= strides[d] * (sizes[d] - 1);
      idx[d] = 0;
    }
  }
  return {};
}

// A tensor's [..., d] as a 2-D [N, d] matrix with unit stride along d (a view when possible).
inline Tensor as_rows(const Tensor& t, int64_t N) {
  auto r = t.reshape({N, t.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

// The shape [..., last] from t's leading dims.
inline std::vector<int64_t> leading_with(const Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

}  // namespace doe_ext
