// CPU LoRA experts: lora_merge (ATen, see lora.h) and the mixed-batch multi_lora_linear.
//
// multi_lora_linear: the base GEMM through ATen (MKL), untouched weight; the low-rank part with
// the (token, slot) pairs grouped by expert (a stable counting sort), so each expert's A and B stay
// in cache while its tokens stream past. Three race-free passes, each parallel over something only
// one thread writes:
//   gather  (parallel over the sorted slots):   u[p]      = M_e @ src[t]          (r dot products)
//   scatter (parallel over column blocks):      dst[t, c] += sum_q coef[p, q] M_e[q, c]
//   outer   (parallel over experts):            G_e[q, :] = sum_{p in e} u[p, q] src[t, :]
// The forward is gather (xa = A x) + scatter (y += s B xa); the backward is gather (B^T g),
// scatter (dx += A^T v) and two outers (dA, dB). Every sum runs in a fixed order (experts
// ascending, then token order), so results do not depend on the thread count.
#include "doe_ext/tensor.h"

#include <algorithm>
#include <vector>

#include "doe_ext/lora.h"

namespace doe_ext {
namespace {

constexpr int64_t kColBlock = 256;  // columns of the scatter pass per task

// The shared row math, compiled per ISA (float: the hot case; double: gradcheck).
DOE_CLONES float dot(const float* a, const float* b, int64_t n) { return lora::dot<float>(a, b, 0, n, 1); }
DOE_CLONES void axpy(float* y, float a, const float* x, int64_t n) { lora::axpy(y, a, x, n); }
double dot(const double* a, const double* b, int64_t n) { return lora::dot<double>(a, b, 0, n, 1); }
void axpy(double* y, double a, const double* x, int64_t n) { lora::axpy(y, a, x, n); }

// (token, slot) pairs p = t * k + j grouped by expert: order[offsets[e] .. offsets[e+1]) are the
// slots of expert e in increasing p. Empty slots (-1) are left out. Raises on a bad index.
struct SlotsByExpert {
  std::vector<int64_t> offsets, order;
};

SlotsByExpert sort_slots(const int64_t* ind, int64_t T, int64_t k, int64_t N) {
  SlotsByExpert s;
  s.offsets.assign(N + 1, 0);
  for (int64_t p = 0; p < T * k; ++p) {
    if (!lora::index_ok(ind[p], N)) fail_multi_lora_index(p / k, p % k, ind[p], N);
    if (ind[p] >= 0) ++s.offsets[ind[p] + 1];
  }
  for (int64_t e = 0; e < N; ++e) s.offsets[e + 1] += s.offsets[e];
  s.order.resize(s.offsets[N]);
  std::vector<int64_t> next(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t p = 0; p < T * k; ++p)
    if (ind[p] >= 0) s.order[next[ind[p]]++] = p;
  return s;
}

// u[p, q] = <m[e, q, :], src[p / k, :]> for every used slot p of expert e (m: [N, r, width]).
template <typename T>
void gather(const SlotsByExpert& s, const int64_t* ind, int64_t k, int64_t r, const T* m, const T* src,
            int64_t width, T* u) {
  const int64_t P = static_cast<int64_t>(s.order.size());
  torch::stable::parallel_for(0, P, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = s.order[i];
      const T* me = m + ind[p] * r * width;
      const T* x = src + (p / k) * width;
      for (int64_t q = 0; q < r; ++q) u[p * r + q] = dot(me + q * width, x, width);
    }
  });
}

