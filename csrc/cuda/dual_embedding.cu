// CUDA dual embedding (DoE §3.3, Algorithm 1), forward and a deterministic backward.
//
// Forward: the ids are checked on the device (the first bad position of each kind goes into a
// flag tensor by an integer atomicMin, which is deterministic), the host reads the two flags and
// raises naming token_ids or topic_ids; then one CTA per token copies its two rows.
// Backward: a CUB radix sort (stable) of (id, position) pairs per table; then one CTA per table row
// finds its run of equal ids by binary search and sums the run's grad_out rows in position order,
// in float32, one thread per column: every row written once (zero when unused), no float atomics,
// bitwise the same on every run. Out-of-range ids (only possible when the backward op is called
// directly) are skipped, so the backward needs no host sync.
#include "doe_ext/tensor.h"

#include <algorithm>
#include <tuple>

#include "doe_ext/dual_embedding.h"
#include "doe_ext/sorted_runs.h"

namespace doe_ext {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGrid = 65535 * 32;  // rows handled per launch by a grid-stride loop beyond this

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid); }

// One call's arguments (flash-attention's Flash_fwd_params): the flat ids and the two tables, read
// by their strides (never copied: an expanded or strided table costs nothing extra).
template <typename T>
struct GatherParams {
  const int64_t* tok;  // [N]
  const int64_t* top;  // [N], -1: unlabeled
  int64_t N, V, K;
  const T* tw;         // token table [V, d], strides ts0, ts1
  int64_t ts0, ts1;
  const T* kw;         // topic table [K, dk], strides ks0, ks1
  int64_t ks0, ks1;
  int64_t d, dk;
  T* out;                        // [N, d + dk]
  unsigned long long* first_bad; // [2]: the first position of a bad token / topic id (INT64_MAX if none)
};

// One table's gradient: grad_table[r, c] = sum over r's run of grad[pos, col0 + c] (token order),
// or 0 (rows without a run, and row `skip`). keys / pos: the positions sorted by id.
template <typename T>
struct RunsParams {
  const T* grad;  // [n, ld]
  int64_t ld, col0, width;
  const int64_t* keys;
  const int64_t* pos;
  int64_t n, rows, skip;
  T* grad_table;  // [rows, width]
};

