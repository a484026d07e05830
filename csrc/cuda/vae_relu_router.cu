// CUDA VAE-ReLU router, forward and backward (DoE §3.4, App. A.3).
//
// The five GEMMs are ATen's (cuBLAS, float32 accumulation); everything between them is one kernel
// each, on the row math of vae_relu_router.h that the CPU runs too: eps is the same Philox +
// Box-Muller draw on both devices, read from an rng pair that stays in device memory (no host sync).
// One warp owns one row; float32 math for every input dtype.
#include "doe_ext/tensor.h"

#include "doe_ext/vae_relu_router.h"
#include "doe_ext/warp.cuh"

namespace doe_ext {
namespace {

using vr::Eps;
using vr::eps_mode;

constexpr int kWarps = 8;  // rows per CTA
constexpr int kThreads = 32 * kWarps;

unsigned grid_for(int64_t N) { return static_cast<unsigned>((N + kWarps - 1) / kWarps); }

// One call's arguments, shared by its kernels (flash-attention's Flash_fwd_params): [N, width]
// matrices, contiguous; a null pointer is an absent tensor. Forward and backward fill the fields
// their kernels read.
template <typename T>
struct RouterParams {
  int64_t N, dz;
  int K;
  int mode;   // Eps: how eps is had (none, given, drawn from rng)
  bool relu;  // the activation: relu, or softmax
  const T* mulv;         // [N, 2 dz]: mu | logvar
  const T* noise;        // [N, dz] (mode kGiven)
  const int64_t* rng;    // [2] (mode kDrawn)
  T* z;                  // [N, dz]
  T* kl;                 // [N], or null (the backward's re-draw of z)
  T* logits;             // [N, K]
  T* gates;              // [N, K]
  unsigned long long* counts;     // [K]: per-block active counts (forward)
  unsigned long long* zero_rows;  // []: all-zero gate rows (forward)
  const T* grad_gates;   // [N, K], or null (backward)
  const T* grad_logits;  // [N, K], or null
  T* grad_logits_total;  // [N, K]: dL/dlogits
  const T* grad_z_total; // [N, dz]: dL/dz
  const T* grad_kl;      // [N], or null
  T* grad_mulv;          // [N, 2 dz]
};

// z = mu + sigma * eps (or mu) and, when kl is given, the row's KL.
template <typename T>
__global__ void __launch_bounds__(kThreads) reparam_kernel(const RouterParams<T> p) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.N) return;
  const int64_t dz = p.dz;
  const vr::Rng r = p.mode == int(Eps::kDrawn) ? vr::unpack_rng(p.rng[0], p.rng[1]) : vr::Rng{0, 0, 0};
  const T* m = p.mulv + row * 2 * dz;
  float acc = 0.f;
  for (int64_t j = lane; j < dz; j += 32) {
    float eps = 0.f, zj;
    if (p.mode == int(Eps::kGiven)) eps = static_cast<float>(p.noise[row * dz + j]);
    if (p.mode == int(Eps::kDrawn)) eps = vr::normal(r.k0, r.k1, r.stream, uint64_t(row), uint32_t(j));
    acc += vr::reparam_one(static_cast<float>(m[j]), static_cast<float>(m[dz + j]), eps, p.mode != int(Eps::kNone), zj);
    p.z[row * dz + j] = static_cast<T>(zj);
  }
  acc = warp_sum(acc);
  if (p.kl && lane == 0) p.kl[row] = static_cast<T>(0.5f * acc);
}

