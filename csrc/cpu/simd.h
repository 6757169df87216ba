// Vectorized data movement for the CPU kernels' tiles: transposes and fp32 <-> bf16 conversion.
//
// The extension is compiled for the baseline ISA, so these are compiled for AVX-512 and for AVX2 separately
// (function target attributes) and chosen at run time, the widest the CPU has; every function has a portable scalar
// path (namespace portable, which the C++ tests compare against bitwise) with identical results (bf16 rounding is
// round-to-nearest-even with NaN kept NaN, as c10::BFloat16 does).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

namespace mcl::cpu::simd {

// dst[n * ldd + m] = src[m * lds + n] for m < M, n < N (32-bit elements: float, or bf16 pairs).
void transpose32(const void* src, int64_t lds, int64_t M, int64_t N, void* dst, int64_t ldd);

// A row-major [D][K32] matrix of 32-bit elements (float, or bf16 pairs: then the result is the VNNI layout) as
// column panels of `width` rows: panel q holds rows [q*width, (q+1)*width) transposed, dst + q*K32*width =
// [K32][width], zeros past D. In parallel over panels (at::parallel_for).
void pack_panels32(const void* w, int64_t D, int64_t K32, int64_t width, void* dst);
// Panel q alone, on the calling thread, at dst (the panel's own start).
void pack_panel32(const void* w, int64_t D, int64_t K32, int64_t width, int64_t q, void* dst);

// Transposes with a conversion to bf16 (fp32 source) or without (bf16 source).
void transpose_to_bf16(const float* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst, int64_t ldd);
void transpose_to_bf16(const c10::BFloat16* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst,
                       int64_t ldd);

void to_bf16(const float* src, c10::BFloat16* dst, int64_t n);
void to_float(const c10::BFloat16* src, float* dst, int64_t n);

// dst[2 i] = a[i], dst[2 i + 1] = b[i] for i < n: two bf16 rows as one row of VNNI pairs.
void interleave(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* dst, int64_t n);

// The instruction set the functions above run with: "avx512", "avx2" or "portable".
const char* isa();

// The portable paths, whatever the CPU: the definition the vectorized ones are tested against.
namespace portable {
void transpose32(const void* src, int64_t lds, int64_t M, int64_t N, void* dst, int64_t ldd);
void transpose_to_bf16(const float* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst, int64_t ldd);
void transpose_to_bf16(const c10::BFloat16* src, int64_t lds, int64_t M, int64_t N, c10::BFloat16* dst,
                       int64_t ldd);
void to_bf16(const float* src, c10::BFloat16* dst, int64_t n);
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void interleave(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* dst, int64_t n);
}  // namespace portable

}  // namespace mcl::cpu::simd
