// The CPU's fp32 FMA throughput, measured: the hardware roofline that the GEMM-bound CPU kernels are held to.
//
// benchmarks/kernels.py reports each row against the measured torch.mm peak, which is itself a GEMM and so
// already below the machine's arithmetic limit; this loop measures that limit. Each thread runs 12 independent
// chains of fused multiply-adds (enough to cover the FMA latency), for 1 thread and for every thread, with the
// widest vectors the CPU has: AVX-512 (16 lanes) where it has AVX-512F, else AVX2 + FMA (8 lanes); both are
// compiled in (target attributes) and picked at run time, so one build runs on either.
//
// A second loop measures what a GEMM micro-kernel can reach when its operands come from L1: a register block of
// 6 rows x V vectors of accumulators (AVX-512: 6 x 4, with the 4 operand vectors and a broadcast 29 of the 32
// registers; AVX2: 6 x 2, 15 of 16, csrc/cpu/patch_gemm_avx2.h's shape), each k step loading V vectors of one
// operand and broadcasting 6 scalars of the other, each by a load of its own (as csrc/cpu/patch_gemm.cpp does: on
// some Intel CPUs an FMA with a memory operand runs at a third of the rate). On the Intel Xeon of 2026-11-25 the
// 6 x 4 loop ran at 86-93% of the FMA loop over five runs (a throwaway variant, every block from 6 x 4 to 14 x 2:
// 82-86%; 24 x 1: 72%): the ceiling of a load-fed GEMM there, not of one kernel. torch.mm reached 77-80% of the FMA
// loop on large shapes, one thread.
//
//   g++ -O2 -pthread benchmarks/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
//
// Output: one line per loop and thread count, GFLOP/s (2 FLOPs per lane per FMA), best of five runs, naming the
// instruction set.
#include <immintrin.h>

// The vector helpers return vectors of their own target, always inlined into a function of that target (flatten,
// below), so the ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 12;
constexpr long kIters = 100000000;
constexpr int kRows = 6;

#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2,fma")))

// The vector operations the loops need, for each instruction set.
struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16, kVectors = 4;
  static constexpr const char* kName = "avx512";
  AVX512 static V set1(float v) { return _mm512_set1_ps(v); }
  AVX512 static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  AVX512 static V add(V a, V b) { return _mm512_add_ps(a, b); }
  AVX512 static V load(const float* p) { return _mm512_load_ps(p); }
  AVX512 static float sum(V v) { return _mm512_reduce_add_ps(v); }
  // One scalar in every lane, by a load of its own (so the compiler cannot fold it into the FMA as an operand).
  AVX512 static V broadcast(const float* x) {
    V b;
    asm volatile("vbroadcastss %[x], %[b]" : [b] "=v"(b) : [x] "m"(*x));
    return b;
  }
};

struct Avx2 {
  using V = __m256;
  static constexpr int kLanes = 8, kVectors = 2;
  static constexpr const char* kName = "avx2";
  AVX2 static V set1(float v) { return _mm256_set1_ps(v); }
  AVX2 static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  AVX2 static V load(const float* p) { return _mm256_load_ps(p); }
  AVX2 static float sum(V v) {
    alignas(32) float l[8];
    _mm256_store_ps(l, v);
    float s = 0;
    for (float x : l) s += x;
    return s;
  }
  AVX2 static V broadcast(const float* x) {
    V b;
    asm volatile("vbroadcastss %[x], %[b]" : [b] "=x"(b) : [x] "m"(*x));
    return b;
  }
};

template <typename I>
float chains(long iters) {
  typename I::V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = I::set1(1.0f + i * 1e-7f);
  const typename I::V mul = I::set1(0.9999999f), add = I::set1(1e-7f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = I::fmadd(acc[i], mul, add);
  }
  typename I::V sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = I::add(sum, acc[i]);
  return I::sum(sum);  // used, so the loop is not optimized away
}

template <typename I>
constexpr long fed_iters() {
  return kIters * kChains / (kRows * I::kVectors);  // as many FMAs as chains()
}

