// patch_gemm_avx2.h: the AVX2 + FMA kernels, compiled through target attributes and run only where
// patch_gemm::isa() is AVX2.
#include "patch_gemm_avx2.h"

#include <algorithm>
#include <vector>

#include <c10/util/Exception.h>

#include "patch_gemm.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MCL_PATCH_AVX2 1
#include "avx2_block.h"
#endif

namespace mcl::cpu::patch_gemm::avx2 {

#if defined(MCL_PATCH_AVX2)

namespace {

constexpr int kRows = static_cast<int>(kMaxRowsAvx2);  // accumulator rows per kernel call
static_assert(kPanel % kChunk == 0, "a panel is whole chunks");

using avx2_block::lanes;

// R rows x V vectors (8 columns each) of one chunk over one channel: px[r] points at patch r's pixel (c, 0, 0), b at
// the chunk's sub-panel for channel c ([P*P][kChunk]). As patch_gemm.cpp's AVX-512 kernel: init, then one FMA per k
// in k order, the pixels prefetched ahead (within the channel); but not the
// weight: its sub-panel is one sequential stream, and prefetching it 16 rows ahead as the AVX-512 kernel does cost
// 85.7 -> 69.1 GFLOP/s (6 rows x 64 columns, patch 32, one thread, AMD EPYC Zen 3, FMA limit 101.5; without the
// pixel prefetch too: 77.0).
template <int R, int V>
MCL_AVX2 void kernel(const float* const* px, int64_t sH, int64_t P, const float* b, __m256i last,
                     const float* init, int64_t ldi, float* out, int64_t ldo) {
  __m256 acc[R][V];
  avx2_block::load_block(acc, init, ldi, last);
  const int64_t ahead = (kAheadSteps + P - 1) / P;  // image rows
  const float* a[R];  // the patches' rows, in registers through the loop
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) a[r] = px[r];
  for (int64_t u = 0; u < P; ++u) {
    prefetch_row<float, R>(a, 0, sH, P, 1, 0, u + ahead);  // no row past P: the channel's next call is far off
    const int64_t o = u * sH;  // patch r's pixel q: a[r][o + q]
    const float* bk = b + u * P * kChunk;
    for (int64_t q = 0; q < P; ++q, bk += kChunk) {
      avx2_block::fma_step(acc, bk, [&](int r) { return a[r] + o + q; });
    }
  }
  avx2_block::store_block(acc, out, ldo, last);
}

using Kernel = void (*)(const float* const*, int64_t, int64_t, const float*, __m256i, const float*, int64_t, float*,
                        int64_t);

Kernel table(int64_t rows, int64_t vectors) {
  return instance<kRows>(rows, [vectors](auto r) {
    return instance<kChunk / 8>(vectors, [](auto v) -> Kernel {
      return kernel<decltype(r)::value, decltype(v)::value>;
    });
  });
}

// Weight gradient: R rows x 16 columns (one run of 16 pixels at tok[s] + o) of dE, the token loop inside; as the
// AVX-512 kernel, the call's sum starts from zero and is added to out at the end.
template <int R>
MCL_AVX2 void weight_grad_kernel(const float* a, int64_t lda, const float* const* tok, int64_t n, int64_t o,
                                 float* out, int64_t ldo) {
  __m256 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t s = 0; s < n; ++s) {
    avx2_block::fma_step(acc, tok[s] + o, [&](int r) { return a + s * lda + r; });
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* dst = out + r * ldo;
    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc[r][0]));
    _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), acc[r][1]));
  }
}

using WeightGradKernel = void (*)(const float*, int64_t, const float* const*, int64_t, int64_t, float*, int64_t);

WeightGradKernel weight_grad_table(int64_t rows) {
  return instance<kRows>(rows, [](auto r) -> WeightGradKernel { return weight_grad_kernel<decltype(r)::value>; });
}

// One kernel call per chunk of columns [0, cols) of the panel at b over channel c, from init's rows (ldi): the bias,
// or for c > 0 the sums so far in out (fp32, so the FMA chain goes on exactly as in one call).
MCL_AVX2 void chunks(const float* const* px, int64_t rows, int64_t sC, int64_t sH, int64_t P, int64_t c, const float* b,
                     int64_t cols, const float* init, int64_t ldi, float* out, int64_t ldo) {
  const float* a[kRows];
  for (int64_t r = 0; r < rows; ++r) a[r] = px[r] + c * sC;
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int64_t n = std::min(kChunk, cols - c0), vectors = (n + 7) / 8;
    const float* sub = b + (c * kPanel + c0) * P * P;  // sub-panel c0 / kChunk of channel c
    table(rows, vectors)(a, sH, P, sub, lanes(n - 8 * (vectors - 1)), init + c0, ldi, out + c0, ldo);
  }
}

}  // namespace

void run_runs(const Run<float>* runs, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C, const float* w,
              int64_t D, int64_t q0, int64_t q1, int64_t ldi, int64_t ldo) {
  const int64_t K = C * P * P;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < n; ++i) {
      const Run<float>& run = runs[i];
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t d0 = q * kPanel;
        chunks(run.px, run.rows, sC, sH, P, c, w + q * K * kPanel, std::min(kPanel, D - d0),
               c == 0 ? run.init + d0 : run.out + d0, c == 0 ? ldi : ldo, run.out + d0, ldo);
      }
    }
  }
}

MCL_AVX2 void run_weight_grad(const float* a, int64_t lda, int64_t rows, const float* const* tok, int64_t n,
                              const int64_t* off, float* out, int64_t ldo) {
  static_assert(kPanel == 4 * kChunk, "a token's panel columns are 4 runs of 16 pixels");
  // The rows' gradients, token by token, packed 8 floats apart: the 4 calls below read them from L1 (16 KiB for 512
  // tokens), where each call read them from a's rows, a line per token from L2. The training step 1.06x (fp32, D =
  // 384, B = 64, 2 threads, paired; dE's phase 58% -> 67% of the FMA limit), the sums unchanged.
  thread_local std::vector<float> packed;
  packed.resize(static_cast<size_t>(n * 8));
  float* pk = packed.data();
  const __m256i m = lanes(rows);
  for (int64_t t = 0; t < n; ++t) _mm256_storeu_ps(pk + t * 8, _mm256_maskload_ps(a + t * lda, m));
  for (int64_t v = 0; v < kPanel / kChunk; ++v) weight_grad_table(rows)(pk, 8, tok, n, off[v], out + kChunk * v, ldo);
}

#else

void run_runs(const Run<float>*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
              int64_t, int64_t) {
  TORCH_CHECK(false, "mcl_kernels: patch_gemm's AVX2 kernels need an x86-64 CPU");
}

void run_weight_grad(const float*, int64_t, int64_t, const float* const*, int64_t, const int64_t*, float*, int64_t) {
  TORCH_CHECK(false, "mcl_kernels: patch_gemm's AVX2 kernels need an x86-64 CPU");
}

#endif

}  // namespace mcl::cpu::patch_gemm::avx2
