// The tensor API of every kernel, on the LibTorch stable ABI (torch >= TORCH_TARGET_VERSION, 2.10).
//
// doe_ext::Tensor is a torch::stable::Tensor with the handful of ATen-style methods the kernels use
// (options(), view(), t(), sum(), ...), each a call through the stable C shim (the dispatcher's, or
// AOTInductor's for allocation and GEMMs). Nothing here includes ATen or c10, so the built library
// loads beside any torch from 2.10 on: one abi3 wheel, not one build per torch
// (pytorch/extension-cpp's stable example works the same way).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>
// addmm.out takes Scalars, which the stable dispatcher call cannot pass: AOTInductor's C shim
// (versioned, with the same guarantees) has it with double beta/alpha.
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#ifdef DOE_EXT_WITH_CUDA
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#endif
#ifdef __CUDACC__
#include <cuda_runtime.h>
#include <torch/csrc/stable/accelerator.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace doe_ext {

using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
constexpr ScalarType kFloat = ScalarType::Float, kDouble = ScalarType::Double, kHalf = ScalarType::Half,
                     kBFloat16 = ScalarType::BFloat16, kLong = ScalarType::Long, kInt = ScalarType::Int,
                     kShort = ScalarType::Short, kByte = ScalarType::Byte, kBool = ScalarType::Bool;

// Shapes print as "[2, 3]" and devices as torch writes them ("cuda:0", "cpu", "meta"), as c10::str did.
inline std::ostream& operator<<(std::ostream& out, IntArrayRef s) {
  out << "[";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  return out << "]";
}
inline std::ostream& operator<<(std::ostream& out, const Device& d) {
  switch (d.type()) {
    case DeviceType::CPU: return out << "cpu";
    case DeviceType::Meta: return out << "meta";
    case DeviceType::CUDA: return d.index() >= 0 ? out << "cuda:" << int(d.index()) : out << "cuda";
    default: return out << "device type " << int(d.type());
  }
}

// The message of a failed check: its parts streamed in order (c10::str's job, without c10).
template <typename... A>
std::string str(const A&... parts) {
  std::ostringstream out;
  ((out << parts), ...);
  return out.str();
}

// A failed check raises RuntimeError in Python with exactly this message (no file or line prefix:
// the message names the op and the argument).
#define DOE_CHECK(cond, ...)                                            \
  do {                                                                  \
    if (!(cond)) throw std::runtime_error(::doe_ext::str(__VA_ARGS__)); \
  } while (0)

inline std::string shape_str(IntArrayRef s) { return str(s); }
inline std::string device_str(const Device& d) { return str(d); }
inline bool is_cpu(const Device& d) { return d.type() == DeviceType::CPU; }
inline bool is_meta(const Device& d) { return d.type() == DeviceType::Meta; }

// "cpu", "meta", "cuda", "cuda:1": a FakeTensor's device as Python writes it.
inline Device parse_device(const std::string& s) {
  if (s == "cpu") return Device(DeviceType::CPU);
  if (s == "meta") return Device(DeviceType::Meta);
  if (s.rfind("cuda", 0) == 0) {
    const auto colon = s.find(':');
    return Device(DeviceType::CUDA, colon == std::string::npos ? 0 : std::stoi(s.substr(colon + 1)));
  }
  throw std::runtime_error("doe_ext: unknown device \"" + s + "\"");
}

// What a new tensor needs besides its shape (ATen's TensorOptions, reduced to dtype and device:
// every tensor a kernel allocates is strided and contiguous).
struct TensorOptions {
  ScalarType dtype_;
  Device device_;
  TensorOptions dtype(ScalarType st) const { return {st, device_}; }
  TensorOptions device(Device d) const { return {dtype_, d}; }
};

class Tensor;
Tensor empty(IntArrayRef sizes, const TensorOptions& opts);

class Tensor : public torch::stable::Tensor {
 public:
  using Base = torch::stable::Tensor;
  Tensor() = default;
  Tensor(Base t) : Base(std::move(t)) {}  // NOLINT: implicit, as every stable op returns a Base

  int64_t size(int64_t d) const { return Base::size(d < 0 ? d + dim() : d); }
  int64_t stride(int64_t d) const { return Base::stride(d < 0 ? d + dim() : d); }
  template <typename T>
  T* data_ptr() const { return mutable_data_ptr<T>(); }
  void* data_ptr() const { return Base::data_ptr(); }
  TensorOptions options() const { return {scalar_type(), device()}; }
  bool is_meta() const { return doe_ext::is_meta(device()); }
  bool is_floating_point() const {
    const auto st = scalar_type();
    return st == kFloat || st == kDouble || st == kHalf || st == kBFloat16;
  }

