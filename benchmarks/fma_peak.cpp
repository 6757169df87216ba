// The CPU's fp32 FMA throughput, measured: the hardware roofline that the GEMM-bound CPU kernels are held to.
//
// benchmarks/kernels.py reports each row against the measured torch.mm peak, which is itself a GEMM and so
// already below the machine's arithmetic limit; this loop measures that limit. Each thread runs 12 independent
// chains of 16-lane fused multiply-adds (enough to cover the FMA latency), for 1 thread and for every thread.
//
//   g++ -O2 -mavx512f -mfma -pthread benchmarks/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
//
// Output: one line per thread count, GFLOP/s (2 FLOPs per lane per FMA), best of five runs.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 12;
constexpr long kIters = 100000000;

float chains(long iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + i * 1e-7f);
  const __m512 mul = _mm512_set1_ps(0.9999999f), add = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], mul, add);
  }
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);  // used, so the loop is not optimized away
}

double gflops(int threads) {
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&sink, t] { sink[t] = chains(kIters); });
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (sink[0] == 0.0f) std::printf("(unexpected zero)\n");
  return threads * static_cast<double>(kIters) * kChains * 16 * 2 / s / 1e9;
}

}  // namespace

int main() {
  const int all = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int threads : {1, all}) {
    double best = 0;
    for (int run = 0; run < 5; ++run) best = std::max(best, gflops(threads));
    std::printf("fp32 FMA peak, %d thread%s: %.1f GFLOP/s\n", threads, threads == 1 ? "" : "s", best);
    if (all == 1) break;
  }
  return 0;
}
