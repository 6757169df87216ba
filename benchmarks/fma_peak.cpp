// The CPU's fp32 FMA throughput, measured: the hardware roofline that the GEMM-bound CPU kernels are held to.
//
// benchmarks/kernels.py reports each row against the measured torch.mm peak, which is itself a GEMM and so
// already below the machine's arithmetic limit; this loop measures that limit. Each thread runs 12 independent
// chains of 16-lane fused multiply-adds (enough to cover the FMA latency), for 1 thread and for every thread.
//
// A second loop measures what a GEMM micro-kernel can reach when its operands come from L1: a register block of
// 6 rows x 4 vectors of accumulators (with the 4 operand vectors and a broadcast, 29 of the 32 registers: nothing
// spills), each k step loading 4 vectors of one operand and broadcasting 6 scalars of the other, each by a load of
// its own (as csrc/cpu/patch_gemm.cpp does: on some Intel CPUs an FMA with a memory operand runs at a third of the
// rate). On the Intel Xeon of 2026-11-25 this loop ran at 86-93% of the FMA loop over five runs (a throwaway
// variant, every block from 6 x 4 to 14 x 2: 82-86%; 24 x 1: 72%): the ceiling of a load-fed GEMM there, not of one
// kernel. torch.mm reached 77-80% of the FMA loop on large shapes, one thread.
//
//   g++ -O2 -mavx512f -mfma -pthread benchmarks/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
//
// Output: one line per loop and thread count, GFLOP/s (2 FLOPs per lane per FMA), best of five runs.
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

// One scalar in every lane, by a load of its own (so the compiler cannot fold it into the FMA as a memory operand).
inline __m512 broadcast(const float* x) {
  __m512 b;
  asm volatile("vbroadcastss %[x], %[b]" : [b] "=v"(b) : [x] "m"(*x));
  return b;
}

constexpr int kRows = 6, kVectors = 4;
constexpr long kFedIters = kIters * kChains / (kRows * kVectors);  // as many FMAs as chains()

// acc[r][v] += w[k][v] * a[k][r] over k, with w's rows (4 vectors) and a's (6 scalars) cycling through 64 k steps
// of L1-resident operands.
float fed(long iters) {
  alignas(64) static thread_local float w[64][kVectors * 16];
  alignas(64) static thread_local float a[64][16];
  for (int k = 0; k < 64; ++k) {
    for (int j = 0; j < kVectors * 16; ++j) w[k][j] = 1.0f - 1e-7f * j;
    for (int r = 0; r < 16; ++r) a[k][r] = 1e-7f * (r + 1);
  }
  __m512 acc[kRows][kVectors];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_set1_ps(1.0f);
  }
  for (long it = 0; it < iters; ++it) {
    const float* wk = w[it & 63];
    const float* ak = a[it & 63];
    __m512 wv[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) wv[v] = _mm512_load_ps(wk + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = broadcast(ak + r);
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) acc[r][v] = _mm512_fmadd_ps(wv[v], x, acc[r][v]);
    }
  }
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) sum = _mm512_add_ps(sum, acc[r][v]);
  }
  return _mm512_reduce_add_ps(sum);
}

double gflops(int threads, bool fed_loop) {
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&sink, t, fed_loop] { sink[t] = fed_loop ? fed(kFedIters) : chains(kIters); });
  }
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (sink[0] == 0.0f) std::printf("(unexpected zero)\n");
  const double fmas = fed_loop ? static_cast<double>(kFedIters) * kRows * kVectors : static_cast<double>(kIters) * kChains;
  return threads * fmas * 16 * 2 / s / 1e9;
}

}  // namespace

int main() {
  const int all = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  double peak[2] = {0, 0};
  for (int fed_loop = 0; fed_loop < 2; ++fed_loop) {
    for (int i = 0; i < 2; ++i) {
      const int threads = i == 0 ? 1 : all;
      if (i == 1 && all == 1) break;
      double best = 0;
      for (int run = 0; run < 5; ++run) best = std::max(best, gflops(threads, fed_loop));
      const char* s = threads == 1 ? "" : "s";
      if (!fed_loop) {
        peak[i] = best;
        std::printf("fp32 FMA peak, %d thread%s: %.1f GFLOP/s\n", threads, s, best);
      } else {
        std::printf("fp32 6x4 FMA block fed from L1, %d thread%s: %.1f GFLOP/s (%.1f%% of the FMA peak)\n", threads,
                    s, best, 100 * best / peak[i]);
      }
    }
  }
  return 0;
}
