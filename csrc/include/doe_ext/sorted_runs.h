// Deterministic reductions by key (dual_embedding's table gradients, multi_lora_linear's expert
// gradients): sort (key, position) pairs stably, then each output row finds its run of equal keys
// by binary search and sums the run in position order. No atomics, no host sync.
#pragma once

#include <stdint.h>

#include "doe_ext/math.h"

#ifdef __CUDACC__
#include "doe_ext/tensor.h"

#include <cub/cub.cuh>  // inside namespace doe_ext_cub (CUB_WRAPPED_NAMESPACE, set by CMake)
#endif

namespace doe_ext {
namespace runs {

// First i in [0, n) with a[i] >= v (n if none), for a sorted ascending.
DOE_HD int64_t lower_bound(const int64_t* a, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

#ifdef __CUDACC__
__global__ void iota_kernel(int64_t* out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) out[i] = i;
}

// keys (int64, any values, -1 included) sorted ascending with their positions 0..n-1 carried
// along; CUB's radix sort is stable, so equal keys keep position order. Returns (keys, positions).
inline std::pair<Tensor, Tensor> sort_positions_by_key(const Tensor& keys) {
  const int64_t n = keys.numel();
  const auto keys_in = keys.reshape({-1}).contiguous();
  auto pos_in = empty({n}, keys_in.options());
  auto keys_out = empty_like(keys_in), pos_out = empty_like(pos_in);
  if (n == 0) return {keys_out, pos_out};
  DOE_CHECK(n <= INT32_MAX, "sort_positions_by_key: more than 2^31 - 1 ids (", n, ") in one call");
  auto stream = current_cuda_stream();
  iota_kernel<<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(
      pos_in.data_ptr<int64_t>(), n);
  DOE_CUDA_KERNEL_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  DOE_CUDA_CHECK(CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, keys_in.data_ptr<int64_t>(), keys_out.data_ptr<int64_t>(), pos_in.data_ptr<int64_t>(),
      pos_out.data_ptr<int64_t>(), static_cast<int>(n), 0, 64, stream));
  auto temp = empty({static_cast<int64_t>(temp_bytes)}, keys_in.options().dtype(kByte));
  DOE_CUDA_CHECK(CUB_NS_QUALIFIER::DeviceRadixSort::SortPairs(
      temp.data_ptr(), temp_bytes, keys_in.data_ptr<int64_t>(), keys_out.data_ptr<int64_t>(),
      pos_in.data_ptr<int64_t>(), pos_out.data_ptr<int64_t>(), static_cast<int>(n), 0, 64, stream));
  return {keys_out, pos_out};
}
#endif

}  // namespace runs
}  // namespace doe_ext
