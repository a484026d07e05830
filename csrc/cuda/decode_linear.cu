// CUDA decode_linear: cuBLAS's GEMM (a GEMV for one row) already streams the weight on a GPU, so the
// op is addmm / mm there; it exists on CUDA so that code calling it needs no device switch.
#include "doe_ext/tensor.h"

#include "doe_ext/decode_linear.h"

namespace doe_ext {
namespace {

Tensor decode_linear_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_decode_linear(x, weight, bias);
  const CUDAGuard guard(x.device());
  return bias.has_value() ? addmm(bias->unsqueeze(0), x, weight.t()) : mm(x, weight.t());
}

// The lean decoding step's ops have a CPU kernel only. On CUDA their own checks run, so the call is
// refused naming the CUDA argument (not with the dispatcher's "could not run ... 'CUDA' backend").
[[noreturn]] void no_cuda_kernel(const char* op) {
  throw std::runtime_error(str(op, ": no CUDA kernel (the lean decoding step runs on the CPU)"));
}
std::tuple<Tensor, Tensor, Tensor> lean_qkv_cuda(const Tensor& h, const Tensor& norm_weight, double, const Tensor& wq,
                                                 const std::optional<Tensor>& bq, const Tensor& wk,
                                                 const std::optional<Tensor>& bk, const Tensor& wv,
                                                 const std::optional<Tensor>& bv, const Tensor& cos, const Tensor& sin) {
  check_lean_qkv(h, norm_weight, wq, bq, wk, bk, wv, bv, cos, sin);
  no_cuda_kernel("lean_qkv");
}
Tensor lean_attention_cuda(const Tensor& h, const Tensor& q, const Tensor& k, const Tensor& v,
                           const std::optional<Tensor>& mask, double, const Tensor& wo, const std::optional<Tensor>& bo) {
  check_lean_attention(h, q, k, v, mask, wo, bo);
  no_cuda_kernel("lean_attention");
}
Tensor lean_mlp_cuda(const Tensor& h, const Tensor& norm_weight, double, const Tensor& w_gate,
                     const std::optional<Tensor>& b_gate, const Tensor& w_up, const std::optional<Tensor>& b_up,
                     const Tensor& w_down, const std::optional<Tensor>& b_down) {
  check_lean_mlp(h, norm_weight, w_gate, b_gate, w_up, b_up, w_down, b_down);
  no_cuda_kernel("lean_mlp");
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CUDA, m) {
  m.impl("decode_linear", TORCH_BOX(&decode_linear_cuda));
  m.impl("lean_qkv", TORCH_BOX(&lean_qkv_cuda));
  m.impl("lean_attention", TORCH_BOX(&lean_attention_cuda));
  m.impl("lean_mlp", TORCH_BOX(&lean_mlp_cuda));
}

}  // namespace doe_ext
