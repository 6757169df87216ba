// embed_tokens on the CPU: patchify a chunk of images into a patch matrix (parallel over patches), one
// GEMM for the whole chunk (measured ~1.6x faster than a GEMM per image at ViT-B/32 sizes, whose 49 rows
// are too few for BLAS), then `out[b, t0:, :] = tokens_b + (bias + pos[t0:])` written into the output.
// The class-token row is a broadcast copy.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../embed_tokens.h"

namespace mcl {

namespace {

// Patch matrices are built a chunk of images at a time so that they stay small (cache, memory) while
// each parallel_for still has enough rows to split. In elements.
constexpr int64_t kPatchChunkElems = int64_t{1} << 22;

// patches[r, :] for r in [0, rows) = patch (b0 + r / N, r % N) of x, flattened in (c, a, b) order.
// Patchify only moves bits, so it is instantiated per element size, not per dtype; x may have any
// strides (contiguous, channels_last, sliced views): it is read in place.
template <typename bits_t>
void patchify(const at::Tensor& x, at::Tensor& patches, int64_t b0, int64_t rows, const EmbedShape& s) {
  const auto* xp = static_cast<const bits_t*>(x.const_data_ptr());
  auto* pp = static_cast<bits_t*>(patches.data_ptr());
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t P = s.P, C = s.C, N = s.N, Wp = s.Wp;
  const int64_t K = C * P * P;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(K, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = b0 + r / N, n = r % N;
      const int64_t i = n / Wp, j = n % Wp;
      const bits_t* src0 = xp + b * sB + i * P * sH + j * P * sW;
      bits_t* dst = pp + r * K;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t a = 0; a < P; ++a, dst += P) {
          const bits_t* src = src0 + c * sC + a * sH;
          if (sW == 1) {
            std::memcpy(dst, src, P * sizeof(bits_t));
          } else {
            for (int64_t q = 0; q < P; ++q) dst[q] = src[q * sW];
          }
        }
      }
    }
  });
}

void patchify_rows(const at::Tensor& x, at::Tensor& patches, int64_t b0, int64_t rows, const EmbedShape& s) {
  switch (x.element_size()) {
    case 2: return patchify<uint16_t>(x, patches, b0, rows, s);
    case 4: return patchify<uint32_t>(x, patches, b0, rows, s);
    case 8: return patchify<uint64_t>(x, patches, b0, rows, s);
    default: TORCH_CHECK(false, "embed_tokens (cpu): unsupported element size ", x.element_size());
  }
}

}  // namespace

at::Tensor embed_tokens_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& cls_token,
                            const std::optional<at::Tensor>& pos_embed, const EmbedShape& s) {
  at::Tensor out = at::empty({s.B, s.T, s.D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.B == 0) return out;

  const at::Tensor pos = pos_embed.has_value() ? pos_embed->reshape({s.T, s.D}) : at::Tensor();
  if (cls_token.has_value()) {
    at::Tensor row = cls_token->reshape({s.D});
    if (pos.defined()) row = row + pos[0];
    out.select(1, 0).copy_(row);  // broadcast over the batch
  }
  if (s.N == 0) return out;

  // Added to every image's tokens, computed once: [N, D] (bias + pos), [D] (bias) or none.
  at::Tensor add;
  if (pos.defined()) add = pos.narrow(0, s.t0, s.N);
  if (bias.has_value()) add = add.defined() ? add + *bias : *bias;

  const int64_t K = s.C * s.P * s.P;
  const at::Tensor wt = weight.reshape({s.D, K}).t();  // [K, D]
  const int64_t chunk = std::clamp<int64_t>(kPatchChunkElems / std::max<int64_t>(s.N * K, 1), 1, s.B);
  const auto dense = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor patches = at::empty({chunk * s.N, K}, dense);
  // With a class token the chunk's patch rows are not one block of the output (row 0 of every image sits
  // between them), so the GEMM goes to a scratch buffer and the add writes it into place.
  at::Tensor scratch = s.t0 ? at::empty({chunk * s.N, s.D}, dense) : at::Tensor();
  for (int64_t b0 = 0; b0 < s.B; b0 += chunk) {
    const int64_t nb = std::min(chunk, s.B - b0), rows = nb * s.N;
    patchify_rows(x, patches, b0, rows, s);
    const at::Tensor p = patches.narrow(0, 0, rows);
    at::Tensor dst = out.narrow(0, b0, nb).narrow(1, s.t0, s.N);  // [nb, N, D]
    if (s.t0 == 0) {  // dst is contiguous: one GEMM straight into the output, then the add in place
      at::Tensor dst2d = dst.view({rows, s.D});
      at::mm_out(dst2d, p, wt);
      if (add.defined()) dst.add_(add);
    } else {
      at::Tensor tokens = scratch.narrow(0, 0, rows);
      at::mm_out(tokens, p, wt);
      tokens = tokens.view({nb, s.N, s.D});
      if (add.defined()) {
        at::add_out(dst, tokens, add);
      } else {
        dst.copy_(tokens);
      }
    }
  }
  return out;
}

}  // namespace mcl
