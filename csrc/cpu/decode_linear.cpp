// CPU decode_linear: x [M, in] @ weight.T (+ bias) for a few rows M, the weight streamed once.
//
// A decoding step runs every linear layer of the model on one token per sequence, and there ATen's
// GEMM (MKL sgemm with M = 1) reads the weights at ~10 GB/s, a third of this machine's read bandwidth
// (benchmarks/README.md, "Where the decode step goes"). Here each thread takes a block of the weight's
// rows and forms their dot products with every input row while the rows sit in L1: the weight is read
// from memory once, at close to the bandwidth (at 1-3 input rows, four weight rows per pass from four
// quarters of the block: four streams; dl::rows). More than kDecodeLinearMaxRows rows are a GEMM
// (compute, not bandwidth): ATen's.
#include "doe_ext/tensor.h"

#include "doe_ext/decode_linear.h"

#include <cmath>
#include <initializer_list>
#include <tuple>
#include <vector>

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

// ---- The lean decoding step: a Llama decoder layer for one new token per sequence, in three ops ----
//
// At batch 1 a decoding step through transformers' modules (or through doe_ext.nn.LeanDecoder's ATen ops)
// makes ~40 small ATen calls per layer, each a few microseconds of dispatch around a few hundred
// flops, and the linear layers' GEMVs one parallel region each. These ops do a layer's norms, rotary
// embedding, attention over the cache and gated MLP in plain loops, and the GEMVs of q/k/v (and of
// gate/up) in one parallel region. Sums run in another order than ATen's: outputs agree with the
// ATen ops to float rounding (tests/ops/test_lean_ops.py). float16/bfloat16 run in float32.

// Rows of x [M, in] (contiguous) times several weights, in one parallel region: segment s writes
// out [M, rows] = x @ w.T + b (+ add, a residual [M, rows]).
template <typename T>
struct Segment {
  const T* w;
  const T* b;
  T* out;
  int64_t rows;
  const T* add;
};

template <typename T>
void gemv_segments(std::initializer_list<Segment<T>> segs, const T* x, int64_t M, int64_t in) {
  int64_t total = 0;
  for (const auto& s : segs) total += s.rows;
  torch::stable::parallel_for(0, total, 64, [&](int64_t o0, int64_t o1) {
    int64_t off = 0;
    for (const auto& s : segs) {
      const int64_t lo = std::max(o0, off) - off, hi = std::min(o1, off + s.rows) - off;
      off += s.rows;
      if (lo >= hi) continue;
      rows_f(s.w, x, s.b, s.out, M, in, s.rows, lo, hi);
      if (s.add != nullptr)
        for (int64_t m = 0; m < M; ++m)
          for (int64_t o = lo; o < hi; ++o) s.out[m * s.rows + o] += s.add[m * s.rows + o];
    }
  });
}

// transformers' LlamaRMSNorm on each row: w * (x * rsqrt(mean(x^2) + eps)).
template <typename T>
void rms_rows(const T* h, const T* w, T eps, T* out, int64_t M, int64_t d) {
  for (int64_t m = 0; m < M; ++m) {
    const T* x = h + m * d;
    T ss = 0;
    DOE_SIMD_REDUCE(+, ss)
    for (int64_t c = 0; c < d; ++c) ss += x[c] * x[c];
    const T r = T(1) / std::sqrt(ss / T(d) + eps);
    for (int64_t c = 0; c < d; ++c) out[m * d + c] = w[c] * (x[c] * r);
  }
}

// q * cos + rotate_half(q) * sin for each head [D] of one row, in place.
template <typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t hh = 0; hh < heads; ++hh, x += D)
    for (int64_t j = 0; j < half; ++j) {
      const T a = x[j], b = x[j + half];
      x[j] = a * cos[j] + -b * sin[j];
      x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

template <typename T>
const T* ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}
std::optional<Tensor> contiguous(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(t->contiguous()) : t;
}