  Tensor view(IntArrayRef s) const { return torch::stable::view(*this, s); }
  Tensor reshape(IntArrayRef s) const { return torch::stable::reshape(*this, s); }
  Tensor transpose(int64_t a, int64_t b) const { return torch::stable::transpose(*this, a, b); }
  Tensor t() const { return transpose(0, 1); }
  Tensor narrow(int64_t d, int64_t start, int64_t length) const;
  Tensor unsqueeze(int64_t d) const { return torch::stable::unsqueeze(*this, d); }
  Tensor contiguous() const { return is_contiguous() ? *this : Tensor(torch::stable::contiguous(*this)); }
  Tensor clone() const { return empty(sizes(), options()).copy_(*this); }  // contiguous, as ATen's clone(Contiguous)
  Tensor to(ScalarType st) const { return st == scalar_type() ? *this : Tensor(torch::stable::to(*this, st)); }
  Tensor to(const Device& d) const { return torch::stable::to(*this, d); }
  Tensor cpu() const { return is_cpu() ? *this : Tensor(torch::stable::to(*this, Device(DeviceType::CPU))); }
  Tensor sum(std::vector<int64_t> dims) const { return torch::stable::sum(*this, IntArrayRef(dims)); }
  Tensor sum() const { return torch::stable::sum(*this); }
  Tensor sum(int64_t d) const { return sum(std::vector<int64_t>{d}); }
  Tensor sum(int64_t d, bool keepdim) const { return torch::stable::sum(*this, IntArrayRef({d}), keepdim); }
  void reset() { *this = Tensor(); }
  Tensor select(int64_t d, int64_t i) const;
  Tensor operator[](int64_t i) const { return select(0, i); }
  Tensor& exp_();
  Tensor operator-(const Tensor& other) const;
  Tensor& zero_() {
    torch::stable::zero_(*this);
    return *this;
  }
  Tensor& fill_(double v) {
    torch::stable::fill_(*this, v);
    return *this;
  }
  Tensor& copy_(const Tensor& src) {
    torch::stable::copy_(*this, src);
    return *this;
  }
  Tensor permute(std::vector<int64_t> dims) const;
  Tensor index_select(int64_t d, const Tensor& index) const;
  Tensor& index_copy_(int64_t d, const Tensor& index, const Tensor& src);
  Tensor& mul_(const Tensor& other);
  Tensor& mul_(double v);  // as ATen's mul_(Scalar): v in the tensor's dtype
  Tensor operator*(const Tensor& other) const;
  // One element of a one-element tensor, read on the CPU (a device sync on CUDA, as ATen's item()).
  template <typename T>
  T item() const {
    return *cpu().const_data_ptr<T>();
  }
};

// `op.overload(args...)` through the dispatcher; returns the stack, whose first entries are the
// op's outputs, each an owning handle the caller must take (or release with `discard`).
template <size_t Returns = 1, typename... A>
std::array<StableIValue, (sizeof...(A) > Returns ? sizeof...(A) : Returns)> dispatch(const char* op,
                                                                                     const char* overload,
                                                                                     const A&... args) {
  std::array<StableIValue, (sizeof...(A) > Returns ? sizeof...(A) : Returns)> stack{
      torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  return stack;
}
inline Tensor take(StableIValue v) { return torch::stable::detail::to<torch::stable::Tensor>(v); }
template <typename... A>
Tensor call(const char* op, const char* overload, const A&... args) {
  return take(dispatch(op, overload, args...)[0]);
}
// An out= or in-place op: its returned reference to `out` is released, `out` itself is returned.
template <typename... A>
Tensor& call_inplace(Tensor& out, const char* op, const char* overload, const A&... args) {
  take(dispatch(op, overload, args...)[0]);
  return out;
}

inline Tensor Tensor::permute(std::vector<int64_t> dims) const { return call("aten::permute", "", *this, dims); }
inline Tensor Tensor::index_select(int64_t d, const Tensor& index) const {
  return call("aten::index_select", "", *this, d, index);
}
inline Tensor& Tensor::index_copy_(int64_t d, const Tensor& index, const Tensor& src) {
  return call_inplace(*this, "aten::index_copy_", "", *this, d, index, src);
}
inline Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  return call("aten::narrow", "", *this, d, start, length);
}
inline Tensor Tensor::select(int64_t d, int64_t i) const { return call("aten::select", "int", *this, d, i); }
inline Tensor& Tensor::exp_() { return call_inplace(*this, "aten::exp_", "", *this); }
inline Tensor Tensor::operator-(const Tensor& other) const {
  return call("aten::sub", "Tensor", *this, other);  // alpha = 1 (a Scalar, so not passed: see addmm_out)
}
inline Tensor& Tensor::mul_(const Tensor& other) { return call_inplace(*this, "aten::mul_", "Tensor", *this, other); }
inline Tensor Tensor::operator*(const Tensor& other) const { return call("aten::mul", "Tensor", *this, other); }

