// patch_gemm.h: the AVX-512 kernels (patch_gemm_avx2.cpp: the AVX2 ones), one per (rows, vectors) shape so that the
// accumulators live in registers.
#include "patch_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "patch_gemm_avx2.h"
#include "simd.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MCL_PATCH_X86 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace mcl::cpu::patch_gemm {

namespace {

template <typename T>
void pack_all(const T* w, int64_t D, int64_t K, T* dst) {
  // As 32-bit words: fp32 elements, or bf16 pairs (k, k + 1) -- the VNNI layout is the 32-bit transpose.
  simd::pack_panels32(w, D, K * static_cast<int64_t>(sizeof(T)) / 4, kPanel, dst);
}

}  // namespace

// fp32 panels for the AVX2 kernels: per channel (K in blocks of `block` = P*P rows), kPanel / avx2::kChunk sub-panels
// of [block][kChunk] each (patch_gemm_avx2.h). As 16-column panels of their own, looped over outermost by the
// callers, they measured 0.93-1.12x the patch-matrix path's embed_tokens against 1.09-1.23x as sub-panels (B = 16,
// D = 384, patch 16 and 32, one thread, AMD EPYC Zen 3, two runs each): the pixels are then read once per 64
// columns, not per 16. Per channel, a call's pixels (6 patches x P*P, 24 KiB at patch 32) stay in L1 across the
// panel's chunks, where all three channels (72 KiB) did not.
void pack(const float* w, int64_t D, int64_t K, int64_t block, float* dst) {
  if (isa() == Isa::kAvx2) {
    at::parallel_for(0, panels(D), 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) pack_panel(w, D, K, block, q, dst + q * K * kPanel);
    });
    return;
  }
  simd::pack_panels32(w, D, K, kPanel, dst);
}

void pack_panel(const float* w, int64_t D, int64_t K, int64_t block, int64_t q, float* dst) {
  if (isa() == Isa::kAvx2) {
    TORCH_CHECK(block > 0 && K % block == 0, "mcl_kernels: patch_gemm::pack_panel: K = ", K,
                " is not whole blocks of ", block);
    constexpr int64_t kSub = kPanel / avx2::kChunk;
    for (int64_t c = 0; c < K / block; ++c) {
      for (int64_t j = 0; j < kSub; ++j) {  // rows [c * block, (c + 1) * block) of sub-panel j
        float* sub = dst + (c * kSub + j) * block * avx2::kChunk;
        const int64_t d0 = q * kPanel + j * avx2::kChunk, n = std::min(avx2::kChunk, D - d0);
        if (n < avx2::kChunk) std::memset(sub, 0, sizeof(float) * block * avx2::kChunk);
        if (n > 0) simd::transpose32(w + d0 * K + c * block, K, n, block, sub, avx2::kChunk);
      }
    }
    return;
  }
  simd::pack_panel32(w, D, K, kPanel, q, dst);
}

void pack_panel(const c10::BFloat16* w, int64_t D, int64_t K, int64_t, int64_t q, c10::BFloat16* dst) {
  TORCH_CHECK(K % 2 == 0, "mcl_kernels: bf16 weight panels pair k, so K must be even");
  simd::pack_panel32(w, D, K / 2, kPanel, q, dst);
}

void pack(const c10::BFloat16* w, int64_t D, int64_t K, int64_t, c10::BFloat16* dst) {
  TORCH_CHECK(K % 2 == 0, "mcl_kernels: bf16 weight panels pair k, so K must be even");
  pack_all(w, D, K, dst);
}

bool reads(const at::Tensor& x, int64_t P) {
  return x.dim() == 4 && (x.stride(3) == 1 || x.size(3) <= 1) && available(x.scalar_type(), P);
}

#if defined(MCL_PATCH_X86)

// Only AVX-512F intrinsics: the bf16 dot product is inline assembly, which needs no target, and runs only where
// available() found AVX512-BF16.
#define MCL_AVX512F __attribute__((target("avx512f")))