std::tuple<Tensor, Tensor, Tensor> lean_qkv_cpu(const Tensor& h_, const Tensor& norm_weight, double eps,
                                                const Tensor& wq_, const std::optional<Tensor>& bq_,
                                                const Tensor& wk_, const std::optional<Tensor>& bk_,
                                                const Tensor& wv_, const std::optional<Tensor>& bv_,
                                                const Tensor& cos_, const Tensor& sin_) {
  const auto sz = check_lean_qkv(h_, norm_weight, wq_, bq_, wk_, bk_, wv_, bv_, cos_, sin_);
  if (is_half(h_)) {
    auto [q, k, v] = lean_qkv_cpu(up(h_), up(norm_weight), eps, up(wq_), up(bq_), up(wk_), up(bk_), up(wv_), up(bv_),
                                  up(cos_), up(sin_));
    const auto st = h_.scalar_type();
    return {q.to(st), k.to(st), v.to(st)};
  }
  auto q = empty({sz.R, sz.H, 1, sz.D}, h_.options()), k = empty({sz.R, sz.G, 1, sz.D}, h_.options()),
       v = empty({sz.R, sz.G, 1, sz.D}, h_.options());
  if (sz.R == 0) return {q, k, v};
  const auto h = h_.contiguous(), nw = norm_weight.contiguous(), wq = wq_.contiguous(), wk = wk_.contiguous(),
             wv = wv_.contiguous(), cos = cos_.contiguous(), sin = sin_.contiguous();
  const auto bq = contiguous(bq_), bk = contiguous(bk_), bv = contiguous(bv_);
  DOE_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lean_qkv", [&] {
    using T = scalar_t;
    std::vector<T> x(sz.R * sz.d);
    rms_rows(h.const_data_ptr<T>(), nw.const_data_ptr<T>(), static_cast<T>(eps), x.data(), sz.R, sz.d);
    T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>();
    gemv_segments<T>({{wq.const_data_ptr<T>(), ptr<T>(bq), qp, sz.H * sz.D, nullptr},
                      {wk.const_data_ptr<T>(), ptr<T>(bk), kp, sz.G * sz.D, nullptr},
                      {wv.const_data_ptr<T>(), ptr<T>(bv), v.data_ptr<T>(), sz.G * sz.D, nullptr}},
                     x.data(), sz.R, sz.d);
    const T *cp = cos.const_data_ptr<T>(), *sp = sin.const_data_ptr<T>();
    for (int64_t r = 0; r < sz.R; ++r) {
      rotate(qp + r * sz.H * sz.D, cp + r * sz.D, sp + r * sz.D, sz.H, sz.D);
      rotate(kp + r * sz.G * sz.D, cp + r * sz.D, sp + r * sz.D, sz.G, sz.D);
    }
  });
  return {q, k, v};
}

Tensor lean_attention_cpu(const Tensor& h_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
                          const std::optional<Tensor>& mask_, double scale, const Tensor& wo_,
                          const std::optional<Tensor>& bo_) {
  const auto sz = check_lean_attention(h_, q_, k_, v_, mask_, wo_, bo_);
  if (is_half(h_))
    return lean_attention_cpu(up(h_), up(q_), up(k_), up(v_), mask_, scale, up(wo_), up(bo_)).to(h_.scalar_type());
  auto out = empty({sz.R, sz.d}, h_.options());
  if (sz.R == 0) return out;
  const int64_t T_ = k_.size(2), H = sz.H, D = sz.D, groups = sz.H / sz.G;
  // The cache's keys and values may be views of a longer buffer: any strides but a unit last one.
  const auto h = h_.contiguous(), q = q_.contiguous(), wo = wo_.contiguous();
  const auto k = k_.stride(3) == 1 ? k_ : k_.contiguous(), v = v_.stride(3) == 1 ? v_ : v_.contiguous();
  const auto bo = contiguous(bo_);
  const bool* mp = mask_.has_value() ? static_cast<const bool*>(mask_->data_ptr()) : nullptr;
  const int64_t ms0 = mp ? mask_->stride(0) : 0, ms1 = mp ? mask_->stride(1) : 0;
  DOE_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lean_attention", [&] {
    using T = scalar_t;
    std::vector<T> o(sz.R * H * D, T(0)), scores(sz.R * H * T_);
    const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
    const T sc = static_cast<T>(scale);
    const int64_t k0 = k.stride(0), k1 = k.stride(1), k2 = k.stride(2), v0 = v.stride(0), v1 = v.stride(1),
                  v2 = v.stride(2);  // (read once: each stride() is a call through the stable ABI)
    // ~2^16 multiply-adds per chunk of heads: a step's few heads over a short cache run inline (a parallel
    // region costs more than they do), long caches and large batches split
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 2 * T_ * D));
    torch::stable::parallel_for(0, sz.R * H, grain, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {  // a = r * H + head
        const int64_t r = a / H, g = (a % H) / groups;
        const T* qa = qp + a * D;
        const T* kr = kp + r * k0 + g * k1;
        const T* vr = vp + r * v0 + g * v1;
        T* s = scores.data() + a * T_;
        T mx = -INFINITY;
        for (int64_t t = 0; t < T_; ++t) {
          if (mp != nullptr && !mp[r * ms0 + t * ms1]) {
            s[t] = -INFINITY;
            continue;
          }
          const T* kt = kr + t * k2;
          T dot = 0;
          DOE_SIMD_REDUCE(+, dot)
          for (int64_t c = 0; c < D; ++c) dot += qa[c] * kt[c];
          s[t] = dot * sc;
          mx = std::max(mx, s[t]);
        }
        T sum = 0;
        T* oa = o.data() + a * D;
        for (int64_t t = 0; t < T_; ++t) {
          const T p = std::exp(s[t] - mx);  // exp(-inf) = 0: a masked position adds nothing
          sum += p;
          const T* vt = vr + t * v2;
          DOE_SIMD
          for (int64_t c = 0; c < D; ++c) oa[c] += p * vt[c];
        }
        for (int64_t c = 0; c < D; ++c) oa[c] /= sum;
      }
    });
    gemv_segments<T>({{wo.const_data_ptr<T>(), ptr<T>(bo), out.data_ptr<T>(), sz.d, h.const_data_ptr<T>()}},
                     o.data(), sz.R, H * D);
  });
  return out;
}