// The hot allocation and GEMM go straight to AOTInductor's C shim (no boxed dispatcher call: a few
// microseconds less per op, which small calls such as a decode step's feel).
inline Tensor empty(IntArrayRef sizes, const TensorOptions& opts) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {  // contiguous, as ATen lays out a new tensor
    strides[i] = stride;
    stride *= std::max<int64_t>(sizes[i], 1);
  }
  using torch::stable::detail::from;
  using torch::stable::detail::to;
  AtenTensorHandle h = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), to<int32_t>(from(opts.dtype_)),
      to<int32_t>(from(opts.device_.type())), opts.device_.index(), &h));
  return torch::stable::Tensor(h);
}
inline Tensor zeros(IntArrayRef sizes, const TensorOptions& opts) { return empty(sizes, opts).zero_(); }
inline Tensor empty_like(const Tensor& t) { return empty(t.sizes(), t.options()); }  // contiguous
inline Tensor zeros_like(const Tensor& t) { return zeros(t.sizes(), t.options()); }
inline Tensor full(IntArrayRef sizes, double value, const TensorOptions& opts) {
  return empty(sizes, opts).fill_(value);
}
inline Tensor& Tensor::mul_(double v) { return mul_(full({}, v, options())); }

inline Tensor& mm_out(Tensor& out, const Tensor& a, const Tensor& b) {
#ifdef DOE_EXT_WITH_CUDA
  if (out.is_cuda()) {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_mm_out(out.get(), a.get(), b.get()));
    return out;
  }
#endif
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
  return out;
}
inline Tensor mm(const Tensor& a, const Tensor& b) {
  auto out = empty({a.size(0), b.size(1)}, a.options());
  return mm_out(out, a, b);
}
// out = self + a @ b (beta = alpha = 1).
inline Tensor& addmm_out(Tensor& out, const Tensor& self, const Tensor& a, const Tensor& b) {
#ifdef DOE_EXT_WITH_CUDA
  if (out.is_cuda()) {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(out.get(), self.get(), a.get(), b.get(), 1.0, 1.0));
    return out;
  }
#endif
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(out.get(), self.get(), a.get(), b.get(), 1.0, 1.0));
  return out;
}
inline Tensor addmm(const Tensor& self, const Tensor& a, const Tensor& b) {
  auto out = empty({a.size(0), b.size(1)}, self.options());
  return addmm_out(out, self, a, b);
}
inline Tensor& sum_out(Tensor& out, const Tensor& self, std::vector<int64_t> dims) {
  torch::stable::sum_out(out, self, IntArrayRef(dims));
  return out;
}
inline Tensor logsumexp(const Tensor& t, int64_t d) {
  return call("aten::logsumexp", "", t, std::vector<int64_t>{d}, false);
}
// (min, max) over all elements.
inline std::pair<Tensor, Tensor> aminmax(const Tensor& t) {
  auto stack = dispatch<2>("aten::aminmax", "", t, std::optional<int64_t>(), false);
  return {take(stack[0]), take(stack[1])};
}
// An int64 tensor of `values` on `device` (exact: fill_ takes a double, which int64 ids outgrow).
inline Tensor int64_tensor(const std::vector<int64_t>& values, const Device& device) {
  auto t = empty({static_cast<int64_t>(values.size())}, {kLong, Device(DeviceType::CPU)});
  std::copy(values.begin(), values.end(), t.data_ptr<int64_t>());
  return is_cpu(device) ? t : t.to(device);
}
inline Tensor cat(const std::vector<Tensor>& ts, int64_t d) {
  return call("aten::cat", "", std::vector<torch::stable::Tensor>(ts.begin(), ts.end()), d);
}
inline Tensor stack(const std::vector<Tensor>& ts, int64_t d) {
  return call("aten::stack", "", std::vector<torch::stable::Tensor>(ts.begin(), ts.end()), d);
}

