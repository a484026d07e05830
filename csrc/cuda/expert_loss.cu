// CUDA expert-label loss (DoE eq. 4, App. A.5), forward and backward.
//
// One warp per row: the row's loss and (when a backward will follow) its gradient come out of one
// pass, in float32 for every input dtype, with the same formulas as the CPU (expert_loss.h). Row
// losses are summed by ATen (deterministic); the kept-row count and the first bad row are integer
// atomics. The only host sync is the bad-label check that the contract asks for.
#include "doe_ext/tensor.h"

#include <limits>

#include "doe_ext/expert_loss.h"
#include "doe_ext/warp.cuh"

namespace doe_ext {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

// One launch's arguments (flash-attention's Flash_fwd_params). x: [N, K] logits; labels [N] (hard)
// or t [N, K] (soft), the other null. The kernel writes row_loss [N] (float32) and grad [N, K] when
// given, adds the kept rows to *count and lowers *bad_row to the first invalid row.
template <typename T>
struct RowsParams {
  const T* x;
  const int64_t* labels;
  const T* t;
  int64_t N;
  int K;
  int64_t ignore_index;
  float eps;  // label smoothing
  T* grad;
  float* row_loss;
  unsigned long long* count;
  unsigned long long* bad_row;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_kernel(const RowsParams<T> p) {
  const T* x = p.x;
  const int64_t* labels = p.labels;
  const int64_t N = p.N, ignore_index = p.ignore_index;
  const int K = p.K;
  const float eps = p.eps;
  T* grad = p.grad;
  float* row_loss = p.row_loss;
  unsigned long long *count = p.count, *bad_row = p.bad_row;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* xr = x + row * K;
  T* g = grad ? grad + row * K : nullptr;
  const float on = 1.f - eps, off = eps / float(K);
  if (labels) {
    const int64_t y = labels[row];
    if (y == ignore_index || y < 0 || y >= K) {
      if (g)
        for (int k = lane; k < K; k += 32) g[k] = static_cast<T>(0.f);
      if (lane == 0) {
        row_loss[row] = 0.f;
        if (y != ignore_index) atomicMin(bad_row, static_cast<unsigned long long>(row));
      }
      return;
    }
    float m = -INFINITY;
    for (int k = lane; k < K; k += 32) m = fmaxf(m, static_cast<float>(xr[k]));
    m = warp_max(m);
    float sum = 0.f, sx = 0.f;
    for (int k = lane; k < K; k += 32) {
      const float v = static_cast<float>(xr[k]);
      sum += exp_(v - m);
      sx += v;
    }
    sum = warp_sum(sum);
    sx = warp_sum(sx);
    const float lse = m + logf(sum);
    if (g)
      for (int k = lane; k < K; k += 32)
        g[k] = static_cast<T>(exp_(static_cast<float>(xr[k]) - lse) - off - (k == y ? on : 0.f));
    if (lane == 0) {
      row_loss[row] = lse - on * static_cast<float>(xr[y]) - off * sx;
      atomicAdd(count, 1ull);
    }
    return;
  }
  const T* tr = p.t + row * K;
  float m = -INFINITY, lo = INFINITY;
  for (int k = lane; k < K; k += 32) {
    m = fmaxf(m, static_cast<float>(xr[k]));
    lo = fminf(lo, static_cast<float>(tr[k]));
  }
  m = warp_max(m);
  lo = warp_min(lo);
  float sum = 0.f, st = 0.f, stx = 0.f, ent = 0.f;
  for (int k = lane; k < K; k += 32) {
    const float v = static_cast<float>(xr[k]), tk = on * static_cast<float>(tr[k]) + off;
    sum += exp_(v - m);
    st += tk;
    stx += tk * v;
    ent += tk > 0.f ? tk * el::log_fast(tk) : 0.f;
  }
  sum = warp_sum(sum);
  st = warp_sum(st);
  stx = warp_sum(stx);
  ent = warp_sum(ent);
  const float lse = m + logf(sum);
  if (g)
    for (int k = lane; k < K; k += 32)
      g[k] = static_cast<T>(exp_(static_cast<float>(xr[k]) - lse) * st - (on * static_cast<float>(tr[k]) + off));
  if (lane == 0) {
    row_loss[row] = ent - stx + lse * st;
    atomicAdd(count, 1ull);
    if (!(lo >= 0.f)) atomicMin(bad_row, static_cast<unsigned long long>(row));
  }
}

std::tuple<Tensor, Tensor, Tensor> expert_loss_fwd_cuda(const Tensor& logits, const Tensor& target,
                                                        int64_t ignore_index, std::string_view reduction,
                                                        double label_smoothing, bool keep_grad) {
  const std::string red(reduction);
  const auto sz = check_expert_loss(logits, target, red, label_smoothing);
  const CUDAGuard guard(logits.device());
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  auto grad = keep_grad ? empty(logits.sizes(), logits.options())
                        : empty({0}, logits.options());
  auto row_loss = zeros({sz.N}, logits.options().dtype(kFloat));
  auto stats = int64_tensor({0, std::numeric_limits<int64_t>::max()}, logits.device());  // kept rows, first bad row
  int64_t kept = 0;
  if (sz.N > 0) {
    DOE_CHECK(sz.K <= std::numeric_limits<int>::max(), "expert_loss: K = ", sz.K, " classes is too many");
    const auto x2 = logits.reshape({sz.N, sz.K}).contiguous();
    const auto t2 = sz.hard ? target.reshape({sz.N}).contiguous() : target.reshape({sz.N, sz.K}).contiguous();
    auto* st = reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>());
    auto stream = current_cuda_stream();
    DOE_DISPATCH_FLOATING_AND_HALF_TYPES(logits.scalar_type(), "expert_loss_fwd_cuda", [&] {
      const RowsParams<scalar_t> p{x2.data_ptr<scalar_t>(), sz.hard ? t2.data_ptr<int64_t>() : nullptr,
                                   sz.hard ? nullptr : t2.data_ptr<scalar_t>(), sz.N, static_cast<int>(sz.K),
                                   ignore_index, static_cast<float>(label_smoothing),
                                   keep_grad ? grad.data_ptr<scalar_t>() : nullptr, row_loss.data_ptr<float>(), st,
                                   st + 1};
      rows_kernel<scalar_t><<<static_cast<unsigned>((sz.N + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
      DOE_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // The contract's bad-label error needs the flag on the host: the op's one sync.
    const auto host = stats.cpu();
    kept = host.data_ptr<int64_t>()[0];
    const int64_t bad = host.data_ptr<int64_t>()[1];
    if (bad != std::numeric_limits<int64_t>::max()) {
      if (sz.hard) {
        DOE_CHECK(false, "expert_loss: expected `target` values in [0, ", sz.K, ") (K classes) or ignore_index (",
                  ignore_index, "), got ", target.reshape({sz.N})[bad].item<int64_t>(), " at flat row ", bad);
      }
      DOE_CHECK(false, "expert_loss: expected float `target` to hold probabilities >= 0, got a negative or NaN "
                  "value in flat row ", bad);
    }
  }
  // 1 / max(kept, 1) for mean (kept came with the bad-label flag: no second sync).
  auto weight = full({}, red == "mean" ? 1.0 / double(std::max<int64_t>(kept, 1)) : 1.0, row_loss.options());
  Tensor loss;
  if (red == "none") {
    loss = row_loss.view(lead).to(logits.scalar_type());
  } else {
    auto total = row_loss.sum();
    if (red == "mean") total = total * weight;
    loss = total.to(logits.scalar_type());
  }
  return {loss, grad, weight.to(logits.scalar_type())};
}

Tensor expert_loss_bwd_cuda(const Tensor& grad_loss, const Tensor& grad_rows, const Tensor& weight) {
  check_expert_loss_bwd(grad_loss, grad_rows, weight);
  const CUDAGuard guard(grad_rows.device());
  if (grad_loss.dim() == 0) return grad_rows * (grad_loss * weight);
  return grad_rows * (grad_loss * weight).unsqueeze(-1);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CUDA, m) {
  m.impl("expert_loss_fwd", TORCH_BOX(&expert_loss_fwd_cuda));
  m.impl("expert_loss_bwd", TORCH_BOX(&expert_loss_bwd_cuda));
}

}  // namespace doe_ext