namespace {

// One pixel (fp32) or pixel pair (bf16, as one 32-bit word) in every lane, loaded by an instruction of its own, so
// that the FMAs take register operands only: on an Intel Xeon with AVX-512 and AMX (two FMA ports), an FMA that
// reads an operand from memory ({1to16} broadcast or a full vector) ran at a third of the register form's rate (81-83
// against 247 GFLOP/s, 12 chains, one thread). 7 x 4 accumulators + 4 weight vectors + this one is a register more
// than AVX-512 has: GCC keeps one accumulator on the stack, which costs less there than folded broadcasts did
// (benchmarks/results/patch-gemm-broadcast-cpu-2core.txt).
MCL_AVX512F inline __m512 broadcast(const void* x) {
  __m512 b;
  asm("vbroadcastss %[x], %[b]" : [b] "=v"(b) : [x] "m"(*static_cast<const float*>(x)));
  return b;
}

MCL_AVX512F inline void fma(__m512& acc, __m512 w, __m512 x, float) { acc = _mm512_fmadd_ps(w, x, acc); }

// bf16: acc += x[0] * w[2i] + x[1] * w[2i + 1] per fp32 lane i (x: one pixel pair broadcast as a 32-bit word).
MCL_AVX512F inline void fma(__m512& acc, __m512 w, __m512 x, c10::BFloat16) {
  asm("vdpbf16ps %[x], %[w], %[acc]" : [acc] "+v"(acc) : [w] "v"(w), [x] "v"(x));
}

// R rows x V vectors of output; `last` masks the last vector's columns. fp32 walks k one at a time; bf16 in
// pairs (v, v + 1), adjacent pixels of one image row, against a VNNI panel (kPanel pairs per pair row).
template <typename T, int R, int V>
MCL_AVX512F void kernel(const T* const* px, int64_t sC, int64_t sH, int64_t P, int64_t C, const T* b, __mmask16 last,
                        const float* init, int64_t ldi, float* out, int64_t ldo) {
  constexpr int64_t kStep = sizeof(float) / sizeof(T);  // k per weight row of the panel: 1, or 2 (bf16 pairs)
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      acc[r][v] = v == V - 1 ? _mm512_maskz_loadu_ps(last, init + r * ldi + 16 * v)
                             : _mm512_loadu_ps(init + r * ldi + 16 * v);
    }
  }
  const int64_t ahead = (kAheadSteps * kStep + P - 1) / P;  // image rows
  const T* a[R];  // the patches' origins, in registers through the loop
  for (int r = 0; r < R; ++r) a[r] = px[r];
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t u = 0; u < P; ++u) {
      prefetch_row<T, R>(a, sC, sH, P, C, c, u + ahead);
      const int64_t o = c * sC + u * sH;  // patch r's pixel v: a[r][o + v]
      const T* bk = b + (c * P + u) * P * kPanel;
      for (int64_t q = 0; q < P; q += kStep, bk += kStep * kPanel) {
        __m512 w[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) w[v] = _mm512_loadu_ps(bk + 16 * kStep * v);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) __builtin_prefetch(bk + (kWeightAheadSteps * kPanel + 16 * v) * kStep, 0, 3);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 x = broadcast(a[r] + o + q);
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) fma(acc[r][v], w[v], x, T());
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if (v == V - 1) {
        _mm512_mask_storeu_ps(out + r * ldo + 16 * v, last, acc[r][v]);
      } else {
        _mm512_storeu_ps(out + r * ldo + 16 * v, acc[r][v]);
      }
    }
  }
}

template <typename T>
using Kernel = void (*)(const T* const*, int64_t, int64_t, int64_t, int64_t, const T*, __mmask16, const float*,
                        int64_t, float*, int64_t);

template <typename T>
Kernel<T> table(int64_t rows, int64_t vectors) {
  return instance<kMaxRows>(rows, [vectors](auto r) {
    return instance<kPanel / 16>(vectors, [](auto v) -> Kernel<T> {
      return kernel<T, decltype(r)::value, decltype(v)::value>;
    });
  });
}