inline int64_t multiply_integers(IntArrayRef s) {
  int64_t n = 1;
  for (const auto v : s) n *= v;
  return n;
}

// AT_DISPATCH_FLOATING_TYPES(_AND2(kHalf, kBFloat16)): `body` (a lambda) run with scalar_t set.
#define DOE_DISPATCH_CASE(st, type, ...) \
  case st: {                             \
    using scalar_t = type;               \
    __VA_ARGS__();                       \
    break;                               \
  }
#define DOE_DISPATCH_FLOATING_TYPES(st, name, ...)                                                       \
  switch (st) {                                                                                          \
    DOE_DISPATCH_CASE(::doe_ext::kFloat, float, __VA_ARGS__)                                              \
    DOE_DISPATCH_CASE(::doe_ext::kDouble, double, __VA_ARGS__)                                            \
    default: throw std::runtime_error(::doe_ext::str(name, ": unsupported dtype ", ::doe_ext::dtype_name(st))); \
  }
#define DOE_DISPATCH_FLOATING_AND_HALF_TYPES(st, name, ...)                                              \
  switch (st) {                                                                                          \
    DOE_DISPATCH_CASE(::doe_ext::kFloat, float, __VA_ARGS__)                                              \
    DOE_DISPATCH_CASE(::doe_ext::kDouble, double, __VA_ARGS__)                                            \
    DOE_DISPATCH_CASE(::doe_ext::kHalf, torch::headeronly::Half, __VA_ARGS__)                             \
    DOE_DISPATCH_CASE(::doe_ext::kBFloat16, torch::headeronly::BFloat16, __VA_ARGS__)                     \
    default: throw std::runtime_error(::doe_ext::str(name, ": unsupported dtype ", ::doe_ext::dtype_name(st))); \
  }

// torch's spelling of a dtype ("float32", not ATen's "Float"), as users write it.
inline std::string dtype_name(ScalarType st) {
  switch (st) {
    case kFloat: return "float32";
    case kDouble: return "float64";
    case kHalf: return "float16";
    case kBFloat16: return "bfloat16";
    case kLong: return "int64";
    case kInt: return "int32";
    case kShort: return "int16";
    case kByte: return "uint8";
    case kBool: return "bool";
    default: return torch::headeronly::toString(st);
  }
}

#ifdef __CUDACC__
// c10::cuda's guard, stream and launch checks, on the stable C shim.
class CUDAGuard {
 public:
  explicit CUDAGuard(const Device& d) : guard_(d.index()) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
};
inline cudaStream_t current_cuda_stream() {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(torch::stable::accelerator::getCurrentDeviceIndex(), &stream));
  return static_cast<cudaStream_t>(stream);
}
#define DOE_CUDA_CHECK(expr)                                                                            \
  do {                                                                                                  \
    const cudaError_t err_ = (expr);                                                                    \
    if (err_ != cudaSuccess)                                                                            \
      throw std::runtime_error(::doe_ext::str("CUDA error: ", cudaGetErrorString(err_), " (", #expr, ")")); \
  } while (0)
#define DOE_CUDA_KERNEL_LAUNCH_CHECK() DOE_CUDA_CHECK(cudaGetLastError())
#endif

}  // namespace doe_ext

// Kernels take and return doe_ext::Tensor; the boxing of STABLE_TORCH_LIBRARY_IMPL converts it as
// the torch::stable::Tensor it is.
HIDDEN_NAMESPACE_BEGIN(torch, stable, detail)
template <>
struct ToImpl<doe_ext::Tensor> {
  static doe_ext::Tensor call(StableIValue v, uint64_t version, bool internal) {
    return doe_ext::Tensor(ToImpl<torch::stable::Tensor>::call(v, version, internal));
  }
};
template <>
struct FromImpl<doe_ext::Tensor> {
  static StableIValue call(const doe_ext::Tensor& v, uint64_t version, bool internal) {
    return FromImpl<torch::stable::Tensor>::call(v, version, internal);
  }
};
HIDDEN_NAMESPACE_END(torch, stable, detail)
