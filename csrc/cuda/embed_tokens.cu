// embed_tokens on CUDA: an im2col kernel builds the patch matrix [B*N, K], cuBLAS (at::mm) multiplies
// it by W^T, and an epilogue kernel writes [B, T, D]: the class-token row, and every patch token plus
// bias plus pos, accumulated in the op-math type (float for bf16/fp16). All indexing is int64.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE/cuSOLVER headers,
// which a minimal toolkit (nvcc + cudart) lacks and which this file does not use.
#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../embed_tokens.h"

namespace mcl {

namespace {

constexpr int kThreads = 256;

// Grid-stride loops cover any size; the grid itself stays within launch limits.
inline unsigned int num_blocks(int64_t total) {
  return static_cast<unsigned int>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// patches[r, k] = x[b, c, i*P + a, j*P + q] with r = b*N + i*Wp + j and k = (c*P + a)*P + q. A pure copy,
// so it is instantiated per element size; x is read through its strides (any layout).
template <typename bits_t>
__global__ void im2col_kernel(const bits_t* __restrict__ x, bits_t* __restrict__ patches, int64_t total,
                              int64_t C, int64_t P, int64_t N, int64_t Wp, int64_t sB, int64_t sC,
                              int64_t sH, int64_t sW) {
  const int64_t PP = P * P, K = C * PP;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t r = idx / K, k = idx % K;
    const int64_t b = r / N, n = r % N;
    const int64_t i = n / Wp, j = n % Wp;
    const int64_t c = k / PP, a = (k % PP) / P, q = k % P;
    patches[idx] = x[b * sB + c * sC + (i * P + a) * sH + (j * P + q) * sW];
  }
}

// out[b, t, d] (contiguous [B, T, D]) = (t < t0 ? cls[d] : tokens[b*N + t - t0, d] + bias[d]) + pos[t, d];
// null bias / pos / cls pointers mean the term is absent.
template <typename scalar_t>
__global__ void epilogue_kernel(const scalar_t* __restrict__ tokens, const scalar_t* __restrict__ bias,
                                const scalar_t* __restrict__ cls, const scalar_t* __restrict__ pos,
                                scalar_t* __restrict__ out, int64_t total, int64_t T, int64_t D, int64_t N,
                                int64_t t0) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t d = idx % D, bt = idx / D;
    const int64_t t = bt % T, b = bt / T;
    opmath_t v;
    if (t < t0) {
      v = static_cast<opmath_t>(cls[d]);
    } else {
      v = static_cast<opmath_t>(tokens[(b * N + (t - t0)) * D + d]);
      if (bias != nullptr) v += static_cast<opmath_t>(bias[d]);
    }
    if (pos != nullptr) v += static_cast<opmath_t>(pos[t * D + d]);
    out[idx] = static_cast<scalar_t>(v);
  }
}

template <typename bits_t>
void launch_im2col(const at::Tensor& x, at::Tensor& patches, const EmbedShape& s, cudaStream_t stream) {
  const int64_t total = patches.numel();
  im2col_kernel<bits_t><<<num_blocks(total), kThreads, 0, stream>>>(
      static_cast<const bits_t*>(x.const_data_ptr()), static_cast<bits_t*>(patches.data_ptr()), total, s.C,
      s.P, s.N, s.Wp, x.stride(0), x.stride(1), x.stride(2), x.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor embed_tokens_cuda(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& cls_token,
                             const std::optional<at::Tensor>& pos_embed, const EmbedShape& s) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.B, s.T, s.D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t K = s.C * s.P * s.P;
  at::Tensor tokens;  // [B*N, D]
  if (s.N > 0) {
    at::Tensor patches = at::empty({s.B * s.N, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
    if (patches.numel() > 0) {
      switch (x.element_size()) {
        case 2: launch_im2col<uint16_t>(x, patches, s, stream); break;
        case 4: launch_im2col<uint32_t>(x, patches, s, stream); break;
        case 8: launch_im2col<uint64_t>(x, patches, s, stream); break;
        default: TORCH_CHECK(false, "embed_tokens (cuda): unsupported element size ", x.element_size());
      }
    }
    tokens = at::mm(patches, weight.reshape({s.D, K}).t());
  }
  // Contiguous copies (no-ops when already contiguous) so the epilogue indexes them flat.
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor cls = cls_token.has_value() ? cls_token->reshape({s.D}).contiguous() : at::Tensor();
  const at::Tensor pos = pos_embed.has_value() ? pos_embed->reshape({s.T, s.D}).contiguous() : at::Tensor();

  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "embed_tokens_cuda", [&] {
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    epilogue_kernel<scalar_t><<<num_blocks(total), kThreads, 0, stream>>>(
        ptr(tokens), ptr(b), ptr(cls), ptr(pos), out.mutable_data_ptr<scalar_t>(), total, s.T, s.D, s.N, s.t0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace mcl
