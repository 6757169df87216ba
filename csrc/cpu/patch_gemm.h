// Patch-embedding GEMMs with the im2col folded in: micro-kernels (AVX-512: fp32 FMA and bf16 dot products; AVX2 + FMA:
// fp32, patch_gemm_avx2.h) that read pixels straight from the image. Used by embed_tokens (inference), mcl_embed's
// forward (S) and its backward (dE).
//
// A kernel call takes m <= max_rows() P x P patches by their origins: patch r's pixel (c, u, v) sits at
// px[r] + c*sC + u*sH + v (any patches: consecutive ones of a patch row, or a run across patch rows). It keeps an
// m x kPanel block of the output in registers, walks k = (c, u, v) in
// the weight's order, broadcasting each patch's pixel and multiplying it by row k of a packed weight panel:
// the patch matrix is never built, and each output element is one FMA chain over k in that fixed order, so
// the result does not depend on how rows are split into calls or threads.
//
// Weight panels: panel q holds columns [q*kPanel, (q+1)*kPanel) of W^T [K, D] as [K][kPanel] rows (zeros past D), so
// a k step loads kPanel/16 contiguous vectors; for the AVX2 kernels (fp32), channel by channel (K in blocks of P*P),
// as kPanel/16 sub-panels of [P*P][16] each (patch_gemm_avx2.h), the same bytes. Either way channel c's rows start
// c*P*P*kPanel into the panel, so a caller can run one channel at a time (C = 1, the panel and pixels offset).
#pragma once

#include <cstdint>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

namespace mcl::cpu::patch_gemm {

constexpr int64_t kPanel = 64;  // output columns per panel: 4 AVX-512 vectors
constexpr int64_t kMaxRows = 7;  // patches per call: 7 x 4 accumulators + 4 weight vectors = 32 registers

// The instruction set the kernels run with: the best this CPU has (detected_isa()), unless set_isa() chose a lesser
// one (tests run the AVX2 kernels on AVX-512 CPUs that way). Both compute each output element as the same FMA chain
// in the same order, so their results are bitwise the same.
enum class Isa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };
inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "none";
}
Isa isa();
Isa detected_isa();
void set_isa(Isa isa);  // throws where the CPU lacks it

// Whether the kernels run on this CPU for `dtype` and patch size P: float32 needs AVX2 and FMA (or AVX-512F);
// bfloat16 needs AVX512-BF16 (and isa() AVX-512) and an even P (pixels pair as (v, v + 1) within a patch row).
// Compiled through target attributes.
bool available(c10::ScalarType dtype, int64_t P);

// Whether the kernels can read the images x [B, C, H, W] for patch size P: available() for x's dtype, and a unit
// W stride (other strides and offsets are free). The one rule every caller of run_runs() goes by.
bool reads(const at::Tensor& x, int64_t P);

inline int64_t panels(int64_t D) { return (D + kPanel - 1) / kPanel; }

// The most rows (patches, or rows of dE) one call of the selected ISA's kernels takes: kMaxRows with AVX-512, 6 with
// AVX2 (6 x 16 accumulators fill its 16 registers; patch_gemm_avx2.h).
constexpr int64_t kMaxRowsAvx2 = 6;
inline int64_t max_rows() { return isa() == Isa::kAvx2 ? kMaxRowsAvx2 : kMaxRows; }

// Calls f(first, m) for blocks [first, first + m) of at most max_rows() covering [0, n), as even as they go
// (AVX-512: 9 -> 5 + 4, 14 -> 7 + 7, 16 -> 6 + 5 + 5): a short last block would run a kernel with few rows. Rows are
// independent outputs, so the split changes no result.
template <typename F>
void for_each_block(int64_t n, F&& f) {
  const int64_t most = max_rows(), parts = (n + most - 1) / most;
  for (int64_t h = 0; h < parts; ++h) f(n * h / parts, n * (h + 1) / parts - n * h / parts);
}

// pick(std::integral_constant<int, n>{}) for n = clamp(value, 1, N): how each ISA's dispatch turns a run-time row or
// vector count into the kernel instantiated for it.
template <int N, int R = 1, typename F>
auto instance(int64_t value, F&& pick) {
  if constexpr (R == N) {
    return pick(std::integral_constant<int, R>{});
  } else {
    return value <= R ? pick(std::integral_constant<int, R>{}) : instance<N, R + 1>(value, pick);
  }
}

// What the kernels of every ISA prefetch, and how far ahead.
// The pixels are prefetched kAheadSteps k steps (weight rows) before their use, a whole image row of the R
// patches at a time: the hardware prefetchers do not keep up with the R interleaved streams. One thread, patch 32,
// fp32, pixels streamed from memory: 88% of the FMA limit without, 97% with (99% either way with the pixels in
// cache). In the ops (2 threads, B = 64, D = 384): inference 1.5-6% faster, mcl_embed's S 90% -> 93% (fp32), 88% ->
// 90% (bf16); 64 to 128 steps measured the same, 32 slower in the inference op
// (benchmarks/results/patch-gemm-prefetch-cpu-2core.txt).
constexpr int64_t kAheadSteps = 64;

