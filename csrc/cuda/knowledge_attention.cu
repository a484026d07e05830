// CUDA knowledge attention, forward and backward (K <= 256 fused; larger K through ATen).
//
// One CTA owns kRows rows of q. Forward: the scores of those rows stay in shared memory (no N x K
// tensor reaches device memory), the softmax is the shared host/device row code of math.h, and
// out = residual + P @ z_value is written once. Backward: the CTA rebuilds P from lse, forms
// dP = g @ z_value.T and dS in shared memory and writes dq; it also writes P and dS so that the two
// weight gradients (reductions over all rows) are one cuBLAS GEMM each, deterministic, no atomics.
// Inputs float32/float16/bfloat16; every accumulation in float32.
#include "doe_ext/tensor.h"

#include "doe_ext/knowledge_attention.h"
#include "doe_ext/math.h"

namespace doe_ext {
namespace {

constexpr int kRows = 16;      // rows of q per CTA
constexpr int kThreads = 256;  // threads per CTA
constexpr int kTile = 8;       // width of the dk / dv tiles staged in shared memory
constexpr int64_t kMaxFusedK = 256;

template <typename T>
__device__ __forceinline__ float ld(const T* p, int64_t i) { return static_cast<float>(p[i]); }

// acc[r][k] += sum_t a[row0 + r, t] * b[k, t] over t < width: a is [N, width] with row stride lda,
// b is [K, width] contiguous. a's rows past N read as zero. Shared scratch: a_s [kRows][kTile],
// b_s [kTile][K].
template <typename T>
__device__ void rows_times_bt(const T* a, int64_t lda, int64_t row0, int64_t N, const T* b, int64_t width,
                              int K, float* acc, float* a_s, float* b_s) {
  for (int64_t t0 = 0; t0 < width; t0 += kTile) {
    for (int i = threadIdx.x; i < kRows * kTile; i += kThreads) {
      const int r = i / kTile, t = i % kTile;
      a_s[i] = (row0 + r < N && t0 + t < width) ? ld(a, (row0 + r) * lda + t0 + t) : 0.f;
    }
    for (int i = threadIdx.x; i < kTile * K; i += kThreads) {
      const int t = i / K, k = i % K;
      b_s[i] = t0 + t < width ? ld(b, int64_t(k) * width + t0 + t) : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kRows * K; i += kThreads) {
      const int r = i / K, k = i % K;
      float s = acc[i];
#pragma unroll
      for (int t = 0; t < kTile; ++t) s += a_s[r * kTile + t] * b_s[t * K + k];
      acc[i] = s;
    }
    __syncthreads();
  }
}

// out[row0 + r, c] = (residual[row0 + r, c]) + sum_k p[r][k] * b[k, c] for every column c < width;
// b is [K, width] contiguous, reads coalesced along c.
template <typename T>
__device__ void p_times_b(const float* p, int K, const T* b, int64_t width, const T* residual, int64_t ldr,
                          T* out, int64_t ldo, int64_t row0, int64_t N) {
  const int rows = static_cast<int>(N - row0 < kRows ? N - row0 : kRows);
  for (int64_t c = threadIdx.x; c < width; c += kThreads) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
    for (int k = 0; k < K; ++k) {
      const float v = ld(b, int64_t(k) * width + c);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] += p[r * K + k] * v;
    }
    for (int r = 0; r < rows; ++r) {
      const float res = residual ? ld(residual, (row0 + r) * ldr + c) : 0.f;
      out[(row0 + r) * ldo + c] = static_cast<T>(acc[r] + res);
    }
  }
}

// One launch's arguments (flash-attention's Flash_fwd_params): row-major matrices with their row
// strides; a null pointer is an absent tensor. q [N, dk] (row stride ldq), z_key [K, dk] and
// z_value [K, dv] contiguous.
template <typename T>
struct FwdParams {
  const T* q;
  int64_t ldq;
  const T* z_key;
  const T* z_value;
  const T* residual;  // [N, dv], row stride ldr, or null
  int64_t ldr;
  T* out;             // [N, dv]
  float* lse;         // [N]
  T* probs;           // [N, K], or null
  int64_t N, dk, dv;
  int K;
  float scale;
};

