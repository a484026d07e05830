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

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CUDA, m) {
  m.impl("decode_linear", TORCH_BOX(&decode_linear_cuda));
}

}  // namespace doe_ext
