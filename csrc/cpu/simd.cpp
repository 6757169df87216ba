// simd.h: AVX-512 and AVX2 implementations (compiled through target attributes, chosen at run time) and portable
// ones.
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <ATen/Parallel.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MCL_SIMD_X86 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns inside its own AVX-512 headers (their _mm512_undefined_* self-initialise a register on purpose).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace mcl::cpu::simd {

namespace {

inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename S>
void transpose_bf16_scalar(const S* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst, int64_t ldd) {
  constexpr int64_t kB = 16;
  for (int64_t m0 = 0; m0 < M; m0 += kB) {
    for (int64_t n0 = 0; n0 < N; n0 += kB) {
      for (int64_t n = n0; n < std::min(N, n0 + kB); ++n) {
        for (int64_t m = m0; m < std::min(M, m0 + kB); ++m) {
          dst[n * ldd + m] = c10::BFloat16(static_cast<float>(src[m * lds + n]));
        }
      }
    }
  }
}

}  // namespace

// ---- portable paths --------------------------------------------------------------------------------------

namespace portable {

void transpose32(const void* src_v, int64_t lds, int64_t M, int64_t N, void* dst_v, int64_t ldd) {
  const auto* src = static_cast<const uint32_t*>(src_v);
  auto* dst = static_cast<uint32_t*>(dst_v);
  constexpr int64_t kB = 16;
  for (int64_t m0 = 0; m0 < M; m0 += kB) {
    for (int64_t n0 = 0; n0 < N; n0 += kB) {
      for (int64_t n = n0; n < std::min(N, n0 + kB); ++n) {
        for (int64_t m = m0; m < std::min(M, m0 + kB); ++m) dst[n * ldd + m] = src[m * lds + n];
      }
    }
  }
}

void transpose_to_bf16(const float* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst, int64_t ldd) {
  transpose_bf16_scalar(src, lds, M, N, dst, ldd);
}

void transpose_to_bf16(const c10::BFloat16* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst,
                       int64_t ldd) {
  transpose_bf16_scalar(src, lds, M, N, dst, ldd);
}

void to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_value(src[i].x);
}

void interleave(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[2 * i] = a[i];
    dst[2 * i + 1] = b[i];
  }
}

}  // namespace portable

namespace {

#if defined(MCL_SIMD_X86)

#define MCL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

bool avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

MCL_AVX512 inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// 16 fp32 -> 16 bf16, round to nearest even, NaN -> 0x7fc0 (c10::BFloat16's rounding).
MCL_AVX512 inline __m256i to_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

MCL_AVX512 inline __m512 from_bf16_16(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// r[i] holds row i of a 16 x 16 block; afterwards r[j] holds column j.
MCL_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

// Transposes [M, N] in 16 x 16 blocks: load(r, m0, n0, rows, cols) fills r with a block (zeros outside),
// store(r, m0, n0, rows, cols) writes the transposed block (column j of the block to row n0 + j). Loads and
// stores are functors rather than lambdas: a lambda would not inherit this function's target attribute.
template <typename Load, typename Store>
MCL_AVX512 inline void blocked_transpose(int64_t M, int64_t N, const Load& load, const Store& store) {
  __m512 r[16];
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    const int64_t rows = std::min<int64_t>(16, M - m0);
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      const int64_t cols = std::min<int64_t>(16, N - n0);
      load(r, m0, n0, rows, cols);
      transpose16(r);
      store(r, m0, n0, rows, cols);
    }
  }
}

struct LoadF32 {
  const float* src;
  int64_t lds;
  MCL_AVX512 void operator()(__m512* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    const __mmask16 cm = mask16(cols);
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + (m0 + i) * lds + n0) : _mm512_setzero_ps();
    }
  }
};

struct LoadBF16 {  // widened to fp32 exactly
  const c10::BFloat16* src;
  int64_t lds;
  MCL_AVX512 void operator()(__m512* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    const __mmask16 cm = mask16(cols);
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rows ? from_bf16_16(_mm256_maskz_loadu_epi16(cm, src + (m0 + i) * lds + n0)) : _mm512_setzero_ps();
    }
  }
};

struct StoreF32 {
  float* dst;
  int64_t ldd;
  MCL_AVX512 void operator()(__m512* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    const __mmask16 rm = mask16(rows);
    for (int j = 0; j < cols; ++j) _mm512_mask_storeu_ps(dst + (n0 + j) * ldd + m0, rm, r[j]);
  }
};

struct StoreBF16 {  // rounds fp32 to bf16 (exact for widened bf16)
  c10::BFloat16* dst;
  int64_t ldd;
  MCL_AVX512 void operator()(__m512* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    const __mmask16 rm = mask16(rows);
    for (int j = 0; j < cols; ++j) _mm256_mask_storeu_epi16(dst + (n0 + j) * ldd + m0, rm, to_bf16_16(r[j]));
  }
};