template <typename T>
void dispatch(const T* const* px, int64_t sC, int64_t sH, int64_t P, int64_t C, int64_t rows, const T* b,
              int64_t cols, const float* init, int64_t ldi, float* out, int64_t ldo) {
  TORCH_CHECK(isa() == Isa::kAvx512 && rows >= 1 && rows <= kMaxRows && cols >= 1 && cols <= kPanel,
              "mcl_kernels: patch_gemm's AVX-512 kernels called outside their contract");
  const int64_t vectors = (cols + 15) / 16, tail = cols - 16 * (vectors - 1);
  const auto last = static_cast<__mmask16>(tail >= 16 ? 0xFFFF : (1u << tail) - 1);
  table<T>(rows, vectors)(px, sC, sH, P, C, b, last, init, ldi, out, ldo);
}

// Weight gradient: R rows x 4 vectors of dE in registers, the token loop inside; per token, 4 pixel vectors and R
// broadcasts of the gradient (each by its own load: see broadcast()). The call's sum starts from zero and is added
// to `out` at the end, as brgemm's is: one FMA chain through every token of the batch had 4-8x the error (B = 64,
// D = 384). No
// software prefetch: fetching the pixels 32 tokens ahead, or the next run's pixels spread over the calls before it,
// measured the same (one thread, all of dE's rows, x streamed from memory: 89-93% of the FMA limit either way,
// 97-98% with x in cache); on the Intel Xeon, 8 or 32 tokens ahead: the training step 0.994-0.995x, paired.
template <int R>
MCL_AVX512F void weight_grad_kernel(const float* a, int64_t lda, const float* const* tok, int64_t n,
                                    const int64_t* off, float* out, int64_t ldo) {
  static_assert(kPanel == 64, "4 vectors of 16 pixels per token");
  __m512 acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t o0 = off[0], o1 = off[1], o2 = off[2], o3 = off[3];
  for (int64_t s = 0; s < n; ++s) {
    const float* t = tok[s];
    const __m512 w[4] = {_mm512_loadu_ps(t + o0), _mm512_loadu_ps(t + o1), _mm512_loadu_ps(t + o2),
                         _mm512_loadu_ps(t + o3)};
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = broadcast(a + s * lda + r);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) fma(acc[r][v], w[v], x, 0.0f);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      _mm512_storeu_ps(out + r * ldo + 16 * v, _mm512_add_ps(_mm512_loadu_ps(out + r * ldo + 16 * v), acc[r][v]));
    }
  }
}

using WeightGradKernel = void (*)(const float*, int64_t, const float* const*, int64_t, const int64_t*, float*,
                                  int64_t);

WeightGradKernel weight_grad_table(int64_t rows) {
  return instance<kMaxRows>(rows, [](auto r) -> WeightGradKernel {
    return weight_grad_kernel<decltype(r)::value>;
  });
}

}  // namespace

void run_weight_grad(const float* a, int64_t lda, int64_t rows, const float* const* tok, int64_t n,
                     const int64_t* off, float* out, int64_t ldo) {
  TORCH_CHECK(available(c10::kFloat, 16) && rows >= 1 && rows <= max_rows() && n >= 0,
              "mcl_kernels: patch_gemm::run_weight_grad called outside its contract");
  if (isa() == Isa::kAvx2) {
    avx2::run_weight_grad(a, lda, rows, tok, n, off, out, ldo);
    return;
  }
  weight_grad_table(rows)(a, lda, tok, n, off, out, ldo);
}

namespace {

Isa detected() {
  static const Isa isa = __builtin_cpu_supports("avx512f")                                     ? Isa::kAvx512
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2
                                                                                               : Isa::kNone;
  return isa;
}

std::atomic<Isa>& selected() {
  static std::atomic<Isa> isa{detected()};
  return isa;
}

}  // namespace

Isa isa() { return selected().load(std::memory_order_relaxed); }

Isa detected_isa() { return detected(); }

void set_isa(Isa want) {
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(detected()), "mcl_kernels: patch_gemm cannot run ",
              isa_name(want), " kernels on this CPU (it has ", isa_name(detected()), ")");
  selected().store(want, std::memory_order_relaxed);
}

bool available(c10::ScalarType dtype, int64_t P) {
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  if (dtype == c10::kFloat) return isa() != Isa::kNone;
  return dtype == c10::kBFloat16 && isa() == Isa::kAvx512 && bf16 && P % 2 == 0;
}