template <typename T>
struct BwdParams {
  const T* grad_out;  // [N, dv] contiguous
  const T* q;
  int64_t ldq;
  const T* z_key;
  const T* z_value;
  const float* lse;   // [N]
  T* dq;              // [N, dk]
  T* probs;           // [N, K]: P, rebuilt from lse
  T* ds;              // [N, K]: dS
  int64_t N, dk, dv;
  int K;
  float scale;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams<T> p) {
  extern __shared__ float smem[];
  float* s = smem;                  // [kRows][K]
  const int K = p.K;
  float* a_s = s + kRows * K;       // [kRows][kTile]
  float* b_s = a_s + kRows * kTile; // [kTile][K]
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  for (int i = threadIdx.x; i < kRows * K; i += kThreads) s[i] = 0.f;
  __syncthreads();
  rows_times_bt(p.q, p.ldq, row0, p.N, p.z_key, p.dk, K, s, a_s, b_s);
  if (threadIdx.x < kRows && row0 + threadIdx.x < p.N) {
    const int64_t row = row0 + threadIdx.x;
    float* sr = s + threadIdx.x * K;
    p.lse[row] = ka::softmax_row(sr, int64_t(K), p.scale);
    if (p.probs)
      for (int k = 0; k < K; ++k) p.probs[row * K + k] = static_cast<T>(sr[k]);
  }
  __syncthreads();
  p_times_b(s, K, p.z_value, p.dv, p.residual, p.ldr, p.out, p.dv, row0, p.N);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams<T> p) {
  extern __shared__ float smem[];
  const int K = p.K;
  float* pr_s = smem;                 // [kRows][K]
  float* dp = pr_s + kRows * K;       // [kRows][K]
  float* a_s = dp + kRows * K;        // [kRows][kTile]
  float* b_s = a_s + kRows * kTile;   // [kTile][K]
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  for (int i = threadIdx.x; i < kRows * K; i += kThreads) pr_s[i] = dp[i] = 0.f;
  __syncthreads();
  rows_times_bt(p.q, p.ldq, row0, p.N, p.z_key, p.dk, K, pr_s, a_s, b_s);    // raw scores
  rows_times_bt(p.grad_out, p.dv, row0, p.N, p.z_value, p.dv, K, dp, a_s, b_s);  // dP = g @ z_value.T
  if (threadIdx.x < kRows && row0 + threadIdx.x < p.N) {
    const int64_t row = row0 + threadIdx.x;
    float* pr = pr_s + threadIdx.x * K;
    float* dpr = dp + threadIdx.x * K;
    ka::probs_from_lse(pr, int64_t(K), p.scale, p.lse[row]);
    ka::softmax_backward_row(pr, dpr, int64_t(K), p.scale);
    for (int k = 0; k < K; ++k) {
      p.probs[row * K + k] = static_cast<T>(pr[k]);
      p.ds[row * K + k] = static_cast<T>(dpr[k]);
    }
  }
  __syncthreads();
  p_times_b<T>(dp, K, p.z_key, p.dk, nullptr, 0, p.dq, p.dk, row0, p.N);  // dq = dS @ z_key
}

size_t fwd_smem(int K) { return sizeof(float) * (kRows * K + kRows * kTile + kTile * K); }
size_t bwd_smem(int K) { return sizeof(float) * (2 * kRows * K + kRows * kTile + kTile * K); }

// K > kMaxFusedK: the same math through ATen (cuBLAS GEMMs, float32 softmax).
std::tuple<Tensor, Tensor, Tensor> fwd_large_k(const Tensor& q2, const Tensor& zk,
                                               const Tensor& zv, const Tensor& res2,
                                               double scale, bool return_probs) {
  auto s = mm(q2, zk.t()).to(kFloat).mul_(scale);
  auto lse = logsumexp(s, -1);
  auto p = (s - lse.unsqueeze(-1)).exp_().to(q2.scalar_type());
  auto out = res2.defined() ? addmm(res2, p, zv) : mm(p, zv);
  return {out, lse, return_probs ? p : empty({0}, q2.options())};
}

