// CUDA LoRA experts: lora_merge (ATen, see lora.h) and the mixed-batch multi_lora_linear.
//
// multi_lora_linear: the base GEMMs through ATen (cuBLAS); the low-rank part in three kernels,
// each with one writer per output element (no float atomics, no host sync):
//   slot_dot  (one warp per (token, slot)):       u[p, q]   = <M_e[q, :], src[t, :]>
//   add_lowrank (one CTA per token, thread/col):  dst[t, c] += sum_j sum_q coef[p, q] M_e[q, c]
//   outer     (one CTA per (expert, col block)):  G_e[q, c] = sum_{p of e} u[p, q] src[t, c]
// The outer pass finds each expert's slots in a stable CUB radix sort of the expert ids, so its
// sums run in token order. Accumulation in float32; u, coef in float32.
// An index out of range raises before any kernel runs, with the CPU's message (check_indices: one
// host sync), so the kernels only skip empty slots. Each kernel takes one params struct.
#include "doe_ext/tensor.h"

#include <tuple>

#include "doe_ext/lora.h"
#include "doe_ext/sorted_runs.h"

namespace doe_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kColBlock = 256;
constexpr int64_t kMaxGrid = 65535 * 32;

unsigned grid_for(int64_t n) { return static_cast<unsigned>(n < kMaxGrid ? n : kMaxGrid); }

// The bank m [N, r, width] is read by its strides (se, sq, sc), never copied: an expanded, huge or
// transposed view (B^T = lora_b.transpose(1, 2)) costs nothing extra.
template <typename T>
struct BankView {
  const T* m;
  int64_t se, sq, sc;  // strides of m
  int64_t N, r, width;
};

// The slots: ind [tokens, k] contiguous, an expert id or -1 (empty) each.
struct Slots {
  const int64_t* ind;
  int64_t tokens, k;
};

// u[p, q] = <m[e_p, q, :], src[p / k, :]> for every slot p (0 for empty slots). src [tokens, width].
template <typename T>
struct SlotDotParams {
  Slots slots;
  BankView<T> bank;
  const T* src;
  float* u;  // [tokens * k, r]
};

// dst[t, c] += sum_j sum_q coef[t*k + j, q] m[e_j, q, c] over token t's used slots (slot order).
template <typename T>
struct AddLowRankParams {
  Slots slots;
  BankView<T> bank;
  const float* coef;  // [tokens * k, r]
  T* dst;             // [tokens, width]
};

// g[e, q, c] = sum over e's slots (keys / pos: the slots sorted by expert, token order) of
// u[p, q] src[p / k, c]; zero for unused experts. g [N, r, width] contiguous.
template <typename T>
struct OuterParams {
  const int64_t* keys;
  const int64_t* pos;
  int64_t P, k, r, width;
  const float* u;  // [P, r]
  const T* src;    // [P / k, width]
  T* g;
};

template <typename T>
BankView<T> bank_view(const Tensor& m) {
  return {m.const_data_ptr<T>(), m.stride(0), m.stride(1), m.stride(2), m.size(0), m.size(1), m.size(2)};
}

Slots slots_of(const Tensor& ind) { return {ind.data_ptr<int64_t>(), ind.size(0), ind.size(1)}; }

// One warp per (token, slot).
template <typename T>
__global__ void __launch_bounds__(kThreads) slot_dot_kernel(const SlotDotParams<T> p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / kWarp);
  const auto& b = p.bank;
  const int64_t P = p.slots.tokens * p.slots.k;
  for (int64_t s = blockIdx.x * int64_t(kThreads / kWarp) + threadIdx.x / kWarp; s < P; s += warps) {
    const int64_t e = p.slots.ind[s];
    const bool used = e >= 0 && e < b.N;
    for (int64_t q = 0; q < b.r; ++q) {
      float acc = 0.f;
      if (used) {
        const T* row = b.m + e * b.se + q * b.sq;
        const T* x = p.src + (s / p.slots.k) * b.width;
        for (int64_t c = lane; c < b.width; c += kWarp)
          acc += static_cast<float>(row[c * b.sc]) * static_cast<float>(x[c]);
      }
      for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) p.u[s * b.r + q] = acc;
    }
  }
}

// One CTA per token, one thread per column.
template <typename T>
__global__ void __launch_bounds__(kThreads) add_lowrank_kernel(const AddLowRankParams<T> p) {
  const auto& b = p.bank;
  const int64_t k = p.slots.k;
  for (int64_t t = blockIdx.x; t < p.slots.tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < b.width; c += blockDim.x) {
      float acc = static_cast<float>(p.dst[t * b.width + c]);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = p.slots.ind[t * k + j];
        if (e < 0 || e >= b.N) continue;
        const float* cf = p.coef + (t * k + j) * b.r;
        const T* me = b.m + e * b.se + c * b.sc;
        for (int64_t q = 0; q < b.r; ++q) acc += cf[q] * static_cast<float>(me[q * b.sq]);
      }
      p.dst[t * b.width + c] = static_cast<T>(acc);
    }
  }
}

