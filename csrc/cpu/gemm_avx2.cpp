// gemm_avx2.h: compiled through target attributes, run only where the CPU has AVX2 and FMA.
#include "gemm_avx2.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "patch_gemm.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MCL_GEMM_AVX2 1
#include "avx2_block.h"
#endif

namespace mcl::cpu::gemm_avx2 {

#if defined(MCL_GEMM_AVX2)

namespace {

using avx2_block::lanes;

// R rows x V vectors (8 columns each) of C over kb steps of k: b is a packed chunk [kb][kChunk].
template <int R, int V>
MCL_AVX2 void kernel(const float* a, int64_t lda, const float* b, int64_t kb, __m256i last, bool load, float* c,
                     int64_t ldc) {
  __m256 acc[R][V];
  if (load) {
    avx2_block::load_block(acc, c, ldc, last);
  } else {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
    }
  }
  for (int64_t k = 0; k < kb; ++k, b += kChunk) {
    avx2_block::fma_step(acc, b, [&](int r) { return a + r * lda + k; });
  }
  avx2_block::store_block(acc, c, ldc, last);
}

// 8 bf16 -> 8 fp32 (a bf16 is the high half of an fp32).
MCL_AVX2 inline __m256 widen(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

// dst [kb][kChunk] = rows [0, kb) of the n (1..kChunk) columns at src (row stride ld) as fp32, zeros past n.
MCL_AVX2 void pack(const float* src, int64_t ld, int64_t kb, int64_t n, float* dst) {
  if (n == kChunk) {
    for (int64_t k = 0; k < kb; ++k, src += ld, dst += kChunk) {
      _mm256_store_ps(dst, _mm256_loadu_ps(src));
      _mm256_store_ps(dst + 8, _mm256_loadu_ps(src + 8));
    }
    return;
  }
  const __m256i lo = lanes(n), hi = lanes(n - 8);
  for (int64_t k = 0; k < kb; ++k, src += ld, dst += kChunk) {
    _mm256_store_ps(dst, _mm256_maskload_ps(src, lo));
    _mm256_store_ps(dst + 8, _mm256_maskload_ps(src + 8, hi));
  }
}

MCL_AVX2 void pack(const c10::BFloat16* src, int64_t ld, int64_t kb, int64_t n, float* dst) {
  for (int64_t k = 0; k < kb; ++k, src += ld, dst += kChunk) {
    if (n == kChunk) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      _mm256_store_ps(dst, widen(_mm256_castsi256_si128(v)));
      _mm256_store_ps(dst + 8, widen(_mm256_extracti128_si256(v, 1)));
    } else {
      for (int64_t j = 0; j < kChunk; ++j) dst[j] = j < n ? static_cast<float>(src[j]) : 0.0f;
    }
  }
}

// bf16 A rows as fp32, once per K block (then every chunk of B runs over them): dst [M][kb] = a[:, 0:kb].
MCL_AVX2 void widen_rows(const c10::BFloat16* a, int64_t lda, int64_t M, int64_t kb, float* dst) {
  for (int64_t m = 0; m < M; ++m, a += lda, dst += kb) {
    int64_t k = 0;
    for (; k + 8 <= kb; k += 8) {
      _mm256_storeu_ps(dst + k, widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k))));
    }
    for (; k < kb; ++k) dst[k] = static_cast<float>(a[k]);
  }
}

// The next row block's C: with a short K (the weight gradients' rounds: 128 steps) a kernel call would otherwise
// spend a good part of its time waiting for C's lines from L3.
inline void prefetch_c(const float* c, int64_t ldc, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r, c += ldc) {
    __builtin_prefetch(c, 1, 3);
    __builtin_prefetch(c + n - 1, 1, 3);
  }
}

using Kernel = void (*)(const float*, int64_t, const float*, int64_t, __m256i, bool, float*, int64_t);

Kernel table(int64_t rows, int64_t vectors) {
  return patch_gemm::instance<kRows>(rows, [vectors](auto r) {
    return patch_gemm::instance<kChunk / 8>(vectors, [](auto v) -> Kernel {
      return kernel<decltype(r)::value, decltype(v)::value>;
    });
  });
}

template <typename T>
MCL_AVX2 void run_impl(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
                       int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!add) {
      for (int64_t m = 0; m < M; ++m) std::fill_n(c + m * ldc, N, 0.0f);
    }
    return;
  }
  alignas(64) float packed[kBlockK * kChunk];
  thread_local std::vector<float> wide;  // bf16: the K block of A as fp32
  if constexpr (!std::is_same_v<T, float>) wide.resize(M * std::min(kBlockK, K));
  const int64_t parts = (M + kRows - 1) / kRows;  // row blocks as even as they go: no short last block
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t kb = std::min(kBlockK, K - k0);
    const bool load = add || k0 > 0;
    const float* ak = nullptr;
    int64_t ld = 0;
    if constexpr (std::is_same_v<T, float>) {
      ak = a + k0, ld = lda;
    } else {
      widen_rows(a + k0, lda, M, kb, wide.data());
      ak = wide.data(), ld = kb;
    }
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      const int64_t n = std::min(kChunk, N - n0), vectors = (n + 7) / 8;
      const __m256i last = lanes(n - 8 * (vectors - 1));
      pack(b + k0 * ldb + n0, ldb, kb, n, packed);
      for (int64_t h = 0; h < parts; ++h) {
        const int64_t m0 = M * h / parts, rows = M * (h + 1) / parts - m0;
        if (load && h + 1 < parts) prefetch_c(c + (m0 + rows) * ldc + n0, ldc, M * (h + 2) / parts - m0 - rows, n);
        table(rows, vectors)(ak + m0 * ld, ld, packed, kb, last, load, c + m0 * ldc + n0, ldc);
      }
    }
  }
}

}  // namespace

void run(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
         int64_t ldc, bool add) {
  run_impl(M, N, K, a, lda, b, ldb, c, ldc, add);
}

void run(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
         float* c, int64_t ldc, bool add) {
  run_impl(M, N, K, a, lda, b, ldb, c, ldc, add);
}

#else

void run(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool) {
  TORCH_CHECK(false, "mcl_kernels: gemm_avx2 needs an x86-64 CPU");
}

void run(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, float*, int64_t,
         bool) {
  TORCH_CHECK(false, "mcl_kernels: gemm_avx2 needs an x86-64 CPU");
}

#endif

}  // namespace mcl::cpu::gemm_avx2
