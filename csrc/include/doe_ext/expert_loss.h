// expert_loss (DoE eq. 4, App. A.5): argument checks and the row math shared by the CPU and CUDA
// backends. Each row's loss and its gradient w.r.t. the logits come out of one pass over the row.
#pragma once

#include "doe_ext/tensor.h"

#include <string>

#include "doe_ext/checks.h"
#include "doe_ext/math.h"
#include "doe_ext/poly_math.h"

namespace doe_ext {

struct ExpertLossSizes {
  int64_t N;  // rows (product of logits' leading dims)
  int64_t K;  // classes (knowledge blocks)
  bool hard;  // int64 labels (else a float distribution per row)
};

// expert_loss_bwd: grad_loss is the loss's gradient, a scalar or one per row (reduction="none"), in
// grad_rows' dtype and device; weight is the forward's scalar row factor.
inline void check_expert_loss_bwd(const Tensor& grad_loss, const Tensor& grad_rows, const Tensor& weight) {
  constexpr const char* op = "expert_loss_bwd";
  check_given(op, {{"grad_loss", &grad_loss}, {"grad_rows", &grad_rows}, {"weight", &weight}});
  DOE_CHECK(grad_rows.numel() > 0 || grad_rows.dim() > 1, op,
            ": `grad_rows` is empty: the forward ran with keep_grad=False");
  check_min_dim(grad_rows, 1, op, "grad_rows", "[..., K]");
  check_floating(grad_rows, op, "grad_rows");
  const auto lead = grad_rows.sizes().slice(0, grad_rows.dim() - 1);
  DOE_CHECK(grad_loss.dim() == 0 || grad_loss.sizes() == lead, op, ": expected `grad_loss` of shape [] or ",
            shape_str(lead), " (the loss: a scalar, or one per row with reduction='none'), got ",
            shape_str(grad_loss.sizes()));
  check_same_device(grad_loss, grad_rows, op, "grad_loss", "grad_rows");
  check_same_dtype(grad_loss, grad_rows, op, "grad_loss", "grad_rows");
  DOE_CHECK(weight.dim() == 0, op, ": expected `weight` of shape [] (the reduction's row factor), got ",
            shape_str(weight.sizes()));
  check_same_device(weight, grad_rows, op, "weight", "grad_rows");
  check_same_dtype(weight, grad_rows, op, "weight", "grad_rows");
}

inline ExpertLossSizes check_expert_loss(const Tensor& logits, const Tensor& target,
                                         const std::string& reduction, double label_smoothing) {
  constexpr const char* op = "expert_loss";
  check_given(op, {{"logits", &logits}, {"target", &target}});
  check_min_dim(logits, 1, op, "logits", "[..., K]");
  check_floating(logits, op, "logits");
  check_same_device(target, logits, op, "target", "logits");
  DOE_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
            ": expected `reduction` to be \"mean\", \"sum\" or \"none\", got \"", reduction, "\"");
  DOE_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
            ": expected `label_smoothing` in [0, 1], got ", label_smoothing);
  const int64_t K = logits.size(-1);
  DOE_CHECK(K >= 1, op, ": expected `logits` to have at least one class (K >= 1), got shape ",
            shape_str(logits.sizes()));
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  const bool hard = !target.is_floating_point();
  if (hard) {
    check_index(target, op, "target");
    DOE_CHECK(target.sizes() == lead, op, ": expected int64 `target` of shape ", shape_str(lead),
              " (logits' leading dims), got ", shape_str(target.sizes()));
  } else {
    check_same_dtype(target, logits, op, "target", "logits");
    DOE_CHECK(target.sizes() == logits.sizes(), op, ": expected float `target` of shape ",
              shape_str(logits.sizes()), " (a distribution over K per row, like logits), got ",
              shape_str(target.sizes()));
  }
  return {multiply_integers(lead), K, hard};
}

