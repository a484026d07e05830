// A/B of decode_linear's row loop at batch 1, side by side in one process: the GEMVs of one decoding
// step of SmolLM2-135M (30 layers of q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536, and the
// 49152x576 head; 538 MB of float32), each split over 2 OpenMP threads as at::parallel_for splits it,
//   before: one weight row at a time (dl::dot1 per row: decode_linear before d0d9699),
//   after:  dl::rows, four weight rows per pass, one from each quarter of a thread's range,
// interleaved over 15 rounds (which goes first alternates), beside the read bandwidth of a 2-thread sum
// of 1 GiB (one stream per thread) measured in each round. Both use the kernel's own header, built for
// the host's ISA as the op is. Raw results: benchmarks/results/ab-gemv-streams-*.log.
//
//   g++ -O3 -fopenmp -fopenmp-simd -fno-trapping-math -Icsrc/include benchmarks/ab_gemv_streams.cpp -o /tmp/ab && /tmp/ab
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <utility>
#include <vector>

#include "doe_ext/decode_linear_rows.h"

using doe_ext::dl::dot1;

DOE_CLONES void before(const float* w, const float* x, float* out, int64_t in, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) out[o] = dot1(w + o * in, x, in);
}
DOE_CLONES void after(const float* w, const float* x, float* out, int64_t in, int64_t out_rows, int64_t o0,
                      int64_t o1) {
  doe_ext::dl::rows(w, x, static_cast<const float*>(nullptr), out, 1, in, out_rows, o0, o1);
}
DOE_CLONES float sum(const float* w, int64_t n) {
  float a = 0;
  DOE_SIMD_REDUCE(+, a)
  for (int64_t i = 0; i < n; ++i) a += w[i];
  return a;
}

struct Weight {
  int64_t out, in;
  std::vector<float> w;
};

static double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main() {
  std::vector<Weight> ws;
  const std::pair<int64_t, int64_t> layer[] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
  for (int l = 0; l < 30; ++l)
    for (auto [o, i] : layer) ws.push_back({o, i, std::vector<float>(o * i, 0.01f)});
  ws.push_back({49152, 576, std::vector<float>(49152 * 576, 0.01f)});
  std::vector<float> big(int64_t{1} << 28, 1.0f), x(1536, 0.5f), y(49152);
  double bytes = 0;
  for (const auto& w : ws) bytes += 4.0 * w.out * w.in;

  auto step = [&](bool streams) {
    for (const auto& w : ws) {
#pragma omp parallel num_threads(2)
      {
        const int64_t half = (w.out + 1) / 2, o0 = omp_get_thread_num() * half, o1 = std::min(w.out, o0 + half);
        if (streams) after(w.w.data(), x.data(), y.data(), w.in, w.out, o0, o1);
        else before(w.w.data(), x.data(), y.data(), w.in, o0, o1);
      }
    }
  };
  auto bandwidth = [&] {
    const int64_t chunk = static_cast<int64_t>(big.size()) / 64;
    double s = 0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(2) reduction(+ : s)
    for (int c = 0; c < 64; ++c) s += sum(big.data() + c * chunk, chunk);
    const double t = seconds(t0);
    return s > 0 ? 4.0 * big.size() / t : 0.0;
  };
  step(false), step(true), bandwidth();  // fault the pages in
  std::vector<double> t_before, t_after, bw;
  for (int r = 0; r < 15; ++r) {
    bw.push_back(bandwidth());
    for (const bool streams : {r % 2 == 1, r % 2 == 0}) {  // which goes first alternates
      const auto t0 = std::chrono::steady_clock::now();
      step(streams);
      (streams ? t_after : t_before).push_back(seconds(t0));
    }
  }
  const double b = median(bw), tb = median(t_before), ta = median(t_after);
  std::printf("weights %.0f MB; sum reads %.1f GB/s: floor %.2f ms | before %.2f ms (%.2fx) | after %.2f ms (%.2fx) "
              "| after / before %.3f\n",
              bytes / 1e6, b / 1e9, 1e3 * bytes / b, 1e3 * tb, tb * b / bytes, 1e3 * ta, ta * b / bytes, ta / tb);
}