Tensor lean_mlp_cpu(const Tensor& h_, const Tensor& norm_weight, double eps, const Tensor& w_gate_,
                    const std::optional<Tensor>& b_gate_, const Tensor& w_up_, const std::optional<Tensor>& b_up_,
                    const Tensor& w_down_, const std::optional<Tensor>& b_down_) {
  const auto sz = check_lean_mlp(h_, norm_weight, w_gate_, b_gate_, w_up_, b_up_, w_down_, b_down_);
  if (is_half(h_))
    return lean_mlp_cpu(up(h_), up(norm_weight), eps, up(w_gate_), up(b_gate_), up(w_up_), up(b_up_), up(w_down_),
                        up(b_down_))
        .to(h_.scalar_type());
  auto out = empty({sz.R, sz.d}, h_.options());
  if (sz.R == 0) return out;
  const auto h = h_.contiguous(), nw = norm_weight.contiguous(), wg = w_gate_.contiguous(), wu = w_up_.contiguous(),
             wd = w_down_.contiguous();
  const auto bg = contiguous(b_gate_), bu = contiguous(b_up_), bd = contiguous(b_down_);
  DOE_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lean_mlp", [&] {
    using T = scalar_t;
    std::vector<T> x(sz.R * sz.d), gate(sz.R * sz.I), up(sz.R * sz.I);
    const T* hp = h.const_data_ptr<T>();
    rms_rows(hp, nw.const_data_ptr<T>(), static_cast<T>(eps), x.data(), sz.R, sz.d);
    gemv_segments<T>({{wg.const_data_ptr<T>(), ptr<T>(bg), gate.data(), sz.I, nullptr},
                      {wu.const_data_ptr<T>(), ptr<T>(bu), up.data(), sz.I, nullptr}},
                     x.data(), sz.R, sz.d);
    for (int64_t i = 0; i < sz.R * sz.I; ++i) gate[i] = gate[i] / (T(1) + std::exp(-gate[i])) * up[i];  // silu(g) * u
    gemv_segments<T>({{wd.const_data_ptr<T>(), ptr<T>(bd), out.data_ptr<T>(), sz.d, hp}}, gate.data(), sz.R, sz.I);
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("decode_linear", TORCH_BOX(&decode_linear_cpu));
  m.impl("lean_qkv", TORCH_BOX(&lean_qkv_cpu));
  m.impl("lean_attention", TORCH_BOX(&lean_attention_cpu));
  m.impl("lean_mlp", TORCH_BOX(&lean_mlp_cpu));
}

}  // namespace doe_ext