// dst[p / k, :] += sum_q coef[p, q] m[e, q, :] over the used slots, experts ascending (dst: [T, width],
// m: [N, r, width]). Parallel over column blocks: each thread owns its columns of every row.
template <typename T>
void scatter(const SlotsByExpert& s, int64_t N, int64_t k, int64_t r, const T* m, const T* coef, int64_t width,
             T* dst) {
  const int64_t blocks = (width + kColBlock - 1) / kColBlock;
  torch::stable::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kColBlock, c1 = std::min(width, c0 + kColBlock);
      for (int64_t e = 0; e < N; ++e) {
        const T* me = m + e * r * width;
        for (int64_t i = s.offsets[e]; i < s.offsets[e + 1]; ++i) {
          const int64_t p = s.order[i];
          T* d = dst + (p / k) * width;
          for (int64_t q = 0; q < r; ++q) axpy(d + c0, coef[p * r + q], me + q * width + c0, c1 - c0);
        }
      }
    }
  });
}

// g[e, q, :] = sum_{p of e} u[p, q] src[p / k, :] (token order), zero for unused experts (g: [N, r, width]).
template <typename T>
void outer(const SlotsByExpert& s, int64_t N, int64_t k, int64_t r, const T* u, const T* src, int64_t width,
           T* g) {
  torch::stable::parallel_for(0, N, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      T* ge = g + e * r * width;
      for (int64_t c = 0; c < r * width; ++c) ge[c] = T(0);
      for (int64_t i = s.offsets[e]; i < s.offsets[e + 1]; ++i) {
        const int64_t p = s.order[i];
        const T* x = src + (p / k) * width;
        for (int64_t q = 0; q < r; ++q) axpy(ge + q * width, u[p * r + q], x, width);
      }
    }
  });
}