namespace el {

// log for the soft-target entropy term: the vectorisable polynomial for float, libm for double.
DOE_HD float log_fast(float x) { return poly::log_poly(x); }
DOE_HD double log_fast(double x) { return ::log(x); }

// Cross-entropy of one row to label y with label smoothing eps (F.cross_entropy's definition):
// loss = lse - (1 - eps) x_y - eps/K sum_k x_k, d loss / d x_k = p_k - (1 - eps)[k == y] - eps/K.
// grad may be null (no backward will follow); otherwise it receives the row's gradient.
template <typename T, typename acc_t = T>
DOE_HD acc_t hard_row(const T* x, int64_t K, int64_t y, acc_t eps, T* grad) {
  acc_t m = -INFINITY;
  DOE_SIMD_REDUCE(max, m)
  for (int64_t k = 0; k < K; ++k) m = acc_t(x[k]) > m ? acc_t(x[k]) : m;
  acc_t sum = 0, sx = 0;
  if (grad) {
    DOE_SIMD_REDUCE(+, sum)
    for (int64_t k = 0; k < K; ++k) {
      const acc_t e = exp_(acc_t(x[k]) - m);
      grad[k] = T(e);
      sum += e;
    }
  } else {
    DOE_SIMD_REDUCE(+, sum)
    for (int64_t k = 0; k < K; ++k) sum += exp_(acc_t(x[k]) - m);
  }
  if (eps != acc_t(0)) {
    DOE_SIMD_REDUCE(+, sx)
    for (int64_t k = 0; k < K; ++k) sx += acc_t(x[k]);
  }
  const acc_t lse = m + log_(sum);
  const acc_t on = acc_t(1) - eps, off = eps / acc_t(K);
  if (grad) {
    const acc_t inv = acc_t(1) / sum;
    DOE_SIMD
    for (int64_t k = 0; k < K; ++k) grad[k] = T(acc_t(grad[k]) * inv - off);
    grad[y] = T(acc_t(grad[y]) - on);
  }
  return lse - on * acc_t(x[y]) - off * sx;
}

// KL(t' || softmax(x)) of one row, t' = (1 - eps) t + eps/K, with 0 log 0 = 0:
// loss = sum t' log t' - sum t' x + lse * sum t',  d loss / d x_k = p_k * sum t' - t'_k.
// *min_t receives the row's smallest target (negative targets are an error, checked by the caller).
template <typename T, typename acc_t = T>
DOE_HD acc_t soft_row(const T* x, const T* t, int64_t K, acc_t eps, T* grad, acc_t* min_t) {
  const acc_t on = acc_t(1) - eps, off = eps / acc_t(K);
  acc_t m = -INFINITY, lo = INFINITY;
  DOE_SIMD_REDUCE(max, m)
  for (int64_t k = 0; k < K; ++k) m = acc_t(x[k]) > m ? acc_t(x[k]) : m;
  acc_t sum = 0, st = 0, stx = 0, ent = 0;
#ifndef __CUDACC__
#pragma omp simd reduction(+ : sum, st, stx, ent) reduction(min : lo)
#endif
  for (int64_t k = 0; k < K; ++k) {
    const acc_t tk = on * acc_t(t[k]) + off;
    const acc_t e = exp_(acc_t(x[k]) - m);
    if (grad) grad[k] = T(e);
    sum += e;
    st += tk;
    stx += tk * acc_t(x[k]);
    ent += tk > acc_t(0) ? tk * log_fast(tk) : acc_t(0);
    lo = acc_t(t[k]) < lo ? acc_t(t[k]) : lo;
  }
  *min_t = lo;
  const acc_t lse = m + log_(sum);
  if (grad) {
    const acc_t scale = st / sum;
    DOE_SIMD
    for (int64_t k = 0; k < K; ++k) grad[k] = T(acc_t(grad[k]) * scale - (on * acc_t(t[k]) + off));
  }
  return ent - stx + lse * st;
}

}  // namespace el
}  // namespace doe_ext
