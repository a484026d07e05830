// CPU decode_linear: x [M, in] @ weight.T (+ bias) for a few rows M, the weight streamed once.
//
// A decoding step runs every linear layer of the model on one token per sequence, and there ATen's
// GEMM (MKL sgemm with M = 1) reads the weights at ~10 GB/s, a third of this machine's read bandwidth
// (benchmarks/README.md, "Where the decode step goes"). Here each thread takes a block of the weight's
// rows and, for each row, forms its dot product with every input row while the row sits in L1: the
// weight is read from memory once, sequentially, at close to the bandwidth. More than
// kDecodeLinearMaxRows rows are a GEMM (compute, not bandwidth): ATen's.
#include "doe_ext/tensor.h"

#include "doe_ext/decode_linear.h"

namespace doe_ext {
namespace {

// The shared row math, compiled per ISA (float: the hot case; double: gradcheck).
DOE_CLONES void rows_f(const float* w, const float* x, const float* b, float* out, int64_t M, int64_t in, int64_t ld,
                       int64_t o0, int64_t o1) {
  dl::rows(w, x, b, out, M, in, ld, o0, o1);
}
void rows_f(const double* w, const double* x, const double* b, double* out, int64_t M, int64_t in, int64_t ld,
            int64_t o0, int64_t o1) {
  dl::rows(w, x, b, out, M, in, ld, o0, o1);
}

Tensor decode_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const auto sz = check_decode_linear(x, weight, bias);
  if (is_half(x)) return decode_linear_cpu(up(x), up(weight), up(bias)).to(x.scalar_type());
  auto out = empty({sz.M, sz.out}, x.options());
  if (sz.M == 0 || sz.out == 0) return out;  // (in == 0 needs nothing special: every dot product is 0)
  if (sz.M > kDecodeLinearMaxRows) {  // a GEMM, compute-bound: ATen's
    return bias.has_value() ? addmm_out(out, *bias, x, weight.t()) : mm_out(out, x, weight.t());
  }
  const auto xc = x.contiguous(), wc = weight.stride(1) == 1 ? weight : weight.contiguous();
  const auto bc = bias.has_value() ? bias->contiguous() : Tensor();
  const int64_t ldw = wc.stride(0);
  DOE_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_linear_cpu", [&] {
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    if (ldw == sz.in) {
      torch::stable::parallel_for(0, sz.out, 64, [&](int64_t o0, int64_t o1) {
        rows_f(wp, xp, bp, op, sz.M, sz.in, sz.out, o0, o1);
      });
    } else {  // rows of the weight further apart than `in` (a slice of a wider matrix): one row at a time
      torch::stable::parallel_for(0, sz.out, 64, [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o)
          rows_f(wp + o * ldw, xp, bp ? bp + o : nullptr, op + o, sz.M, sz.in, sz.out, 0, 1);
      });
    }
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("decode_linear", TORCH_BOX(&decode_linear_cpu));
}

}  // namespace doe_ext
