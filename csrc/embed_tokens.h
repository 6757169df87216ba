// Inference patch embedding: x [B, C, H, W] -> tokens [B, T, D] with an optional class token in row 0
// and an optional position embedding added, written straight into the output (no concat).
//
//   out[:, 0]      = cls + pos[0]                                   (when cls_token is given)
//   out[:, t0 + n] = patch_n(x) . weight.reshape(D, C*P*P)^T + bias + pos[t0 + n]
//
// patch_n is the n-th P x P patch in row-major order over the (H/P, W/P) grid, flattened in (c, a, b)
// order: exactly conv2d(x, weight, bias, stride=P).flatten(2).transpose(1, 2) (DESIGN.md section 2).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace mcl {

// Sizes of one validated embed_tokens call.
struct EmbedShape {
  int64_t B, C, H, W;  // image batch
  int64_t D, P;        // width, patch size
  int64_t Hp, Wp, N;   // patch grid (H/P, W/P) and its size N = Hp * Wp
  int64_t t0, T;       // first patch row in the output (1 with a class token, else 0), T = t0 + N
};

// Validates every argument (shapes, dtypes, devices) and returns the sizes; throws c10::Error with a
// message naming the offending sizes otherwise. The device implementations below assume it passed.
EmbedShape check_embed_tokens(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& cls_token,
                              const std::optional<at::Tensor>& pos_embed, int64_t patch);

// Validates, then runs the implementation for x.device(). Output [B, T, D], contiguous, x.dtype().
// packed_weight: optionally, embed_tokens_pack(weight) from before the call; the CPU kernels read the weight from it
// where it holds this weight, unchanged, in the layout the call's path reads (cpu/embed_prepack.h), and otherwise pack
// the weight themselves, as without it. Other devices ignore it.
at::Tensor embed_tokens(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& cls_token,
                        const std::optional<at::Tensor>& pos_embed, int64_t patch,
                        const std::optional<at::Tensor>& packed_weight = std::nullopt);

at::Tensor embed_tokens_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& cls_token,
                            const std::optional<at::Tensor>& pos_embed,
                            const std::optional<at::Tensor>& packed_weight, const EmbedShape& s);

// The CPU weight [D, C, P, P] packed for the CPU kernels as they would read it for a contiguous image of its dtype: a
// 1-D uint8 blob to pass to embed_tokens as packed_weight, empty where that path packs nothing (cpu/embed_prepack.h).
at::Tensor embed_tokens_pack(const at::Tensor& weight);

// Whether embed_tokens(x, weight, ...) on the CPU reads its weight from packed_weight rather than packing it.
bool embed_tokens_cpu_uses_packed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed_weight);

// Whether embed_tokens_cpu reads x's pixels directly (cpu/patch_gemm.h) rather than through a patch matrix:
// float32 or bfloat16 with unit W stride, on a CPU with AVX2 and FMA or AVX-512 (AVX512-BF16 and an even patch for
// bfloat16): patch_gemm::reads.
bool embed_tokens_cpu_direct(const at::Tensor& x, int64_t patch);

// Whether embed_tokens_cpu runs x through the AMX tile kernels (cpu/amx_patch_gemm.h) instead: bfloat16 with unit
// W stride, a patch that is a multiple of 16, on a CPU with AMX-BF16 that the OS lets this process use.
bool embed_tokens_cpu_amx(const at::Tensor& x, int64_t patch);

// Whether embed_tokens_cpu runs bfloat16 x through the fp32 direct kernels on widened copies of each tile's images
// (cpu/embed_tokens.cpp, embed_widened): bfloat16 with unit W stride, where neither the bf16 direct kernels nor the
// AMX tiles run but the fp32 ones do (AVX2 CPUs).
bool embed_tokens_cpu_widened(const at::Tensor& x, int64_t patch);

// Whether the direct path splits the weight's panels over the threads rather than the patches (cpu/embed_tokens.cpp,
// by_panels: small batches, panels that divide evenly over at::get_num_threads()), for a weight of `width` rows.
// Both splits give bitwise the same result.
bool embed_tokens_cpu_by_panels(const at::Tensor& x, int64_t width, int64_t patch);

#ifdef MCL_WITH_CUDA
at::Tensor embed_tokens_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& cls_token,
                             const std::optional<at::Tensor>& pos_embed, const EmbedShape& s);
#endif

// Whether this build contains the CUDA implementation (compiled with MCL_WITH_CUDA).
constexpr bool built_with_cuda() {
#ifdef MCL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace mcl