MCL_AVX512 void transpose32_avx512(const float* src, int64_t lds, int64_t M, int64_t N, float* dst, int64_t ldd) {
  blocked_transpose(M, N, LoadF32{src, lds}, StoreF32{dst, ldd});
}

MCL_AVX512 void transpose_f32_bf16_avx512(const float* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst,
                                          int64_t ldd) {
  blocked_transpose(M, N, LoadF32{src, lds}, StoreBF16{dst, ldd});
}

MCL_AVX512 void transpose_bf16_bf16_avx512(const c10::BFloat16* src, int64_t lds, int64_t M, int64_t N,
                                           c10::BFloat16* dst, int64_t ldd) {
  blocked_transpose(M, N, LoadBF16{src, lds}, StoreBF16{dst, ldd});
}

MCL_AVX512 void to_bf16_avx512(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    _mm256_mask_storeu_epi16(dst + i, m, to_bf16_16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

MCL_AVX512 void to_float_avx512(const c10::BFloat16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    _mm512_mask_storeu_ps(dst + i, m, from_bf16_16(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}

MCL_AVX512 void interleave_avx512(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = std::min<int64_t>(16, n - i);
    const __mmask16 m = mask16(left);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + i));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + i));
    const __m512i pairs = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
    const __mmask32 m2 =
        left >= 16 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << (2 * left)) - 1);
    _mm512_mask_storeu_epi16(dst + 2 * i, m2, pairs);
  }
}

// ---- AVX2 (AMD Zen 1-3, Intel client cores): the same functions in 8 x 8 blocks ---------------------------------
// Before these, AVX2 CPUs ran the portable loops: packing a D = 384, patch 32 weight for embed_tokens (a scalar
// transpose of 1.2 M floats a call) took more thread time than the B = 1 GEMM itself (AMD EPYC Zen 3).

#define MCL_AVX2 __attribute__((target("avx2")))

bool avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

// Lanes [0, n) set, for maskload / maskstore.
MCL_AVX2 inline __m256i mask8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 fp32 -> 8 bf16 (in the low 128 bits), rounded as to_bf16_16.
MCL_AVX2 inline __m128i to_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // Every lane is < 2^16, so the unsigned saturating pack is exact; it packs within 128-bit halves, hence the permute.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

MCL_AVX2 inline __m256 from_bf16_8(__m128i b) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

// r[i] holds row i of an 8 x 8 block; afterwards r[j] holds column j.
MCL_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// Transposes [M, N] in 8 x 8 blocks, as blocked_transpose above (functors, for the target attribute).
template <typename Load, typename Store>
MCL_AVX2 inline void blocked_transpose8(int64_t M, int64_t N, const Load& load, const Store& store) {
  __m256 r[8];
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m0);
    for (int64_t n0 = 0; n0 < N; n0 += 8) {
      const int64_t cols = std::min<int64_t>(8, N - n0);
      load(r, m0, n0, rows, cols);
      transpose8(r);
      store(r, m0, n0, rows, cols);
    }
  }
}

struct LoadF32x8 {
  const float* src;
  int64_t lds;
  MCL_AVX2 void operator()(__m256* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    const __m256i cm = mask8(cols);
    for (int i = 0; i < 8; ++i) {
      const float* row = src + (m0 + i) * lds + n0;
      r[i] = i >= rows ? _mm256_setzero_ps() : cols == 8 ? _mm256_loadu_ps(row) : _mm256_maskload_ps(row, cm);
    }
  }
};

struct LoadBF16x8 {  // widened to fp32 exactly
  const c10::BFloat16* src;
  int64_t lds;
  MCL_AVX2 void operator()(__m256* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    alignas(16) uint16_t part[8] = {};
    for (int i = 0; i < 8; ++i) {
      const c10::BFloat16* row = src + (m0 + i) * lds + n0;
      if (i >= rows) {
        r[i] = _mm256_setzero_ps();
      } else if (cols == 8) {
        r[i] = from_bf16_8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      } else {
        std::memcpy(part, row, sizeof(uint16_t) * cols);
        r[i] = from_bf16_8(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
      }
    }
  }
};

struct StoreF32x8 {
  float* dst;
  int64_t ldd;
  MCL_AVX2 void operator()(__m256* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    const __m256i rm = mask8(rows);
    for (int j = 0; j < cols; ++j) {
      float* row = dst + (n0 + j) * ldd + m0;
      if (rows == 8) {
        _mm256_storeu_ps(row, r[j]);
      } else {
        _mm256_maskstore_ps(row, rm, r[j]);
      }
    }
  }
};

struct StoreBF16x8 {  // rounds fp32 to bf16 (exact for widened bf16)
  c10::BFloat16* dst;
  int64_t ldd;
  MCL_AVX2 void operator()(__m256* r, int64_t m0, int64_t n0, int64_t rows, int64_t cols) const {
    alignas(16) uint16_t part[8];
    for (int j = 0; j < cols; ++j) {
      c10::BFloat16* row = dst + (n0 + j) * ldd + m0;
      if (rows == 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row), to_bf16_8(r[j]));
      } else {
        _mm_store_si128(reinterpret_cast<__m128i*>(part), to_bf16_8(r[j]));
        std::memcpy(row, part, sizeof(uint16_t) * rows);
      }
    }
  }
};

