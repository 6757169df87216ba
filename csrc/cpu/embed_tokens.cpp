// embed_tokens on the CPU: tiles of whole images, one tile per thread (at::parallel_for). Per tile the patches
// are copied into a cache-sized patch matrix (implicit im2col: no [B*N, C*P*P] tensor) and multiplied by the
// weight with tile_gemm.h's single-threaded brgemm, accumulating onto rows pre-filled with bias + pos[t0 + n],
// so the epilogue costs no extra pass: fp32 GEMMs write the output rows of each image in place; bf16 GEMMs
// accumulate in fp32 and round once into the output. The class-token row is a broadcast copy.
//
// Measured against timm's PatchEmbed (oneDNN conv2d, patch 32) + cat + add, see benchmarks/kernels.py: the
// stride-32 convolution runs well below the GEMM peak, the tiled GEMM close to it.
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../embed_tokens.h"
#include "tile_gemm.h"

namespace mcl {

namespace {

using cpu::acc_type;
using cpu::convert_n;
using cpu::cvt;
using cpu::Gemm;
using cpu::op_type;
using cpu::round_up;

// Patch rows per tile, in whole images (at least one): ~2 MiB of fp32 patch matrix at patch 32.
constexpr int64_t kTilePatches = 160;

template <typename scalar_t>
void embed_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& pos_embed, const EmbedShape& s, at::Tensor& out) {
  using O = op_type<scalar_t>;
  using A = acc_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<A, scalar_t>;  // the GEMM accumulates in the output itself
  const Gemm<O> gemm;
  const int64_t D = s.D, N = s.N, P = s.P, K = s.C * P * P, Kp = round_up(K, gemm.k_align());

  // B = weight^T [K, D] in the GEMM's layout.
  const at::Tensor w2d = weight.reshape({D, K}).contiguous();
  at::Tensor wb = at::empty({Kp * D}, at::TensorOptions().dtype(c10::CppTypeToScalarType<O>::value));
  cpu::pack_b_transposed(gemm, static_cast<const scalar_t*>(w2d.data_ptr()), K, K, Kp, D,
                         static_cast<O*>(wb.data_ptr()));

  // Row n of every image starts from add[n] = bias + pos[t0 + n] (zeros when neither is given).
  std::vector<A> add(N * D, A(0));
  if (pos_embed.has_value()) {
    const at::Tensor pos = pos_embed->reshape({s.T, D}).narrow(0, s.t0, N).to(c10::CppTypeToScalarType<A>::value)
                               .contiguous();
    std::copy_n(static_cast<const A*>(pos.data_ptr()), N * D, add.begin());
  }
  if (bias.has_value()) {
    const at::Tensor b = bias->to(c10::CppTypeToScalarType<A>::value).contiguous();
    const A* bp = static_cast<const A*>(b.data_ptr());
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t d = 0; d < D; ++d) add[n * D + d] += bp[d];
    }
  }

  const int64_t images = std::max<int64_t>(1, kTilePatches / std::max<int64_t>(N, 1));
  const int64_t ntiles = (s.B + images - 1) / images;
  const int64_t slots = std::min<int64_t>(at::get_num_threads(), ntiles);
  const auto op_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<O>::value);
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  std::vector<at::Tensor> abuf, cbuf;
  for (int64_t i = 0; i < slots; ++i) {
    abuf.push_back(at::zeros({images * N * Kp}, op_opts));  // zero: the padding columns stay 0
    if (!kDirect) cbuf.push_back(at::empty({N * D}, acc_opts));
  }
  const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  scalar_t* op = static_cast<scalar_t*>(out.data_ptr());

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      O* a = static_cast<O*>(abuf[slot].data_ptr());
      for (int64_t tile = slot * ntiles / slots; tile < (slot + 1) * ntiles / slots; ++tile) {
        const int64_t b0 = tile * images, b1 = std::min(s.B, b0 + images);
        // Patch matrix of images [b0, b1): row (b - b0) * N + i * Wp + j, columns (c, u, v) = weight's order.
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t i = 0; i < s.Hp; ++i) {
            O* rows = a + ((b - b0) * N + i * s.Wp) * Kp;
            for (int64_t c = 0; c < s.C; ++c) {
              for (int64_t u = 0; u < P; ++u) {
                const scalar_t* src = xp + b * sB + c * sC + (i * P + u) * sH;
                for (int64_t j = 0; j < s.Wp; ++j) {
                  O* dst = rows + j * Kp + (c * P + u) * P;
                  const scalar_t* px = src + j * P * sW;
                  if (sW == 1) {
                    for (int64_t v = 0; v < P; ++v) dst[v] = cvt<O>(px[v]);
                  } else {
                    for (int64_t v = 0; v < P; ++v) dst[v] = cvt<O>(px[v * sW]);
                  }
                }
              }
            }
          }
        }
        for (int64_t b = b0; b < b1; ++b) {  // one GEMM per image: its rows of the output are contiguous
          scalar_t* dst = op + (b * s.T + s.t0) * D;
          A* c;
          if constexpr (kDirect) {
            c = dst;
          } else {
            c = static_cast<A*>(cbuf[slot].data_ptr());
          }
          std::copy(add.begin(), add.end(), c);
          gemm.run(N, D, Kp, a + (b - b0) * N * Kp, Kp, static_cast<const O*>(wb.data_ptr()), D, c, D, true);
          if constexpr (!kDirect) convert_n(c, dst, N * D);
        }
      }
    }
    gemm.release();
  });
}

}  // namespace

at::Tensor embed_tokens_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& cls_token,
                            const std::optional<at::Tensor>& pos_embed, const EmbedShape& s) {
  at::Tensor out = at::empty({s.B, s.T, s.D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.B == 0) return out;
  if (cls_token.has_value()) {
    at::Tensor row = cls_token->reshape({s.D});
    if (pos_embed.has_value()) row = row + pos_embed->reshape({s.T, s.D})[0];
    out.select(1, 0).copy_(row);  // broadcast over the batch
  }
  if (s.N == 0 || s.D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "embed_tokens_cpu", [&] {
    embed_cpu<scalar_t>(x, weight, bias, pos_embed, s, out);
  });
  return out;
}

}  // namespace mcl
