// What the AVX2 + FMA kernels (patch_gemm_avx2.cpp, gemm_avx2.cpp) share: an R x V block of 8-float accumulators
// loaded from and stored to rows of a matrix, the last vector of a row masked to the chunk's width, and its k step. Include only from
// x86-64 sources compiled with GCC or Clang; every function here carries its own target attribute.
#pragma once

#include <cstdint>

#include <immintrin.h>

#define MCL_AVX2 __attribute__((target("avx2,fma")))

namespace mcl::cpu::avx2_block {

// Lanes [0, n) set: the masked loads and stores of a chunk's last vector.
MCL_AVX2 inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// acc[r][v] = src[r * ld + 8v .. + 8) (the last vector masked by `last`).
template <int R, int V>
MCL_AVX2 __attribute__((always_inline)) inline void load_block(__m256 (&acc)[R][V], const float* src, int64_t ld,
                                                               __m256i last) {
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      const float* p = src + r * ld + 8 * v;
      acc[r][v] = v == V - 1 ? _mm256_maskload_ps(p, last) : _mm256_loadu_ps(p);
    }
  }
}

// dst[r * ld + 8v .. + 8) = acc[r][v] (the last vector masked by `last`).
template <int R, int V>
MCL_AVX2 __attribute__((always_inline)) inline void store_block(const __m256 (&acc)[R][V], float* dst, int64_t ld,
                                                                __m256i last) {
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      if (v == V - 1) {
        _mm256_maskstore_ps(dst + r * ld + 8 * v, last, acc[r][v]);
      } else {
        _mm256_storeu_ps(dst + r * ld + 8 * v, acc[r][v]);
      }
    }
  }
}

// One k step of an R x V block: acc[r][v] += w[v] * x(r), w[v] = the 8 floats at w + 8v, x(r) the float at x(r)
// broadcast (the caller's addressing: rows of A, or patches' pixels).
template <int R, int V, typename X>
MCL_AVX2 __attribute__((always_inline)) inline void fma_step(__m256 (&acc)[R][V], const float* w, X&& x) {
  __m256 wv[V];
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) wv[v] = _mm256_loadu_ps(w + 8 * v);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    const __m256 b = _mm256_broadcast_ss(x(r));
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(wv[v], b, acc[r][v]);
  }
}

}  // namespace mcl::cpu::avx2_block