namespace {

// One AVX-512 kernel call: `rows` patches by `cols` columns of one panel, all of K.
void run_call(const float* const* px, int64_t sC, int64_t sH, int64_t P, int64_t C, int64_t rows, const float* b,
              int64_t cols, const float* init, int64_t ldi, float* out, int64_t ldo) {
  dispatch(px, sC, sH, P, C, rows, b, cols, init, ldi, out, ldo);
}

void run_call(const c10::BFloat16* const* px, int64_t sC, int64_t sH, int64_t P, int64_t C, int64_t rows,
              const c10::BFloat16* b, int64_t cols, const float* init, int64_t ldi, c10::BFloat16* out, int64_t ldo) {
  float sums[kMaxRows * kPanel];  // the block's fp32 sums, rounded once into the output
  dispatch(px, sC, sH, P, C, rows, b, cols, init, ldi, sums, kPanel);
  for (int64_t r = 0; r < rows; ++r) simd::to_bf16(sums + r * kPanel, out + r * ldo, cols);
}

template <typename T>
void runs_dispatch(const Run<T>* runs, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C, const T* w, int64_t D,
                   int64_t q0, int64_t q1, int64_t ldi, int64_t ldo) {
  TORCH_CHECK(available(c10::CppTypeToScalarType<T>::value, P) && n >= 0 && 0 <= q0 && q0 <= q1 && q1 <= panels(D),
              "mcl_kernels: patch_gemm::run_runs called outside its contract (", n, " runs, panels [", q0, ", ", q1,
              ") of ", panels(D), ", ", c10::CppTypeToScalarType<T>::value, " patch ", P, " on ", isa_name(isa()),
              ")");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(runs[i].rows >= 1 && runs[i].rows <= max_rows(), "mcl_kernels: patch_gemm::run_runs: a run of ",
                runs[i].rows, " patches (1 to ", max_rows(), " expected)");
  }
  if constexpr (std::is_same_v<T, float>) {
    if (isa() == Isa::kAvx2) return avx2::run_runs(runs, n, sC, sH, P, C, w, D, q0, q1, ldi, ldo);
  }
  const int64_t K = C * P * P;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t d0 = q * kPanel, cols = std::min(kPanel, D - d0);
    for (int64_t i = 0; i < n; ++i) {
      run_call(runs[i].px, sC, sH, P, C, runs[i].rows, w + q * K * kPanel, cols, runs[i].init + d0, ldi,
               runs[i].out + d0, ldo);
    }
  }
}

}  // namespace

void run_runs(const Run<float>* runs, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C, const float* w,
              int64_t D, int64_t q0, int64_t q1, int64_t ldi, int64_t ldo) {
  runs_dispatch(runs, n, sC, sH, P, C, w, D, q0, q1, ldi, ldo);
}

void run_runs(const Run<c10::BFloat16>* runs, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C,
              const c10::BFloat16* w, int64_t D, int64_t q0, int64_t q1, int64_t ldi, int64_t ldo) {
  runs_dispatch(runs, n, sC, sH, P, C, w, D, q0, q1, ldi, ldo);
}

#else

Isa isa() { return Isa::kNone; }
Isa detected_isa() { return Isa::kNone; }
void set_isa(Isa want) {
  TORCH_CHECK(want == Isa::kNone, "mcl_kernels: patch_gemm has no ", isa_name(want), " kernels on this CPU");
}
bool available(c10::ScalarType, int64_t) { return false; }

void run_weight_grad(const float*, int64_t, int64_t, const float* const*, int64_t, const int64_t*, float*,
                     int64_t) {
  TORCH_CHECK(false, "mcl_kernels: patch_gemm needs an x86-64 CPU with AVX2 and FMA, or AVX-512F");
}

void run_runs(const Run<float>*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
              int64_t, int64_t) {
  TORCH_CHECK(false, "mcl_kernels: patch_gemm needs an x86-64 CPU with AVX2 and FMA, or AVX-512F");
}

void run_runs(const Run<c10::BFloat16>*, int64_t, int64_t, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t,
              int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "mcl_kernels: patch_gemm needs an x86-64 CPU with AVX512-BF16");
}

#endif

}  // namespace mcl::cpu::patch_gemm