// The weight panel is prefetched kWeightAheadSteps k steps ahead too (it streams from L2: ~768 KiB at patch 32). On
// the Intel Xeon (two FMA ports, so twice the weight bytes per cycle of Zen 4), one thread, one 7-patch run at
// patch 32: 78% -> 83% of the FMA limit; 8 to 32 steps measured the same
// (benchmarks/results/patch-gemm-broadcast-cpu-2core.txt).
constexpr int64_t kWeightAheadSteps = 16;

// Prefetches image row u of channel c (a row past P is a row of channel c + 1) of the R patches px[0 .. R).
template <typename T, int R>
inline void prefetch_row(const T* const* px, int64_t sC, int64_t sH, int64_t P, int64_t C, int64_t c, int64_t u) {
  c += u / P, u %= P;
  if (c >= C) return;
  for (int r = 0; r < R; ++r) {
    const T* a = px[r] + c * sC + u * sH;
    const auto end = reinterpret_cast<uintptr_t>(a + P);
    for (auto l = reinterpret_cast<uintptr_t>(a) & ~uintptr_t(63); l < end; l += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(l), 0, 3);
    }
  }
}

// All panels of the weight w [D, K] (row-major, K = C * block, block = P * P) into dst [panels(D)][K * kPanel], in the
// layout of the selected ISA's kernels, in parallel over panels. bf16 panels (AVX-512 only) are VNNI pairs: element
// (k, j) of a panel at ((k / 2) * kPanel + j) * 2 + k % 2.
void pack(const float* w, int64_t D, int64_t K, int64_t block, float* dst);
void pack(const c10::BFloat16* w, int64_t D, int64_t K, int64_t block, c10::BFloat16* dst);
// Panel q alone, on the calling thread, into dst (that panel's K * kPanel block).
void pack_panel(const float* w, int64_t D, int64_t K, int64_t block, int64_t q, float* dst);
void pack_panel(const c10::BFloat16* w, int64_t D, int64_t K, int64_t block, int64_t q, c10::BFloat16* dst);

// A run of patches for run_runs: patch r (r < rows <= max_rows()) has its pixel (0, 0, 0) at px[r], its output row
// at out + r * ldo and its starting row at init + r * ldi (ldo, ldi: run_runs' arguments).
template <typename T>
struct Run {
  const T* px[kMaxRows];
  int64_t rows;
  const float* init;
  T* out;
};

// For each of the n runs, each of its patches r and each panel q in [q0, q1) of the packed weight w (all of pack()'s
// panels, D columns), the columns [q*kPanel, min((q+1)*kPanel, D)) of
//   out[r, :] = init[r, :] + sum over c < C, u < P, v < P of px[r][c*sC + u*sH + v] * W^T[k, :],
// k = (c*P + u)*P + v; init's row stride ldi (0: one row for all), out's ldo; unit W stride. Accumulates in fp32
// (bf16: products of bf16 pairs, summed in fp32 and rounded once into out). Each output element is one FMA chain
// over k in order from its init value, whatever the ISA, the runs or the threads, so results are bitwise alike.
// With AVX-512, panel by panel, run by run, all of K per kernel call. With AVX2 (fp32 only), channel by channel, run
// by run, panel by panel (avx2::run_runs), the sums kept in out between channels.
void run_runs(const Run<float>* runs, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C, const float* w,
              int64_t D, int64_t q0, int64_t q1, int64_t ldi, int64_t ldo);
void run_runs(const Run<c10::BFloat16>* runs, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C,
              const c10::BFloat16* w, int64_t D, int64_t q0, int64_t q1, int64_t ldi, int64_t ldo);

// The patch embedding's weight gradient with the im2col folded in (fp32; runs where available(kFloat, 16), as
// reads() says for fp32 images): one kPanel-column panel of
// dE [D, K], rows (1..max_rows()) of it,
//   out[r, :] += sum over s < n of a[s * lda + r] * (token s's pixels in the panel's columns),
// a being token-major (the gradient tile as the GEMM before it wrote it: no transpose),
// token s's panel columns being kPanel/16 runs of 16 pixels at tok[s] + off[v], v < kPanel/16 (for patch p, a
// multiple of 16: runs of one image row each). Each output element gets one FMA chain over s in order (from zero,
// then added), so the result does not depend on how rows are split into calls or threads.
void run_weight_grad(const float* a, int64_t lda, int64_t rows, const float* const* tok, int64_t n,
                     const int64_t* off, float* out, int64_t ldo);

}  // namespace mcl::cpu::patch_gemm
