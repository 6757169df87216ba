// Patch-embedding GEMMs with the im2col folded in: AVX-512 micro-kernels (fp32 FMA, bf16 dot products) that read
// pixels straight from the image. Used by embed_tokens (inference) and mcl_embed's forward (S).
//
// For one patch row of the image and one channel c, the P x P patches j0 .. j0 + m - 1 (consecutive along W)
// cover image rows y = i*P + u, columns [j0*P, (j0 + m)*P): patch j's pixels (c, u, v) sit at
// row(c, u) + j*P + v. A kernel keeps an m x kPanel block of the output in registers, walks k = (c, u, v) in
// the weight's order, broadcasting each patch's pixel and multiplying it by row k of a packed weight panel:
// the patch matrix is never built, and each output element is one FMA chain over k in that fixed order, so
// the result does not depend on how rows are split into calls or threads.
//
// Weight panels: panel q holds columns [q*kPanel, (q+1)*kPanel) of W^T [K, D] as [K][kPanel] rows (zeros past
// D), so a k step loads kPanel/16 contiguous vectors.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

namespace mcl::cpu::patch_gemm {

constexpr int64_t kPanel = 64;  // output columns per panel: 4 AVX-512 vectors
constexpr int64_t kMaxRows = 7;  // patches per call: 7 x 4 accumulators + 4 weight vectors = 32 registers

// Whether the kernels run on this CPU for `dtype` and patch size P: float32 needs AVX-512F; bfloat16 needs
// AVX512-BF16 and an even P (pixels pair as (v, v + 1) within a patch row). Compiled through target attributes.
bool available(c10::ScalarType dtype, int64_t P);

// Whether the kernels can read the images x [B, C, H, W] for patch size P: available() for x's dtype, and a unit
// W stride (other strides and offsets are free). The one rule every caller of run() goes by.
bool reads(const at::Tensor& x, int64_t P);

inline int64_t panels(int64_t D) { return (D + kPanel - 1) / kPanel; }

// Calls f(first, m) for blocks [first, first + m) of at most kMaxRows covering [0, n), as even as they go
// (9 -> 5 + 4, 14 -> 7 + 7, 16 -> 6 + 5 + 5): a short last block would run a kernel with few rows.
template <typename F>
void for_each_block(int64_t n, F&& f) {
  const int64_t parts = (n + kMaxRows - 1) / kMaxRows;
  for (int64_t h = 0; h < parts; ++h) f(n * h / parts, n * (h + 1) / parts - n * h / parts);
}

// All panels of the weight w [D, K] (row-major) into dst [panels(D)][K][kPanel], in parallel over panels. bf16
// panels are VNNI pairs: element (k, j) of a panel at ((k / 2) * kPanel + j) * 2 + k % 2.
void pack(const float* w, int64_t D, int64_t K, float* dst);
void pack(const c10::BFloat16* w, int64_t D, int64_t K, c10::BFloat16* dst);
// Panel q alone, on the calling thread, into dst (that panel's [K][kPanel] block).
void pack_panel(const float* w, int64_t D, int64_t K, int64_t q, float* dst);
void pack_panel(const c10::BFloat16* w, int64_t D, int64_t K, int64_t q, c10::BFloat16* dst);

// out[r, 0:cols] (row stride ldo) for r < rows (1..kMaxRows), with cols (1..kPanel) of panel `b`:
//   out[r, :] = init[r, :] + sum over c < C, u < P, v < P of px[c*sC + u*sH + r*P + v] * b[k, :],
// k = (c*P + u)*P + v, init's row stride ldi; px points at pixel (0, 0, 0) of the first patch, whose rows are
// consecutive along W (unit stride). Accumulates in fp32 (bf16: products of bf16 pairs, summed in fp32 and
// rounded once into out).
void run(const float* px, int64_t sC, int64_t sH, int64_t P, int64_t C, int64_t rows, const float* b, int64_t cols,
         const float* init, int64_t ldi, float* out, int64_t ldo);
void run(const c10::BFloat16* px, int64_t sC, int64_t sH, int64_t P, int64_t C, int64_t rows, const c10::BFloat16* b,
         int64_t cols, const float* init, int64_t ldi, c10::BFloat16* out, int64_t ldo);

// The patch embedding's weight gradient with the im2col folded in (fp32; runs where available(kFloat, 16), as
// reads() says for fp32 images): one kPanel-column panel of
// dE [D, K], rows (1..kMaxRows) of it,
//   out[r, :] += sum over s < n of a[s * lda + r] * (token s's pixels in the panel's columns),
// a being token-major (the gradient tile as the GEMM before it wrote it: no transpose),
// token s's panel columns being kPanel/16 runs of 16 pixels at tok[s] + off[v], v < kPanel/16 (for patch p, a
// multiple of 16: runs of one image row each). Each output element gets one FMA chain over s in order (from zero,
// then added), so the result does not depend on how rows are split into calls or threads.
void run_weight_grad(const float* a, int64_t lda, int64_t rows, const float* const* tok, int64_t n,
                     const int64_t* off, float* out, int64_t ldo);

}  // namespace mcl::cpu::patch_gemm