// grid: (column blocks, experts).
template <typename T>
__global__ void __launch_bounds__(kThreads) outer_kernel(const OuterParams<T> p) {
  const int64_t e = blockIdx.y;
  const int64_t lo = runs::lower_bound(p.keys, p.P, e), hi = runs::lower_bound(p.keys, p.P, e + 1);
  const int64_t c = blockIdx.x * kColBlock + threadIdx.x;
  if (threadIdx.x >= kColBlock || c >= p.width) return;
  for (int64_t q = 0; q < p.r; ++q) {
    float acc = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t s = p.pos[i];
      acc += p.u[s * p.r + q] * static_cast<float>(p.src[(s / p.k) * p.width + c]);
    }
    p.g[(e * p.r + q) * p.width + c] = static_cast<T>(acc);
  }
}

template <typename T>
void launch_slot_dot(const Tensor& ind, const Tensor& m, const Tensor& src, Tensor& u) {
  const SlotDotParams<T> p{slots_of(ind), bank_view<T>(m), src.const_data_ptr<T>(), u.data_ptr<float>()};
  const int64_t P = ind.numel();
  if (P == 0 || p.bank.r == 0) return;
  const int64_t per_block = kThreads / kWarp;
  slot_dot_kernel<T><<<grid_for((P + per_block - 1) / per_block), kThreads, 0, current_cuda_stream()>>>(p);
  DOE_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_add_lowrank(const Tensor& ind, const Tensor& coef, const Tensor& m, Tensor& dst) {
  const AddLowRankParams<T> p{slots_of(ind), bank_view<T>(m), coef.data_ptr<float>(), dst.data_ptr<T>()};
  if (p.slots.tokens == 0) return;
  add_lowrank_kernel<T><<<grid_for(p.slots.tokens), kThreads, 0, current_cuda_stream()>>>(p);
  DOE_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_outer(const Tensor& keys, const Tensor& pos, const Tensor& u, const Tensor& src,
                  int64_t k, int64_t r, Tensor& g) {
  const int64_t N = g.size(0), width = g.size(2);
  if (N == 0 || r == 0 || width == 0) return;
  const OuterParams<T> p{keys.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), keys.numel(), k, r, width,
                         u.data_ptr<float>(), src.data_ptr<T>(), g.data_ptr<T>()};
  const dim3 grid(static_cast<unsigned>((width + kColBlock - 1) / kColBlock), static_cast<unsigned>(N));
  outer_kernel<T><<<grid, kThreads, 0, current_cuda_stream()>>>(p);
  DOE_CUDA_KERNEL_LAUNCH_CHECK();
}

// A bad index raises, with the CPU's message, before anything of the call's size is allocated: the
// range is a reduction over the indices as they lie (one host sync); only a failing call builds the
// mask that finds the first bad slot.
void check_indices(const Tensor& indices, int64_t N) {
  if (indices.numel() == 0) return;
  const auto [lo, hi] = aminmax(indices);
  const auto range = stack({lo, hi}, 0).cpu();
  if (range.data_ptr<int64_t>()[0] >= -1 && range.data_ptr<int64_t>()[1] < N) return;
  const auto bad = first_bad_id(indices.cpu(), [N](int64_t id) { return !lora::index_ok(id, N); });
  fail_multi_lora_index(bad.position / indices.size(1), bad.position % indices.size(1), bad.value, N);
}

std::tuple<Tensor, Tensor> multi_lora_linear_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                      const std::optional<Tensor>& bias,
                                                      const Tensor& lora_a, const Tensor& lora_b,
                                                      const Tensor& indices, const Tensor& scales) {
  const auto sz = check_multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales);
  const CUDAGuard guard(x.device());
  check_indices(indices, sz.N);
  auto xa = zeros({sz.T, sz.k, sz.r}, x.options().dtype(kFloat));
  if (sz.T == 0) return {empty({0, sz.out}, x.options()), xa};
  const auto x2 = x.contiguous(), ind = indices.contiguous();
  auto out = bias.has_value() ? addmm(*bias, x2, weight.t()) : mm(x2, weight.t());
  if (sz.k == 0) return {out, xa};
  const auto& a = lora_a;
  const auto bt = lora_b.transpose(1, 2);  // [N, r, out], a view
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(x.scalar_type(), "multi_lora_linear_fwd_cuda", [&] {
    launch_slot_dot<scalar_t>(ind, a, x2, xa);
    const auto coef = (xa * scales.to(kFloat).unsqueeze(-1)).contiguous();
    launch_add_lowrank<scalar_t>(ind, coef, bt, out);
  });
  return {out, xa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_linear_bwd_cuda(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, const Tensor& indices, const Tensor& scales, const Tensor& xa,
    bool need_weight_grad, bool need_lora_grad) {
  const auto sz = check_multi_lora_linear_bwd(grad_out, x, weight, lora_a, lora_b, indices, scales, xa);
  // The LoRA gradients are dense over the bank (one grid row per expert): refused before allocating them.
  DOE_CHECK(!need_lora_grad || sz.N <= 65535, "multi_lora_linear_bwd: at most 65535 experts in `lora_a` for the "
              "LoRA gradients on CUDA, got ", sz.N);
  const CUDAGuard guard(x.device());
  check_indices(indices, sz.N);
  const auto g2 = grad_out.contiguous(), x2 = x.contiguous(), ind = indices.contiguous();
  const auto none = [&] { return empty({0}, x.options()); };
  auto grad_x = mm(g2, weight);
  auto grad_w = need_weight_grad ? mm(g2.t(), x2) : none();
  auto grad_b = need_weight_grad ? g2.sum(0) : none();
  auto grad_a = need_lora_grad ? empty_like(lora_a) : none();
  auto grad_bt = need_lora_grad ? empty({sz.N, sz.r, sz.out}, x.options()) : none();
  auto grad_s = need_lora_grad ? zeros({sz.T, sz.k}, x.options()) : none();
  if (sz.T == 0 || sz.k == 0) {
    if (need_lora_grad) {
      grad_a.zero_();
      grad_bt.zero_();
    }
    return {grad_x, grad_w, grad_b, grad_a, need_lora_grad ? grad_bt.transpose(1, 2).contiguous() : grad_bt, grad_s};
  }
  const auto& a = lora_a;
  const auto bt = lora_b.transpose(1, 2);  // [N, r, out], a view
  const auto s3 = scales.to(kFloat).unsqueeze(-1);
  const auto xaf = xa.to(kFloat);
  auto bg = zeros({sz.T, sz.k, sz.r}, x.options().dtype(kFloat));  // B^T g per slot
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(x.scalar_type(), "multi_lora_linear_bwd_cuda", [&] {
    launch_slot_dot<scalar_t>(ind, bt, g2, bg);
    const auto v = (bg * s3).contiguous();  // the gradient of xa
    launch_add_lowrank<scalar_t>(ind, v, a, grad_x);
    if (need_lora_grad) {
      grad_s.copy_((bg * xaf).sum(-1));  // 0 at empty slots: bg is 0 there
      Tensor keys, pos;
      std::tie(keys, pos) = runs::sort_positions_by_key(ind);  // -1 sorts first, in no expert's run
      launch_outer<scalar_t>(keys, pos, v, x2, sz.k, sz.r, grad_a);
      const auto sxa = (xaf * s3).contiguous();
      launch_outer<scalar_t>(keys, pos, sxa, g2, sz.k, sz.r, grad_bt);
    }
  });
  return {grad_x, grad_w, grad_b, grad_a, need_lora_grad ? grad_bt.transpose(1, 2).contiguous() : grad_bt, grad_s};
}

Tensor lora_merge_cuda(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                       const Tensor& scales) {
  const CUDAGuard guard(weight.device());
  return lora_merge_impl(weight, lora_a, lora_b, scales);
}

void lora_merge_inplace_cuda(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                             const Tensor& scales) {
  const CUDAGuard guard(weight.device());
  lora_merge_inplace_impl(weight, lora_a, lora_b, scales);
}

std::tuple<Tensor, Tensor, Tensor> lora_merge_bwd_cuda(const Tensor& grad_out, const Tensor& lora_a,
                                                       const Tensor& lora_b, const Tensor& scales) {
  const CUDAGuard guard(grad_out.device());
  return lora_merge_bwd_impl(grad_out, lora_a, lora_b, scales);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CUDA, m) {
  m.impl("lora_merge", TORCH_BOX(&lora_merge_cuda));
  m.impl("lora_merge_", TORCH_BOX(&lora_merge_inplace_cuda));
  m.impl("lora_merge_bwd", TORCH_BOX(&lora_merge_bwd_cuda));
  m.impl("multi_lora_linear_fwd", TORCH_BOX(&multi_lora_linear_fwd_cuda));
  m.impl("multi_lora_linear_bwd", TORCH_BOX(&multi_lora_linear_bwd_cuda));
}

}  // namespace doe_ext