MCL_AVX2 void transpose32_avx2(const float* src, int64_t lds, int64_t M, int64_t N, float* dst, int64_t ldd) {
  blocked_transpose8(M, N, LoadF32x8{src, lds}, StoreF32x8{dst, ldd});
}

MCL_AVX2 void transpose_f32_bf16_avx2(const float* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst,
                                      int64_t ldd) {
  blocked_transpose8(M, N, LoadF32x8{src, lds}, StoreBF16x8{dst, ldd});
}

MCL_AVX2 void transpose_bf16_bf16_avx2(const c10::BFloat16* src, int64_t lds, int64_t M, int64_t N,
                                       c10::BFloat16* dst, int64_t ldd) {
  blocked_transpose8(M, N, LoadBF16x8{src, lds}, StoreBF16x8{dst, ldd});
}

MCL_AVX2 void to_bf16_avx2(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), to_bf16_8(_mm256_loadu_ps(src + i)));
  if (i < n) portable::to_bf16(src + i, dst + i, n - i);
}

MCL_AVX2 void to_float_avx2(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, from_bf16_8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  if (i < n) portable::to_float(src + i, dst + i, n - i);
}

MCL_AVX2 void interleave_avx2(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i));
    const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm_unpacklo_epi16(x, y));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i + 8), _mm_unpackhi_epi16(x, y));
  }
  if (i < n) portable::interleave(a + i, b + i, dst + 2 * i, n - i);
}

#else

bool avx512() { return false; }
bool avx2() { return false; }

#endif

}  // namespace

void transpose32(const void* src, int64_t lds, int64_t M, int64_t N, void* dst, int64_t ldd) {
#if defined(MCL_SIMD_X86)
  if (avx512()) {
    return transpose32_avx512(static_cast<const float*>(src), lds, M, N, static_cast<float*>(dst), ldd);
  }
  if (avx2()) return transpose32_avx2(static_cast<const float*>(src), lds, M, N, static_cast<float*>(dst), ldd);
#endif
  portable::transpose32(src, lds, M, N, dst, ldd);
}

void pack_panel32(const void* w, int64_t D, int64_t K32, int64_t width, int64_t q, void* dst) {
  const auto* src = static_cast<const uint32_t*>(w);
  auto* panel = static_cast<uint32_t*>(dst);
  const int64_t d0 = q * width, cols = std::min(width, D - d0);
  if (cols < width) std::memset(panel, 0, sizeof(uint32_t) * K32 * width);
  transpose32(src + d0 * K32, K32, cols, K32, panel, width);  // word (k32, j) = word k32 of row d0 + j
}

void pack_panels32(const void* w, int64_t D, int64_t K32, int64_t width, void* dst) {
  auto* out = static_cast<uint32_t*>(dst);
  at::parallel_for(0, (D + width - 1) / width, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) pack_panel32(w, D, K32, width, q, out + q * K32 * width);
  });
}

void transpose_to_bf16(const float* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst, int64_t ldd) {
#if defined(MCL_SIMD_X86)
  if (avx512()) return transpose_f32_bf16_avx512(src, lds, M, N, dst, ldd);
  if (avx2()) return transpose_f32_bf16_avx2(src, lds, M, N, dst, ldd);
#endif
  portable::transpose_to_bf16(src, lds, M, N, dst, ldd);
}

void transpose_to_bf16(const c10::BFloat16* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst,
                       int64_t ldd) {
#if defined(MCL_SIMD_X86)
  if (avx512()) return transpose_bf16_bf16_avx512(src, lds, M, N, dst, ldd);
  if (avx2()) return transpose_bf16_bf16_avx2(src, lds, M, N, dst, ldd);
#endif
  portable::transpose_to_bf16(src, lds, M, N, dst, ldd);
}

void to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
#if defined(MCL_SIMD_X86)
  if (avx512()) return to_bf16_avx512(src, dst, n);
  if (avx2()) return to_bf16_avx2(src, dst, n);
#endif
  portable::to_bf16(src, dst, n);
}

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
#if defined(MCL_SIMD_X86)
  if (avx512()) return to_float_avx512(src, dst, n);
  if (avx2()) return to_float_avx2(src, dst, n);
#endif
  portable::to_float(src, dst, n);
}

void interleave(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* dst, int64_t n) {
#if defined(MCL_SIMD_X86)
  if (avx512()) return interleave_avx512(a, b, dst, n);
  if (avx2()) return interleave_avx2(a, b, dst, n);
#endif
  portable::interleave(a, b, dst, n);
}

const char* isa() {
#if defined(MCL_SIMD_X86)
  if (avx512()) return "avx512";
  if (avx2()) return "avx2";
#endif
  return "portable";
}

}  // namespace mcl::cpu::simd