// gates = relu(logits) or softmax(logits), and the telemetry: per-block active counts and all-zero
// rows, counted in shared memory per CTA and added to the totals once per CTA (integers: exact).
template <typename T>
__global__ void __launch_bounds__(kThreads) activation_kernel(const RouterParams<T> p) {
  extern __shared__ unsigned int cnt[];  // [K + 1]: per-block counts, then the CTA's zero rows
  const int K = p.K;
  for (int k = threadIdx.x; k <= K; k += kThreads) cnt[k] = 0;
  __syncthreads();
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row < p.N) {
    const T* l = p.logits + row * K;
    T* g = p.gates + row * K;
    float m = -INFINITY, sum = 0.f;
    if (!p.relu) {
      for (int k = lane; k < K; k += 32) m = fmaxf(m, static_cast<float>(l[k]));
      m = warp_max(m);
      for (int k = lane; k < K; k += 32) sum += exp_(static_cast<float>(l[k]) - m);
      sum = warp_sum(sum);
    }
    int active = 0;
    for (int k = lane; k < K; k += 32) {
      const float x = static_cast<float>(l[k]);
      const T v = static_cast<T>(p.relu ? (x > 0.f ? x : 0.f) : exp_(x - m) / sum);
      g[k] = v;
      if (static_cast<float>(v) > 0.f) {
        ++active;
        atomicAdd(&cnt[k], 1u);
      }
    }
    active = __reduce_add_sync(0xffffffffu, active);
    if (lane == 0 && active == 0) atomicAdd(&cnt[K], 1u);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < K; k += kThreads)
    if (cnt[k]) atomicAdd(&p.counts[k], static_cast<unsigned long long>(cnt[k]));
  if (threadIdx.x == 0 && cnt[K]) atomicAdd(p.zero_rows, static_cast<unsigned long long>(cnt[K]));
}

// dL/dlogits through the activation, plus the direct logits gradient (either may be null).
template <typename T>
__global__ void __launch_bounds__(kThreads) activation_backward_kernel(const RouterParams<T> p) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.N) return;
  const int K = p.K;
  const int64_t o = row * K;
  const T* gg = p.grad_gates;
  const T* gl = p.grad_logits;
  float dot = 0.f;
  if (!p.relu && gg) {
    for (int k = lane; k < K; k += 32) dot += static_cast<float>(p.gates[o + k]) * static_cast<float>(gg[o + k]);
    dot = warp_sum(dot);
  }
  for (int k = lane; k < K; k += 32) {
    float d = gl ? static_cast<float>(gl[o + k]) : 0.f;
    if (gg) {
      const float g = static_cast<float>(gg[o + k]);
      d += p.relu ? (static_cast<float>(p.logits[o + k]) > 0.f ? g : 0.f)
                  : static_cast<float>(p.gates[o + k]) * (g - dot);
    }
    p.grad_logits_total[o + k] = static_cast<T>(d);
  }
}

// d[mu | logvar] from dL/dz and dL/dkl; one thread per latent element.
template <typename T>
__global__ void reparam_backward_kernel(const RouterParams<T> p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t dz = p.dz;
  if (i >= p.N * dz) return;
  const int64_t row = i / dz, j = i % dz;
  const T* m = p.mulv + row * 2 * dz;
  float dmu, dlv;
  vr::reparam_grad_one(static_cast<float>(m[j]), static_cast<float>(m[dz + j]), static_cast<float>(p.z[i]),
                       static_cast<float>(p.grad_z_total[i]), p.grad_kl ? static_cast<float>(p.grad_kl[row]) : 0.f,
                       p.mode != int(Eps::kNone), dmu, dlv);
  p.grad_mulv[row * 2 * dz + j] = static_cast<T>(dmu);
  p.grad_mulv[row * 2 * dz + dz + j] = static_cast<T>(dlv);
}

template <typename T>
const T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The fields both directions share: sizes, the eps mode, mu | logvar, noise / rng, z.
template <typename T>
RouterParams<T> router_params(int64_t N, int64_t dz, int64_t K, Eps mode, bool relu, const Tensor& mulv2,
                              const Tensor& noise2, const Tensor& rng, Tensor& z2) {
  RouterParams<T> p{};
  p.N = N, p.dz = dz, p.K = static_cast<int>(K), p.mode = int(mode), p.relu = relu;
  p.mulv = mulv2.data_ptr<T>();
  p.noise = ptr_or_null<T>(noise2);
  p.rng = mode == Eps::kDrawn ? rng.data_ptr<int64_t>() : nullptr;
  p.z = z2.data_ptr<T>();
  return p;
}

