// The MCL training embedding (DESIGN.md section 2) and one token-level compression, forward and backward.
//
//   mcl_embed:    x [B, C, H, W] -> S [B, Hs*Ws, D] (patch tokens), L [B, Hl*Wl, D] (k x k groups of S
//                 compressed), R [B, Hs*Ws, D] (L decompressed back to the small grid; absent without
//                 decompression), with Hs = H/p, Ws = W/p, Hl = Hs/k, Wl = Ws/k:
//                   S = conv2d(x, proj_w, proj_b, stride=p) as tokens,  G = group(S) [B, Hl*Wl, k*k*D],
//                   L = G comp_w^T + comp_b,  R = ungroup(L decomp_w^T + decomp_b).
//   mcl_compress: the same from tokens [B, Hs*Ws, D] on a (grid_h, grid_w) grid (chain levels after the first):
//                 L and R only.
// The backward functions return the gradients of every input in argument order, absent (nullopt) where
// `needs` says no; absent upstream gradients count as zeros. Each validates its arguments (shapes, dtypes,
// devices; c10::ValueError / c10::TypeError naming the offending sizes), then runs the implementation for the
// tensors' device. Only a CPU implementation exists (csrc/cpu/mcl_embed.cpp); CUDA tensors get an error
// that names the backends that run there.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace mcl {

// Sizes of one validated compression level over a batch: small grid (Hs, Ws) -> large grid (Hl, Wl).
struct LevelShape {
  int64_t B, D, k;
  int64_t Hs, Ws, Hl, Wl;
  bool decompress;
};

// Sizes of one validated mcl_embed call: the image, the small patch p, and the level on top.
struct MclShape {
  int64_t C, H, W, p;
  LevelShape level;
};

using OptTensor = std::optional<at::Tensor>;

MclShape check_mcl_embed(const at::Tensor& x, const at::Tensor& proj_w, const OptTensor& proj_b,
                         const at::Tensor& comp_w, const OptTensor& comp_b, const OptTensor& decomp_w,
                         const OptTensor& decomp_b, int64_t k);

LevelShape check_mcl_compress(const at::Tensor& tokens, const at::Tensor& comp_w, const OptTensor& comp_b,
                              const OptTensor& decomp_w, const OptTensor& decomp_b, int64_t grid_h,
                              int64_t grid_w, int64_t k);

// (S, L, R); R is nullopt without decompression. Outputs are contiguous, of x's dtype.
std::tuple<at::Tensor, at::Tensor, OptTensor> mcl_embed(const at::Tensor& x, const at::Tensor& proj_w,
                                                        const OptTensor& proj_b, const at::Tensor& comp_w,
                                                        const OptTensor& comp_b, const OptTensor& decomp_w,
                                                        const OptTensor& decomp_b, int64_t k);

// Gradients for (x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b); `small`, `large` are the forward's S, L.
std::vector<OptTensor> mcl_embed_backward(const OptTensor& g_small, const OptTensor& g_large,
                                          const OptTensor& g_recon, const at::Tensor& x, const at::Tensor& proj_w,
                                          const OptTensor& proj_b, const at::Tensor& comp_w,
                                          const OptTensor& comp_b, const OptTensor& decomp_w,
                                          const OptTensor& decomp_b, const at::Tensor& small,
                                          const at::Tensor& large, int64_t k, const std::vector<bool>& needs);

// (L, R); R is nullopt without decompression.
std::tuple<at::Tensor, OptTensor> mcl_compress(const at::Tensor& tokens, const at::Tensor& comp_w,
                                               const OptTensor& comp_b, const OptTensor& decomp_w,
                                               const OptTensor& decomp_b, int64_t grid_h, int64_t grid_w,
                                               int64_t k);

// Gradients for (tokens, comp_w, comp_b, decomp_w, decomp_b); `large` is the forward's L.
std::vector<OptTensor> mcl_compress_backward(const OptTensor& g_large, const OptTensor& g_recon,
                                             const at::Tensor& tokens, const at::Tensor& comp_w,
                                             const OptTensor& comp_b, const OptTensor& decomp_w,
                                             const OptTensor& decomp_b, const at::Tensor& large, int64_t grid_h,
                                             int64_t grid_w, int64_t k, const std::vector<bool>& needs);

// CPU implementations (csrc/cpu/mcl_embed.cpp): arguments validated, upstream gradients and saved outputs
// contiguous (or undefined for absent gradients).
std::tuple<at::Tensor, at::Tensor, OptTensor> mcl_embed_cpu(const at::Tensor& x, const at::Tensor& proj_w,
                                                            const OptTensor& proj_b, const at::Tensor& comp_w,
                                                            const OptTensor& comp_b, const OptTensor& decomp_w,
                                                            const OptTensor& decomp_b, const MclShape& s);

std::vector<OptTensor> mcl_embed_backward_cpu(const at::Tensor& g_small, const at::Tensor& g_large,
                                              const at::Tensor& g_recon, const at::Tensor& x,
                                              const at::Tensor& proj_w, const OptTensor& proj_b,
                                              const at::Tensor& comp_w, const OptTensor& comp_b,
                                              const OptTensor& decomp_w, const OptTensor& decomp_b,
                                              const at::Tensor& small, const at::Tensor& large, const MclShape& s,
                                              const std::vector<bool>& needs);

std::tuple<at::Tensor, OptTensor> mcl_compress_cpu(const at::Tensor& tokens, const at::Tensor& comp_w,
                                                   const OptTensor& comp_b, const OptTensor& decomp_w,
                                                   const OptTensor& decomp_b, const LevelShape& s);

std::vector<OptTensor> mcl_compress_backward_cpu(const at::Tensor& g_large, const at::Tensor& g_recon,
                                                 const at::Tensor& tokens, const at::Tensor& comp_w,
                                                 const OptTensor& comp_b, const OptTensor& decomp_w,
                                                 const OptTensor& decomp_b, const at::Tensor& large,
                                                 const LevelShape& s, const std::vector<bool>& needs);

}  // namespace mcl
