// Single-threaded fp32 GEMM for CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 1-3, Intel client cores): the tile
// GEMMs of the fused CPU kernels (tile_gemm.h's Gemm<float>) run here where patch_gemm::isa() is AVX2.
//
// oneDNN's brgemm, which those GEMMs use elsewhere, ran the training step's tile shapes at 45-71% of one core's FMA
// limit on an AMD EPYC Zen 3 with its operands in L2, this kernel at 73-86% (benchmarks/gemm_cache.py). It has the
// AVX2 patch kernels' shape, over row-major operands: K in blocks of kBlockK; per block, each 16-column chunk of B
// is copied into a [kBlockK][16] buffer (16 KiB, one sequential stream that stays in L1), then every block of up to
// 6 rows of A runs over it with 6 x 16 accumulators in registers. Each element of C is one FMA
// chain over k in order, K blocks in order, whatever M or the caller's tiling: results depend on K only, not on
// which rows or threads a call covers.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

#include "patch_gemm.h"
#include "patch_gemm_avx2.h"

namespace mcl::cpu::gemm_avx2 {

// The AVX2 patch kernels' register block: 6 rows x 16 columns of accumulators, 2 vectors of B, 1 broadcast.
constexpr int64_t kRows = patch_gemm::kMaxRowsAvx2;  // rows of A per kernel call
constexpr int64_t kChunk = patch_gemm::avx2::kChunk;  // columns of C per kernel call
constexpr int64_t kBlockK = 256;  // K per block: a packed chunk of B is kBlockK x 16 floats

// C[M, N] = A[M, K] B[K, N] (+ C when `add`), C in fp32, row-major with leading dimensions lda >= K, ldb >= N,
// ldc >= N; on the calling thread. Runs only on a CPU with AVX2 and FMA (callers check: patch_gemm::isa()).
void run(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
         int64_t ldc, bool add);
// bf16 A and B (row-major B, not VNNI pairs), multiplied in fp32: each K block of A and each chunk of B widened to
// fp32 once (a bf16 is exactly an fp32), then the fp32 kernel; the same sums as fp32 operands holding those values.
void run(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
         float* c, int64_t ldc, bool add);

}  // namespace mcl::cpu::gemm_avx2
