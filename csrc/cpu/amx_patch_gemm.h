// The bf16 patch-embedding GEMM on Intel AMX tiles, pixels read straight from the image (embed_tokens, and
// mcl_embed's small tokens S).
//
// A tile row is up to 32 bf16 (64 bytes): 32 consecutive pixels of one patch row (16 when P is not a multiple of
// 32: half the work per dot product), so an A tile is up to 16 patches at one k step (c, u, chunk), loaded with
// one stride: the same patch of 16 images (stride: the image's), or
// 16 consecutive patches of one patch row (stride P). B tiles are 16 columns of the weight in VNNI pairs, packed
// contiguously per k step. A kernel call runs two groups of patches x two 16-column tiles (four fp32
// accumulator tiles, the 2 x 2 blocking that loads two A and two B tiles per four dot products) over all of k, then
// adds each row's starting values (bias + position) and rounds once into the output.
//
// Each output element is one accumulation over k in a fixed order whatever the grouping, so the results do not
// depend on the thread count. TDPBF16PS treats bf16 denormals as zero; the other bf16 paths do not (the results
// differ from them within bf16 rounding, not bitwise).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

namespace mcl::cpu::amx {

constexpr int64_t kRows = 16;   // patches per group: an A tile's rows
constexpr int64_t kCols = 16;   // output columns per B tile
constexpr int64_t kMinChunk = 16;  // pixels per k step: a tile row of 32 bf16, or 16 when P is not a multiple of 32

inline int64_t step(int64_t P) { return P % 32 == 0 ? 32 : kMinChunk; }

// Whether this CPU has AMX-BF16 tiles and the OS lets this process use them (Linux: asked for once, through
// arch_prctl(ARCH_REQ_XCOMP_PERM)).
bool available();

// Whether the kernel can read the images x [B, C, H, W] for patch size P: bf16, unit W stride, P a multiple of
// 16, available().
bool reads(const at::Tensor& x, int64_t P);

// The weight w [D, K] (row-major, K a multiple of 32) as B tiles: column block n (columns n*16 .. n*16 + 15, zeros
// past D) at dst + n * 16 * K, K / 2 rows of 16 VNNI pairs; k step t's tile is its pair rows [t, t + 1) * step / 2.
int64_t packed_size(int64_t D, int64_t K);
void pack(const c10::BFloat16* w, int64_t D, int64_t K, c10::BFloat16* dst);

// A group of rows (1..kRows) patches whose pixels are `ps` elements apart (px: pixel (0, 0, 0) of the first), and
// whose outputs start from init (row stride `is`: 0 when the patches share a position) and go to out (row stride
// `os`).
struct Group {
  const c10::BFloat16* px;
  int64_t ps;
  int64_t rows;
  const float* init;
  int64_t is;
  c10::BFloat16* out;
  int64_t os;
};

// Every output column of groups [0, n), on this thread: column blocks of 16 in pairs, each over the groups in
// pairs, so that a pair of column blocks of the weight (2 x 16 x K bf16) stays in L2 while the groups' pixels pass.
// sC, sH: the image's channel and row strides; C channels; D output columns; wp: pack()'s output.
void run(const Group* groups, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C, const c10::BFloat16* wp,
         int64_t D);

}  // namespace mcl::cpu::amx