template <typename T>
void launch_reparam(const RouterParams<T>& p, cudaStream_t stream) {
  reparam_kernel<T><<<grid_for(p.N), kThreads, 0, stream>>>(p);
  DOE_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> vae_relu_router_fwd_cuda(
    const Tensor& h, const Tensor& w_mu, const Tensor& b_mu, const Tensor& w_logvar,
    const Tensor& b_logvar, const Tensor& w_gate, const Tensor& b_gate,
    const std::optional<Tensor>& noise, const std::optional<Tensor>& rng, bool training,
    std::string_view activation) {
  const std::string act(activation);
  const auto sz = check_vae_relu_router(h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, noise, rng, training, act);
  DOE_CHECK(sz.K <= (48 * 1024) / 4 - 1, "vae_relu_router: K = ", sz.K, " knowledge blocks exceed the CUDA "
              "kernel's telemetry buffer (at most 12287)");
  const CUDAGuard guard(h.device());
  const Eps mode = eps_mode(training, noise, rng);
  auto gates = empty(leading_with(h, sz.K), h.options());
  auto logits = empty(leading_with(h, sz.K), h.options());
  auto kl = empty(h.sizes().slice(0, h.dim() - 1), h.options());
  auto z = empty(leading_with(h, sz.dz), h.options());
  auto mulv = empty(leading_with(h, 2 * sz.dz), h.options());
  auto counts = zeros({sz.K}, h.options().dtype(kLong));
  auto zero_rows = zeros({}, h.options().dtype(kLong));
  if (sz.N == 0) return {gates, logits, kl, z, mulv, counts, zero_rows};
  const auto h2 = as_rows(h, sz.N);
  auto mulv2 = mulv.view({sz.N, 2 * sz.dz});
  addmm_out(mulv2, cat({b_mu, b_logvar}, 0), h2, cat({w_mu, w_logvar}, 0).t());
  const auto noise2 = mode == Eps::kGiven ? noise->reshape({sz.N, sz.dz}).contiguous() : Tensor();
  const auto rng1 = mode == Eps::kDrawn ? rng->contiguous() : Tensor();
  auto z2 = z.view({sz.N, sz.dz});
  auto logits2 = logits.view({sz.N, sz.K});
  auto stream = current_cuda_stream();
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(h.scalar_type(), "vae_relu_router_fwd_cuda", [&] {
    auto p = router_params<scalar_t>(sz.N, sz.dz, sz.K, mode, act == "relu", mulv2, noise2, rng1, z2);
    p.kl = kl.data_ptr<scalar_t>();
    p.logits = logits2.data_ptr<scalar_t>();
    p.gates = gates.data_ptr<scalar_t>();
    p.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    p.zero_rows = reinterpret_cast<unsigned long long*>(zero_rows.data_ptr<int64_t>());
    launch_reparam(p, stream);
    addmm_out(logits2, b_gate, z2, w_gate.t());
    activation_kernel<scalar_t><<<grid_for(sz.N), kThreads, sizeof(unsigned int) * (p.K + 1), stream>>>(p);
    DOE_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gates, logits, kl, z, mulv, counts, zero_rows};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> vae_relu_router_bwd_cuda(
    const std::optional<Tensor>& grad_gates, const std::optional<Tensor>& grad_logits,
    const std::optional<Tensor>& grad_kl, const std::optional<Tensor>& grad_z, const Tensor& h,
    const Tensor& w_mu, const Tensor& w_logvar, const Tensor& w_gate, const Tensor& mu_logvar,
    const Tensor& gates, const Tensor& logits, const std::optional<Tensor>& noise,
    const std::optional<Tensor>& rng, bool training, std::string_view activation) {
  const std::string act(activation);
  const auto sz = vr::check_backward(grad_gates, grad_logits, grad_kl, grad_z, h, w_mu, w_logvar, w_gate, mu_logvar,
                                     gates, logits, noise, rng, training, act);
  const int64_t N = sz.N, d = sz.d, dz = sz.dz, K = sz.K;
  const CUDAGuard guard(h.device());
  const Eps mode = eps_mode(training, noise, rng);
  auto opts = h.options();
  if (N == 0) {
    return {empty(h.sizes(), opts), zeros({dz, d}, opts), zeros({dz}, opts), zeros({dz, d}, opts),
            zeros({dz}, opts), zeros({K, dz}, opts), zeros({K}, opts)};
  }
  const auto h2 = as_rows(h, N);
  const auto mulv2 = mu_logvar.reshape({N, 2 * dz}).contiguous();
  const auto gates2 = gates.reshape({N, K}).contiguous(), logits2 = logits.reshape({N, K}).contiguous();
  const auto gg = grad_gates.has_value() ? grad_gates->reshape({N, K}).contiguous() : Tensor();
  const auto gl = grad_logits.has_value() ? grad_logits->reshape({N, K}).contiguous() : Tensor();
  const auto gk = grad_kl.has_value() ? grad_kl->reshape({N}).contiguous() : Tensor();
  const auto noise2 = mode == Eps::kGiven ? noise->reshape({N, dz}).contiguous() : Tensor();
  const auto rng1 = mode == Eps::kDrawn ? rng->contiguous() : Tensor();
  auto stream = current_cuda_stream();
  auto z = empty({N, dz}, opts);
  auto dl = empty({N, K}, opts);
  auto dmulv = empty({N, 2 * dz}, opts);
  Tensor dw_gate, db_gate, dzt;
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(h.scalar_type(), "vae_relu_router_bwd_cuda", [&] {
    auto p = router_params<scalar_t>(N, dz, K, mode, act == "relu", mulv2, noise2, rng1, z);  // kl: null
    p.logits = logits2.data_ptr<scalar_t>();
    p.gates = gates2.data_ptr<scalar_t>();
    p.grad_gates = ptr_or_null<scalar_t>(gg);
    p.grad_logits = ptr_or_null<scalar_t>(gl);
    p.grad_logits_total = dl.data_ptr<scalar_t>();
    p.grad_kl = ptr_or_null<scalar_t>(gk);
    p.grad_mulv = dmulv.data_ptr<scalar_t>();
    launch_reparam(p, stream);
    activation_backward_kernel<scalar_t><<<grid_for(N), kThreads, 0, stream>>>(p);
    DOE_CUDA_KERNEL_LAUNCH_CHECK();
    dw_gate = mm(dl.t(), z);
    db_gate = dl.sum(0);
    dzt = (grad_z.has_value() ? addmm(grad_z->reshape({N, dz}), dl, w_gate) : mm(dl, w_gate)).contiguous();
    p.grad_z_total = dzt.data_ptr<scalar_t>();
    const int64_t total = N * dz;
    reparam_backward_kernel<scalar_t><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(p);
    DOE_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto dh = mm(dmulv, cat({w_mu, w_logvar}, 0)).view(h.sizes());
  const auto dw = mm(dmulv.t(), h2);  // both heads in one GEMM, split by a small copy
  const auto db = dmulv.sum(0);
  return {dh, dw.narrow(0, 0, dz).clone(), db.narrow(0, 0, dz).clone(), dw.narrow(0, dz, dz).clone(),
          db.narrow(0, dz, dz).clone(), dw_gate, db_gate};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CUDA, m) {
  m.impl("vae_relu_router_fwd", TORCH_BOX(&vae_relu_router_fwd_cuda));
  m.impl("vae_relu_router_bwd", TORCH_BOX(&vae_relu_router_bwd_cuda));
}

}  // namespace doe_ext
