// CPU expert-label loss (DoE eq. 4, App. A.5), forward and backward.
//
// One pass per row computes the row's loss and, when a backward will follow, its gradient w.r.t. the
// logits (softmax minus target), so the backward is a single scaled copy: no log-probabilities are
// stored and no [N, K] zeros are scattered into, unlike log_softmax + nll_loss.
#include "doe_ext/tensor.h"

#include <atomic>
#include <limits>

#include "doe_ext/expert_loss.h"

namespace doe_ext {
namespace {

DOE_CLONES float hard_f(const float* x, int64_t K, int64_t y, float eps, float* g) { return el::hard_row(x, K, y, eps, g); }
double hard_f(const double* x, int64_t K, int64_t y, double eps, double* g) { return el::hard_row(x, K, y, eps, g); }
DOE_CLONES float soft_f(const float* x, const float* t, int64_t K, float eps, float* g, float* lo) {
  return el::soft_row(x, t, K, eps, g, lo);
}
double soft_f(const double* x, const double* t, int64_t K, double eps, double* g, double* lo) {
  return el::soft_row(x, t, K, eps, g, lo);
}

constexpr int64_t kNoBadRow = std::numeric_limits<int64_t>::max();

// The first row with an invalid soft target is reported (whichever thread finds it), as on CUDA.
void lower(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
}

template <typename T>
void rows(const Tensor& x2, const Tensor& target, bool hard, int64_t ignore_index, T eps, T* grad,
          T* row_loss, std::atomic<int64_t>& count, std::atomic<int64_t>& bad_row) {
  const int64_t N = x2.size(0), K = x2.size(1);
  const T* x = x2.data_ptr<T>();
  const int64_t* y = hard ? target.data_ptr<int64_t>() : nullptr;
  const T* t = hard ? nullptr : target.data_ptr<T>();
  torch::stable::parallel_for(0, N, 64, [&](int64_t i0, int64_t i1) {
    int64_t kept = 0;
    for (int64_t i = i0; i < i1; ++i) {
      T* g = grad ? grad + i * K : nullptr;
      if (hard) {
        const int64_t yi = y[i];  // ignore_index or in [0, K): checked before the call
        if (yi == ignore_index) {
          row_loss[i] = 0;
          if (g)
            for (int64_t k = 0; k < K; ++k) g[k] = 0;
          continue;
        }
        row_loss[i] = hard_f(x + i * K, K, yi, eps, g);
      } else {
        T lo;
        row_loss[i] = soft_f(x + i * K, t + i * K, K, eps, g, &lo);
        if (!(lo >= T(0))) {
          lower(bad_row, i);
        }
      }
      ++kept;
    }
    count += kept;
  });
}

std::tuple<Tensor, Tensor, Tensor> expert_loss_fwd_cpu(const Tensor& logits, const Tensor& target,
                                                       int64_t ignore_index, std::string_view reduction,
                                                       double label_smoothing, bool keep_grad) {
  const std::string red(reduction);
  const auto sz = check_expert_loss(logits, target, red, label_smoothing);
  if (sz.hard) {  // labels checked in place, before anything of their size is allocated
    const int64_t K = sz.K;
    const auto bad = first_bad_id(target, [=](int64_t y) { return y != ignore_index && (y < 0 || y >= K); });
    DOE_CHECK(bad.position < 0, "expert_loss: expected `target` values in [0, ", K, ") (K classes) or ignore_index (",
              ignore_index, "), got ", bad.value, " at flat row ", bad.position);
  }
  if (is_half(logits)) {  // float32 math, the outputs in the logits' dtype (as on CUDA)
    const auto dt = logits.scalar_type();
    auto [loss, grad, weight] = expert_loss_fwd_cpu(up(logits), up(target), ignore_index, reduction, label_smoothing,
                                                    keep_grad);
    return {loss.to(dt), grad.to(dt), weight.to(dt)};
  }
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  auto row_loss = empty(lead, logits.options());
  auto grad = keep_grad ? empty(logits.sizes(), logits.options())
                        : empty({0}, logits.options());
  std::atomic<int64_t> count{0}, bad_row{kNoBadRow};
  if (sz.N > 0) {
    const auto x2 = logits.reshape({sz.N, sz.K}).contiguous();
    const auto t2 = sz.hard ? target.reshape({sz.N}).contiguous() : target.reshape({sz.N, sz.K}).contiguous();
    DOE_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "expert_loss_fwd_cpu", [&] {
      rows<scalar_t>(x2, t2, sz.hard, ignore_index, static_cast<scalar_t>(label_smoothing),
                     keep_grad ? grad.data_ptr<scalar_t>() : nullptr, row_loss.data_ptr<scalar_t>(), count, bad_row);
    });
  }
  if (bad_row.load() != kNoBadRow) {  // soft targets only (hard labels are checked above)
    const int64_t i = bad_row.load();
    DOE_CHECK(false, "expert_loss: expected float `target` to hold probabilities >= 0, got a negative or NaN "
                "value in flat row ", i);
  }
  const int64_t kept = count.load();
  const double w = red == "mean" ? 1.0 / double(kept > 0 ? kept : 1) : 1.0;
  auto weight = full({}, w, logits.options());
  Tensor loss;
  if (red == "none") {
    loss = row_loss;
  } else {
    loss = row_loss.sum();
    if (red == "mean") loss.mul_(w);
  }
  return {loss, grad, weight};
}

Tensor expert_loss_bwd_cpu(const Tensor& grad_loss, const Tensor& grad_rows, const Tensor& weight) {
  check_expert_loss_bwd(grad_loss, grad_rows, weight);
  if (grad_loss.dim() == 0) return grad_rows * (grad_loss * weight);
  return grad_rows * (grad_loss * weight).unsqueeze(-1);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("expert_loss_fwd", TORCH_BOX(&expert_loss_fwd_cpu));
  m.impl("expert_loss_bwd", TORCH_BOX(&expert_loss_bwd_cpu));
}

}  // namespace doe_ext
