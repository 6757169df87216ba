// embed_tokens: argument validation (once, for every device) and the per-device dispatch.
#include "embed_tokens.h"

#include "checks.h"
#include "cpu/embed_prepack.h"

namespace mcl {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

const char* cls_suffix(bool has_cls) { return has_cls ? " + 1 class token" : ""; }

}  // namespace

EmbedShape check_embed_tokens(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& cls_token,
                              const std::optional<at::Tensor>& pos_embed, int64_t patch) {
  MCL_CHECK_SHAPE(x.dim() == 4, "expected x as an image batch of rank 4 [B, C, H, W], got shape ",
                  x.sizes(), "; add a batch dimension with x.unsqueeze(0) for one image");
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "expected a floating-point x (float32, bfloat16, float16 or float64), got ",
                   x.scalar_type());
  MCL_CHECK_SHAPE(patch > 0, "expected a positive patch size, got ", patch);
  MCL_CHECK_SHAPE(weight.dim() == 4 && weight.size(2) == patch && weight.size(3) == patch,
                  "expected weight of shape [D, C, ", patch, ", ", patch, "] (a square Conv2d kernel of ",
                  "the patch size ", patch, "), got ", weight.sizes());
  MCL_CHECK_DEVICE(weight, x, "weight");
  MCL_CHECK_DTYPE(weight, x, "weight");

  EmbedShape s{};
  s.B = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.D = weight.size(0), s.P = patch;
  MCL_CHECK_SHAPE(s.C == weight.size(1), "expected x with ", weight.size(1),
                  " channels (weight is [D, C, P, P] = ", weight.sizes(), "), got x of shape ", x.sizes());
  MCL_CHECK_SHAPE(s.H % s.P == 0 && s.W % s.P == 0, "image size ", s.H, "x", s.W,
                  " (x of shape ", x.sizes(), ") is not a multiple of the patch size ", s.P,
                  "; resize or pad the image to a multiple of ", s.P, " in both dimensions");
  s.Hp = s.H / s.P, s.Wp = s.W / s.P, s.N = s.Hp * s.Wp;
  s.t0 = cls_token.has_value() ? 1 : 0;
  s.T = s.t0 + s.N;

  if (bias.has_value()) {
    MCL_CHECK_SHAPE(bias->dim() == 1 && bias->size(0) == s.D, "expected bias of shape [", s.D,
                    "] (D from weight ", weight.sizes(), "), got ", bias->sizes());
  }
  MCL_CHECK_LIKE_INPUT(bias, x, "bias");
  if (cls_token.has_value()) {
    const auto& c = *cls_token;
    const bool ok = (c.dim() == 1 && c.size(0) == s.D) ||
                    (c.dim() == 3 && c.size(0) == 1 && c.size(1) == 1 && c.size(2) == s.D);
    MCL_CHECK_SHAPE(ok, "expected cls_token of shape [", s.D, "] or [1, 1, ", s.D, "], got ", c.sizes());
  }
  MCL_CHECK_LIKE_INPUT(cls_token, x, "cls_token");
  if (pos_embed.has_value()) {
    const auto& p = *pos_embed;
    const bool ok = (p.dim() == 2 && p.size(0) == s.T && p.size(1) == s.D) ||
                    (p.dim() == 3 && p.size(0) == 1 && p.size(1) == s.T && p.size(2) == s.D);
    MCL_CHECK_SHAPE(ok, "expected pos_embed of shape [", s.T, ", ", s.D, "] or [1, ", s.T, ", ", s.D,
                    "] (", s.Hp, "x", s.Wp, " patches of image ", s.H, "x", s.W, cls_suffix(s.t0 == 1),
                    "), got ", p.sizes());
  }
  MCL_CHECK_LIKE_INPUT(pos_embed, x, "pos_embed");
  return s;
}

at::Tensor embed_tokens(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& cls_token,
                        const std::optional<at::Tensor>& pos_embed, int64_t patch,
                        const std::optional<at::Tensor>& packed_weight) {
  const EmbedShape s = check_embed_tokens(x, weight, bias, cls_token, pos_embed, patch);
  cpu::prepack::check_blob(packed_weight);
  if (x.is_cpu()) {
    return embed_tokens_cpu(x, weight, bias, cls_token, pos_embed, packed_weight, s);
  }
  if (x.is_cuda()) {
#ifdef MCL_WITH_CUDA
    return embed_tokens_cuda(x, weight, bias, cls_token, pos_embed, s);
#else
    TORCH_CHECK(false, "embed_tokens got CUDA tensors, but mcl_kernels._C was built without its CUDA part; "
                "rebuild it with CUDA: MCL_KERNELS_BUILD_CUDA=1 CUDA_HOME=/path/to/cuda "
                "pip install --no-build-isolation -e .");
#endif
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, "embed_tokens runs on cpu and cuda tensors, got tensors on ", x.device());
}

}  // namespace mcl