std::tuple<Tensor, Tensor, Tensor> knowledge_attention_fwd_cuda(
    const Tensor& q, const Tensor& z_key, const Tensor& z_value,
    const std::optional<Tensor>& residual, double scale, bool return_probs) {
  const auto sz = check_knowledge_attention(q, z_key, z_value, residual);
  const CUDAGuard guard(q.device());
  const auto lead = q.sizes().slice(0, q.dim() - 1);
  const auto q2 = as_rows(q, sz.N);
  const auto zk = z_key.contiguous(), zv = z_value.contiguous();
  const auto res2 = residual.has_value() ? as_rows(*residual, sz.N).contiguous() : Tensor();
  if (sz.K > kMaxFusedK && sz.N > 0) {
    auto [out, lse, probs] = fwd_large_k(q2, zk, zv, res2, scale, return_probs);
    return {out.view(leading_with(q, sz.dv)), lse.view(lead),
            return_probs ? probs.view(leading_with(q, sz.K)) : probs};
  }
  auto out = empty(leading_with(q, sz.dv), q.options());
  auto lse = empty(lead, q.options().dtype(kFloat));
  auto probs = return_probs ? empty(leading_with(q, sz.K), q.options()) : empty({0}, q.options());
  if (sz.N == 0) return {out, lse, probs};
  const int K = static_cast<int>(sz.K);
  const dim3 grid(static_cast<unsigned>((sz.N + kRows - 1) / kRows));
  auto stream = current_cuda_stream();
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(q.scalar_type(), "knowledge_attention_fwd_cuda", [&] {
    FwdParams<scalar_t> p{};
    p.q = q2.data_ptr<scalar_t>();
    p.ldq = q2.stride(0);
    p.z_key = zk.data_ptr<scalar_t>();
    p.z_value = zv.data_ptr<scalar_t>();
    p.residual = res2.defined() ? res2.data_ptr<scalar_t>() : nullptr;
    p.ldr = sz.dv;
    p.out = out.data_ptr<scalar_t>();
    p.lse = lse.data_ptr<float>();
    p.probs = return_probs ? probs.data_ptr<scalar_t>() : nullptr;
    p.N = sz.N, p.dk = sz.dk, p.dv = sz.dv, p.K = K;
    p.scale = static_cast<float>(scale);
    fwd_kernel<scalar_t><<<grid, kThreads, fwd_smem(K), stream>>>(p);
    DOE_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse, probs};
}

std::tuple<Tensor, Tensor, Tensor> knowledge_attention_bwd_cuda(
    const Tensor& grad_out, const Tensor& q, const Tensor& z_key, const Tensor& z_value,
    const Tensor& lse, const Tensor& probs /*checked; rebuilt from lse on CUDA*/, double scale) {
  const auto sz = check_knowledge_attention_bwd(grad_out, q, z_key, z_value, lse, probs);
  const CUDAGuard guard(q.device());
  auto dq = empty(q.sizes(), q.options());
  if (sz.N == 0) return {dq, zeros_like(z_key), zeros_like(z_value)};
  const auto q2 = as_rows(q, sz.N), g2 = grad_out.reshape({sz.N, sz.dv}).contiguous();
  const auto zk = z_key.contiguous(), zv = z_value.contiguous();
  const auto lse1 = lse.reshape({sz.N}).to(kFloat).contiguous();
  Tensor p, ds;
  if (sz.K > kMaxFusedK) {
    p = (mm(q2, zk.t()).to(kFloat).mul_(scale) - lse1.unsqueeze(-1)).exp_();
    auto dp = mm(g2, zv.t()).to(kFloat);
    ds = p * (dp - (p * dp).sum(-1, true));
    ds.mul_(scale);
    p = p.to(q.scalar_type());
    ds = ds.to(q.scalar_type());
    dq.view({sz.N, sz.dk}).copy_(mm(ds, zk));
  } else {
    p = empty({sz.N, sz.K}, q.options());
    ds = empty({sz.N, sz.K}, q.options());
    const int K = static_cast<int>(sz.K);
    const dim3 grid(static_cast<unsigned>((sz.N + kRows - 1) / kRows));
    auto stream = current_cuda_stream();
    DOE_DISPATCH_FLOATING_AND_HALF_TYPES(q.scalar_type(), "knowledge_attention_bwd_cuda", [&] {
      BwdParams<scalar_t> bp{};
      bp.grad_out = g2.data_ptr<scalar_t>();
      bp.q = q2.data_ptr<scalar_t>();
      bp.ldq = q2.stride(0);
      bp.z_key = zk.data_ptr<scalar_t>();
      bp.z_value = zv.data_ptr<scalar_t>();
      bp.lse = lse1.data_ptr<float>();
      bp.dq = dq.data_ptr<scalar_t>();
      bp.probs = p.data_ptr<scalar_t>();
      bp.ds = ds.data_ptr<scalar_t>();
      bp.N = sz.N, bp.dk = sz.dk, bp.dv = sz.dv, bp.K = K;
      bp.scale = static_cast<float>(scale);
      bwd_kernel<scalar_t><<<grid, kThreads, bwd_smem(K), stream>>>(bp);
      DOE_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dq, mm(ds.t(), q2), mm(p.t(), g2)};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CUDA, m) {
  m.impl("knowledge_attention_fwd", TORCH_BOX(&knowledge_attention_fwd_cuda));
  m.impl("knowledge_attention_bwd", TORCH_BOX(&knowledge_attention_bwd_cuda));
}

}  // namespace doe_ext
