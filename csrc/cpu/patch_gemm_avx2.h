// patch_gemm.h's fp32 kernels for CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 1-3, Intel client cores): the same
// contracts (patch_gemm::run_runs, patch_gemm::run_weight_grad; patch_gemm.cpp checks them), the same packed weight
// panels, and each output element the same FMA chain in the same order as the AVX-512 kernels compute it, so results
// are bitwise the same.
//
// 16 vector registers of 8 floats hold at most 6 rows x 16 columns of accumulators with the 2 weight vectors and a
// broadcast (15 registers; BLIS's Haswell sgemm kernel has the same 6 x 16 shape): a kPanel-column panel is walked
// channel by channel, each channel in 16-column chunks, each chunk walking the channel's P*P steps while the patches'
// pixels of that channel stay in L1, the sums going on from the output rows between channels (fp32: exactly the one FMA
// chain); a call takes at most kMaxRowsAvx2 rows (patch_gemm::max_rows(), which for_each_block follows). So that a
// chunk's weight rows are one sequential stream, patch_gemm::pack lays an fp32 panel out for these kernels as, per
// channel, kPanel / kChunk sub-panels of [P*P][kChunk] each (the same bytes per panel). run_runs walks channels, then
// runs, then panels: measured against panels, then runs, then all of K per call, 1.02-1.05x (one thread, patch 32, D =
// 384, B = 60); against channels, then blocks of 8-32 image rows, then chunks, then runs (BLIS's loop order, the
// weight's chunk in L1 and the pixels from L2), 1.14x at 2 threads and 1.01-1.07x at one (embed_tokens, B = 64).
// patch_gemm.cpp calls these where isa() is AVX2; nothing else should.
#pragma once

#include <cstdint>

#include "patch_gemm.h"

namespace mcl::cpu::patch_gemm::avx2 {

constexpr int64_t kChunk = 16;  // output columns per kernel call (2 vectors), and per weight sub-panel


void run_runs(const Run<float>* runs, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C, const float* w,
              int64_t D, int64_t q0, int64_t q1, int64_t ldi, int64_t ldo);

void run_weight_grad(const float* a, int64_t lda, int64_t rows, const float* const* tok, int64_t n,
                     const int64_t* off, float* out, int64_t ldo);

}  // namespace mcl::cpu::patch_gemm::avx2
