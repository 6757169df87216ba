// embed_tokens on the CPU: tiles of patch rows, the same number per thread (at::parallel_for). Per tile the
// patches are copied into a cache-sized patch matrix (implicit im2col: no [B*N, C*P*P] tensor) and multiplied by the
// weight with tile_gemm.h's single-threaded brgemm, accumulating onto rows pre-filled with bias + pos[t0 + n],
// so the epilogue costs no extra pass: fp32 GEMMs write the output rows of each image in place; bf16 GEMMs
// accumulate in fp32 and round once into the output. The class-token row is a broadcast copy. Every output
// row is one GEMM row summed in the GEMM's fixed K order, so the result does not depend on the tiling, and so
// not on the thread count (tested bitwise).
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

// Patch rows per tile: ~2 MiB of fp32 patch matrix at patch 32. Tiles are runs of patch rows over the whole
// batch (b, n), as many per thread and as equal as rows allow: whole-image tiles left threads idle or uneven
// below ~8 images per thread (B = 8 at 2 threads: 3 + 5 images, 0.87x the reference's time in fp32).
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

  // Tile t holds patch rows [t * rows / ntiles, (t + 1) * rows / ntiles) of the flat (b, n) order; thread
  // `slot` runs tiles [slot * per_slot, (slot + 1) * per_slot).
  const int64_t rows = s.B * N;
  const int64_t slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  const int64_t per_slot = std::max<int64_t>(1, (rows + kTilePatches * slots - 1) / (kTilePatches * slots));
  const int64_t ntiles = per_slot * slots;
  const int64_t tile_max = (rows + ntiles - 1) / ntiles;
  const auto op_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<O>::value);
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  std::vector<at::Tensor> abuf, cbuf;
  for (int64_t i = 0; i < slots; ++i) {
    abuf.push_back(at::zeros({tile_max * Kp}, op_opts));  // zero: the padding columns stay 0
    if (!kDirect) cbuf.push_back(at::empty({std::min(tile_max, N) * D}, acc_opts));
  }
  const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  scalar_t* op = static_cast<scalar_t*>(out.data_ptr());

  at::parallel_for(0, slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      O* a = static_cast<O*>(abuf[slot].data_ptr());
      for (int64_t tile = slot * per_slot; tile < (slot + 1) * per_slot; ++tile) {
        const int64_t r0 = tile * rows / ntiles, r1 = (tile + 1) * rows / ntiles;
        // Patch matrix of rows [r0, r1): row r - r0, columns (c, u, v) = weight's order. Walked by runs of one
        // patch row (b, i) so that each image row is read left to right.
        for (int64_t r = r0; r < r1;) {
          const int64_t b = r / N, n = r % N, i = n / s.Wp, j0 = n % s.Wp;
          const int64_t j1 = std::min(s.Wp, j0 + (r1 - r));
          O* run = a + (r - r0) * Kp;  // row of patch (b, i, j0)
          for (int64_t c = 0; c < s.C; ++c) {
            for (int64_t u = 0; u < P; ++u) {
              const scalar_t* src = xp + b * sB + c * sC + (i * P + u) * sH;
              for (int64_t j = j0; j < j1; ++j) {
                O* dst = run + (j - j0) * Kp + (c * P + u) * P;
                const scalar_t* px = src + j * P * sW;
                if (sW == 1) {
                  for (int64_t v = 0; v < P; ++v) dst[v] = cvt<O>(px[v]);
                } else {
                  for (int64_t v = 0; v < P; ++v) dst[v] = cvt<O>(px[v * sW]);
                }
              }
            }
          }
          r += j1 - j0;
        }
        // One GEMM per image in the tile: an image's rows of the output are contiguous.
        for (int64_t r = r0; r < r1;) {
          const int64_t b = r / N, n = r % N, m = std::min(N - n, r1 - r);
          scalar_t* dst = op + (b * s.T + s.t0 + n) * D;
          A* c;
          if constexpr (kDirect) {
            c = dst;
          } else {
            c = static_cast<A*>(cbuf[slot].data_ptr());
          }
          std::copy(add.begin() + n * D, add.begin() + (n + m) * D, c);
          gemm.run(m, D, Kp, a + (r - r0) * Kp, Kp, static_cast<const O*>(wb.data_ptr()), D, c, D, true);
          if constexpr (!kDirect) convert_n(c, dst, m * D);
          r += m;
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