Tensor as_rows(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// The experts the slots use. With a bank larger than the slots (T * k), the indices are remapped
// onto 0..U-1 and only those U experts' A and B are gathered (index_select: an expanded or huge
// bank is never copied whole, and the counting sort needs U buckets, not N); otherwise the bank
// itself, contiguous. Raises on an index out of range, naming `indices`.
struct Bank {
  Tensor ind, a, b, used;  // used: the original expert ids (compact banks only)
  int64_t N;
  bool compact;
};

// A compact bank's LoRA gradients over the whole bank (the contract's dense gradients), in `dtype`.
std::pair<Tensor, Tensor> dense_lora_grads(const Bank& bank, int64_t N, const Tensor& grad_a,
                                           const Tensor& grad_b, ScalarType dtype) {
  if (!bank.compact) return {grad_a.to(dtype), grad_b.to(dtype)};
  const auto opts = grad_a.options().dtype(dtype);
  return {zeros({N, grad_a.size(1), grad_a.size(2)}, opts).index_copy_(0, bank.used, grad_a.to(dtype)),
          zeros({N, grad_b.size(1), grad_b.size(2)}, opts).index_copy_(0, bank.used, grad_b.to(dtype))};
}

Bank used_bank(const Tensor& indices, const Tensor& lora_a, const Tensor& lora_b, int64_t T, int64_t k,
               int64_t N) {
  // Checked in place, before the copy below (an expanded index tensor may be huge).
  const auto bad = first_bad_id(indices, [N](int64_t id) { return !lora::index_ok(id, N); });
  if (bad.position >= 0) fail_multi_lora_index(bad.position / k, bad.position % k, bad.value, N);
  auto ind = indices.contiguous();
  const int64_t* ip = ind.data_ptr<int64_t>();
  const int64_t P = T * k;
  if (N <= P) return {ind, lora_a.contiguous(), lora_b, Tensor(), N, false};
  std::vector<int64_t> used;
  for (int64_t p = 0; p < P; ++p)
    if (ip[p] >= 0) used.push_back(ip[p]);
  std::sort(used.begin(), used.end());
  used.erase(std::unique(used.begin(), used.end()), used.end());
  auto remapped = empty_like(ind);
  int64_t* rp = remapped.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    rp[p] = ip[p] < 0 ? -1 : std::lower_bound(used.begin(), used.end(), ip[p]) - used.begin();
  auto ids = empty({static_cast<int64_t>(used.size())}, ind.options());
  std::copy(used.begin(), used.end(), ids.data_ptr<int64_t>());
  return {remapped, lora_a.index_select(0, ids).contiguous(), lora_b.index_select(0, ids), ids,
          static_cast<int64_t>(used.size()), true};
}

std::tuple<Tensor, Tensor> multi_lora_linear_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                     const std::optional<Tensor>& bias,
                                                     const Tensor& lora_a, const Tensor& lora_b,
                                                     const Tensor& indices, const Tensor& scales) {
  const auto sz = check_multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales);
  const auto bank = used_bank(indices, lora_a, lora_b, sz.T, sz.k, sz.N);
  if (is_half(x)) {  // float32 math on the experts used (a compact bank: never the whole one); xa stays float32
    auto [out, xa] = multi_lora_linear_fwd_cpu(up(x), up(weight), up(bias), up(bank.a), up(bank.b), bank.ind, up(scales));
    return {out.to(x.scalar_type()), xa};
  }
  const auto& ind = bank.ind;
  const auto s = sort_slots(ind.data_ptr<int64_t>(), sz.T, sz.k, bank.N);
  auto out = empty({sz.T, sz.out}, x.options());
  auto xa = zeros({sz.T, sz.k, sz.r}, x.options());
  if (sz.T == 0) return {out, xa};
  const auto x2 = as_rows(x);
  if (bias.has_value()) {
    addmm_out(out, *bias, x2, weight.t());
  } else {
    mm_out(out, x2, weight.t());
  }
  if (s.order.empty() || sz.r == 0) return {out, xa};
  const auto xc = x2.contiguous();
  const auto& a = bank.a;
  const auto bt = bank.b.transpose(1, 2).contiguous();  // [N, r, out]: B's columns as rows
  const auto sc = scales.contiguous();
  DOE_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_linear_fwd_cpu", [&] {
    using T = scalar_t;
    const int64_t* ip = ind.data_ptr<int64_t>();
    T* xap = xa.data_ptr<T>();
    gather<T>(s, ip, sz.k, sz.r, a.data_ptr<T>(), xc.data_ptr<T>(), sz.in, xap);
    std::vector<T> coef(sz.T * sz.k * sz.r);  // s[p] * xa[p]
    const T* sp = sc.data_ptr<T>();
    for (int64_t p = 0; p < sz.T * sz.k; ++p)
      for (int64_t q = 0; q < sz.r; ++q) coef[p * sz.r + q] = sp[p] * xap[p * sz.r + q];
    scatter<T>(s, bank.N, sz.k, sz.r, bt.data_ptr<T>(), coef.data(), sz.out, out.data_ptr<T>());
  });
  return {out, xa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> multi_lora_linear_bwd_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
    const Tensor& lora_b, const Tensor& indices, const Tensor& scales, const Tensor& xa,
    bool need_weight_grad, bool need_lora_grad) {
  const auto sz = check_multi_lora_linear_bwd(grad_out, x, weight, lora_a, lora_b, indices, scales, xa);
  const auto bank = used_bank(indices, lora_a, lora_b, sz.T, sz.k, sz.N);
  if (is_half(x)) {
    const auto dt = x.scalar_type();
    auto [gx, gw, gb, ga, glb, gs] = multi_lora_linear_bwd_cpu(up(grad_out), up(x), up(weight), up(bank.a), up(bank.b),
                                                               bank.ind, up(scales), xa, need_weight_grad, need_lora_grad);
    if (need_lora_grad) std::tie(ga, glb) = dense_lora_grads(bank, sz.N, ga, glb, dt);
    return {gx.to(dt), gw.to(dt), gb.to(dt), ga.to(dt), glb.to(dt), gs.to(dt)};
  }
  const auto& ind = bank.ind;
  const int64_t NB = bank.N;  // experts of the (possibly compact) bank the kernels see
  const auto s = sort_slots(ind.data_ptr<int64_t>(), sz.T, sz.k, NB);
  const auto g2 = grad_out.contiguous(), x2 = x.contiguous();
  auto grad_x = mm(g2, weight);
  Tensor grad_w, grad_b, grad_a, grad_bt, grad_s;
  // Gradients not asked for are distinct empty tensors (outputs must not alias).
  const auto none = [&] { return empty({0}, x.options()); };
  grad_w = need_weight_grad ? mm(g2.t(), x2) : none();
  grad_b = need_weight_grad ? g2.sum(0) : none();
  grad_a = need_lora_grad ? empty({NB, sz.r, sz.in}, x.options()) : none();
  grad_bt = need_lora_grad ? empty({NB, sz.r, sz.out}, x.options()) : none();
  grad_s = need_lora_grad ? zeros({sz.T, sz.k}, x.options()) : none();
  if (sz.T > 0 && sz.r > 0 && !s.order.empty()) {
    const auto& a = bank.a;
    const auto bt = bank.b.transpose(1, 2).contiguous();  // [N, r, out]
    const auto sc = scales.contiguous(), xac = xa.contiguous();
    DOE_DISPATCH_FLOATING_TYPES(x.scalar_type(), "multi_lora_linear_bwd_cpu", [&] {
      using T = scalar_t;
      const int64_t* ip = ind.data_ptr<int64_t>();
      const int64_t P = sz.T * sz.k;
      const T* sp = sc.data_ptr<T>();
      const T* xap = xac.data_ptr<T>();
      std::vector<T> bg(P * sz.r, T(0));  // B^T g per slot: the gradient of s * xa
      gather<T>(s, ip, sz.k, sz.r, bt.data_ptr<T>(), g2.data_ptr<T>(), sz.out, bg.data());
      std::vector<T> v(P * sz.r), sxa(P * sz.r);  // v = s * B^T g (grad of xa); s * xa
      for (int64_t p = 0; p < P; ++p)
        for (int64_t q = 0; q < sz.r; ++q) {
          v[p * sz.r + q] = sp[p] * bg[p * sz.r + q];
          sxa[p * sz.r + q] = sp[p] * xap[p * sz.r + q];
        }
      scatter<T>(s, NB, sz.k, sz.r, a.data_ptr<T>(), v.data(), sz.in, grad_x.data_ptr<T>());
      if (need_lora_grad) {
        T* gs = grad_s.data_ptr<T>();
        for (int64_t p = 0; p < P; ++p)
          if (ip[p] >= 0) gs[p] = dot(bg.data() + p * sz.r, xap + p * sz.r, sz.r);
        outer<T>(s, NB, sz.k, sz.r, v.data(), x2.data_ptr<T>(), sz.in, grad_a.data_ptr<T>());
        outer<T>(s, NB, sz.k, sz.r, sxa.data(), g2.data_ptr<T>(), sz.out, grad_bt.data_ptr<T>());
      }
    });
  } else if (need_lora_grad) {
    grad_a.zero_();
    grad_bt.zero_();
  }
  auto grad_lb = need_lora_grad ? grad_bt.transpose(1, 2).contiguous() : grad_bt;
  if (need_lora_grad) std::tie(grad_a, grad_lb) = dense_lora_grads(bank, sz.N, grad_a, grad_lb, x.scalar_type());
  return {grad_x, grad_w, grad_b, grad_a, grad_lb, grad_s};
}

Tensor lora_merge_cpu(const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                      const Tensor& scales) {
  return lora_merge_impl(weight, lora_a, lora_b, scales);
}

void lora_merge_inplace_cpu(Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                            const Tensor& scales) {
  lora_merge_inplace_impl(weight, lora_a, lora_b, scales);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("lora_merge", TORCH_BOX(&lora_merge_cpu));
  m.impl("lora_merge_", TORCH_BOX(&lora_merge_inplace_cpu));
  m.impl("lora_merge_bwd", TORCH_BOX(&lora_merge_bwd_impl));
  m.impl("multi_lora_linear_fwd", TORCH_BOX(&multi_lora_linear_fwd_cpu));
  m.impl("multi_lora_linear_bwd", TORCH_BOX(&multi_lora_linear_bwd_cpu));
}

}  // namespace doe_ext