// acc[r][v] += w[k][v] * a[k][r] over k, with w's rows (kVectors vectors) and a's (6 scalars) cycling through 64 k
// steps of L1-resident operands.
template <typename I>
float fed(long iters) {
  constexpr int kV = I::kVectors, kW = kV * I::kLanes;
  alignas(64) static thread_local float w[64][kW];
  alignas(64) static thread_local float a[64][16];
  for (int k = 0; k < 64; ++k) {
    for (int j = 0; j < kW; ++j) w[k][j] = 1.0f - 1e-7f * j;
    for (int r = 0; r < 16; ++r) a[k][r] = 1e-7f * (r + 1);
  }
  typename I::V acc[kRows][kV];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) acc[r][v] = I::set1(1.0f);
  }
  for (long it = 0; it < iters; ++it) {
    const float* wk = w[it & 63];
    const float* ak = a[it & 63];
    typename I::V wv[kV];
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) wv[v] = I::load(wk + I::kLanes * v);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const typename I::V x = I::broadcast(ak + r);
#pragma GCC unroll 4
      for (int v = 0; v < kV; ++v) acc[r][v] = I::fmadd(wv[v], x, acc[r][v]);
    }
  }
  typename I::V sum = I::set1(0.0f);
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < kV; ++v) sum = I::add(sum, acc[r][v]);
  }
  return I::sum(sum);
}

// The loops compiled for each instruction set: flatten inlines the templates and the ISA's vector operations into
// a function of that target, so nothing is called through a vector argument.
AVX512 __attribute__((flatten)) float chains_avx512(long iters) { return chains<Avx512>(iters); }
AVX512 __attribute__((flatten)) float fed_avx512(long iters) { return fed<Avx512>(iters); }
AVX2 __attribute__((flatten)) float chains_avx2(long iters) { return chains<Avx2>(iters); }
AVX2 __attribute__((flatten)) float fed_avx2(long iters) { return fed<Avx2>(iters); }

template <typename I>
float run_loop(bool fed_loop, long iters) {
  if constexpr (I::kLanes == 16) {
    return fed_loop ? fed_avx512(iters) : chains_avx512(iters);
  } else {
    return fed_loop ? fed_avx2(iters) : chains_avx2(iters);
  }
}

template <typename I>
double gflops(int threads, bool fed_loop) {
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&sink, t, fed_loop] { sink[t] = run_loop<I>(fed_loop, fed_loop ? fed_iters<I>() : kIters); });
  }
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (sink[0] == 0.0f) std::printf("(unexpected zero)\n");
  const double fmas = fed_loop ? static_cast<double>(fed_iters<I>()) * kRows * I::kVectors
                               : static_cast<double>(kIters) * kChains;
  return threads * fmas * I::kLanes * 2 / s / 1e9;
}

template <typename I>
void report() {
  const int all = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  double peak[2] = {0, 0};
  for (int fed_loop = 0; fed_loop < 2; ++fed_loop) {
    for (int i = 0; i < 2; ++i) {
      const int threads = i == 0 ? 1 : all;
      if (i == 1 && all == 1) break;
      double best = 0;
      for (int run = 0; run < 5; ++run) best = std::max(best, gflops<I>(threads, fed_loop));
      const char* s = threads == 1 ? "" : "s";
      if (!fed_loop) {
        peak[i] = best;
        std::printf("fp32 FMA peak (%s), %d thread%s: %.1f GFLOP/s\n", I::kName, threads, s, best);
      } else {
        std::printf("fp32 6x%d FMA block fed from L1 (%s), %d thread%s: %.1f GFLOP/s (%.1f%% of the FMA peak)\n",
                    I::kVectors, I::kName, threads, s, best, 100 * best / peak[i]);
      }
    }
  }
}

}  // namespace

int main() {
  if (__builtin_cpu_supports("avx512f")) {
    report<Avx512>();
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    report<Avx2>();
  } else {
    std::printf("this CPU has neither AVX-512F nor AVX2 + FMA: no vector FMA loop to time\n");
    return 1;
  }
  return 0;
}