template <typename T>
__global__ void validate_kernel(const GatherParams<T> p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.N; i += int64_t(gridDim.x) * blockDim.x) {
    if (!de::token_id_ok(p.tok[i], p.V)) atomicMin(p.first_bad, static_cast<unsigned long long>(i));
    if (!de::topic_id_ok(p.top[i], p.K)) atomicMin(p.first_bad + 1, static_cast<unsigned long long>(i));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_kernel(const GatherParams<T> p) {
  const int64_t d = p.d, dk = p.dk;
  for (int64_t i = blockIdx.x; i < p.N; i += gridDim.x) {
    T* row = p.out + i * (d + dk);
    const T* t = p.tw + p.tok[i] * p.ts0;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) row[c] = t[c * p.ts1];
    if (p.top[i] >= 0) {
      const T* k = p.kw + p.top[i] * p.ks0;
      for (int64_t c = threadIdx.x; c < dk; c += blockDim.x) row[d + c] = k[c * p.ks1];
    } else {
      de::copy_row<T>(row + d, nullptr, threadIdx.x, dk, blockDim.x);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_runs_kernel(const RunsParams<T> p) {
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const int64_t lo = runs::lower_bound(p.keys, p.n, r);
    const int64_t hi = r == p.skip ? lo : runs::lower_bound(p.keys, p.n, r + 1);
    for (int64_t c = threadIdx.x; c < p.width; c += blockDim.x)
      p.grad_table[r * p.width + c] =
          static_cast<T>(de::reduce_run_column<float>(p.grad, p.ld, p.col0 + c, p.pos + lo, hi - lo));
  }
}

// Reads the two flags (one host sync) and raises at the first bad id, as the CPU does.
template <typename T>
void check_ids_on_device(GatherParams<T> p, const Tensor& tok, const Tensor& top) {
  auto flags = int64_tensor({INT64_MAX, INT64_MAX}, tok.device());
  p.first_bad = reinterpret_cast<unsigned long long*>(flags.data_ptr<int64_t>());
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((p.N + 255) / 256, 4096));
  validate_kernel<T><<<blocks, 256, 0, current_cuda_stream()>>>(p);
  DOE_CUDA_KERNEL_LAUNCH_CHECK();
  const auto host = flags.cpu();
  const int64_t bad_tok = host.data_ptr<int64_t>()[0], bad_top = host.data_ptr<int64_t>()[1];
  if (bad_tok == INT64_MAX && bad_top == INT64_MAX) return;
  if (bad_tok <= bad_top) fail_dual_embedding_id(false, bad_tok, tok[bad_tok].item<int64_t>(), p.V);
  fail_dual_embedding_id(true, bad_top, top[bad_top].item<int64_t>(), p.K);
}

Tensor dual_embedding_fwd_cuda(const Tensor& token_ids, const Tensor& topic_ids,
                               const Tensor& token_weight, const Tensor& topic_weight,
                               int64_t padding_idx) {
  const auto sz = check_dual_embedding(token_ids, topic_ids, token_weight, topic_weight);
  check_padding_idx(padding_idx, sz.V);
  const CUDAGuard guard(token_weight.device());
  auto shape = token_ids.sizes().vec();
  shape.push_back(sz.d + sz.dk);
  if (sz.N == 0) return empty(shape, token_weight.options());
  const auto tok = token_ids.reshape({-1}).contiguous(), top = topic_ids.reshape({-1}).contiguous();
  const auto& tw = token_weight;
  const auto& kw = topic_weight;
  auto out = empty({0}, token_weight.options());
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(tw.scalar_type(), "dual_embedding_fwd_cuda", [&] {
    GatherParams<scalar_t> p{tok.data_ptr<int64_t>(), top.data_ptr<int64_t>(), sz.N, sz.V, sz.K,
                             tw.const_data_ptr<scalar_t>(), tw.stride(0), tw.stride(1), kw.const_data_ptr<scalar_t>(),
                             kw.stride(0), kw.stride(1), sz.d, sz.dk, nullptr, nullptr};
    check_ids_on_device(p, tok, top);  // before the output is allocated
    out = empty(shape, token_weight.options());
    p.out = out.data_ptr<scalar_t>();
    gather_kernel<scalar_t><<<grid_for(sz.N), kThreads, 0, current_cuda_stream()>>>(p);
    DOE_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> dual_embedding_bwd_cuda(const Tensor& grad_out, const Tensor& token_ids,
                                                   const Tensor& topic_ids, const Tensor& token_weight,
                                                   const Tensor& topic_weight, int64_t padding_idx) {
  const auto sz = check_dual_embedding_bwd(grad_out, token_ids, topic_ids, token_weight, topic_weight, padding_idx);
  const CUDAGuard guard(token_weight.device());
  auto grad_tok = empty({sz.V, sz.d}, token_weight.options());
  auto grad_top = empty({sz.K, sz.dk}, token_weight.options());
  const auto g = grad_out.reshape({sz.N, sz.d + sz.dk}).contiguous();
  Tensor tok_keys, tok_pos, top_keys, top_pos;
  std::tie(tok_keys, tok_pos) = runs::sort_positions_by_key(token_ids);
  std::tie(top_keys, top_pos) = runs::sort_positions_by_key(topic_ids);  // -1 sorts first, in no run
  auto stream = current_cuda_stream();
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(g.scalar_type(), "dual_embedding_bwd_cuda", [&] {
    // The token table's columns are grad_out's first d, the topic table's the last dk.
    if (sz.V > 0 && sz.d > 0) {
      const RunsParams<scalar_t> p{g.data_ptr<scalar_t>(), sz.d + sz.dk, 0, sz.d, tok_keys.data_ptr<int64_t>(),
                                   tok_pos.data_ptr<int64_t>(), sz.N, sz.V, padding_idx,
                                   grad_tok.data_ptr<scalar_t>()};
      reduce_runs_kernel<scalar_t><<<grid_for(sz.V), kThreads, 0, stream>>>(p);
      DOE_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (sz.K > 0 && sz.dk > 0) {
      const RunsParams<scalar_t> p{g.data_ptr<scalar_t>(), sz.d + sz.dk, sz.d, sz.dk, top_keys.data_ptr<int64_t>(),
                                   top_pos.data_ptr<int64_t>(), sz.N, sz.K, -1, grad_top.data_ptr<scalar_t>()};
      reduce_runs_kernel<scalar_t><<<grid_for(sz.K), kThreads, 0, stream>>>(p);
      DOE_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_tok, grad_top};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CUDA, m) {
  m.impl("dual_embedding_fwd", TORCH_BOX(&dual_embedding_fwd_cuda));
  m.impl("dual_embedding_bwd", TORCH_BOX(&dual_embedding_bwd_cuda));
}

}  // namespace doe_ext
