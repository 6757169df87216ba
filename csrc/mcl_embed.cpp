// mcl_embed / mcl_compress: argument validation (once, for every device) and the per-device dispatch.
#include "mcl_embed.h"

#include <string>

#include "checks.h"

namespace mcl {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// An optional tensor must have `shape` and the dtype and device of the input `like`.
void check_optional(const OptTensor& t, at::IntArrayRef shape, const at::Tensor& like, const char* name) {
  if (!t.has_value()) return;
  MCL_CHECK_SHAPE(t->sizes() == shape, "expected ", name, " of shape ", shape, ", got ", t->sizes());
  MCL_CHECK_LIKE_INPUT(t, like, name);
}

// The compression level's parameters at width D; `like` is the level's input (image or tokens).
void check_level_params(int64_t D, int64_t k, const at::Tensor& comp_w, const OptTensor& comp_b,
                        const OptTensor& decomp_w, const OptTensor& decomp_b, const at::Tensor& like) {
  const int64_t KD = k * k * D;
  MCL_CHECK_SHAPE(comp_w.sizes() == at::IntArrayRef({D, KD}), "expected compress.weight of shape [", D, ", ", KD,
                  "] ([D, k*k*D] for D=", D, ", k=", k, "), got ", comp_w.sizes());
  MCL_CHECK_DEVICE(comp_w, like, "compress.weight");
  MCL_CHECK_DTYPE(comp_w, like, "compress.weight");
  check_optional(comp_b, {D}, like, "compress.bias");
  check_optional(decomp_w, {KD, D}, like, "decompress.weight");
  MCL_CHECK_SHAPE(decomp_w.has_value() || !decomp_b.has_value(),
                  "decompress.bias was given without decompress.weight");
  check_optional(decomp_b, {KD}, like, "decompress.bias");
}

// An upstream gradient, when given, must have the shape of the output it belongs to.
void check_grad(const OptTensor& g, at::IntArrayRef shape, const at::Tensor& like, const char* name) {
  if (!g.has_value()) return;
  MCL_CHECK_SHAPE(g->sizes() == shape, "expected the gradient of ", name, " of shape ", shape, ", got ",
                  g->sizes());
  const std::string what = std::string("the gradient of ") + name;
  MCL_CHECK_LIKE_INPUT(g, like, what);
}

at::Tensor dense_or_undefined(const OptTensor& g) { return g.has_value() ? g->contiguous() : at::Tensor(); }

[[noreturn]] void no_kernel_for(const char* op, const at::Device& device) {
  if (device.is_cuda()) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "mcl_kernels._C has no CUDA kernel for ", op,
                                "; on CUDA tensors use backend='triton', 'reference' or 'auto'");
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, " (mcl_kernels._C) runs on cpu tensors, got tensors on ", device);
}

}  // namespace

MclShape check_mcl_embed(const at::Tensor& x, const at::Tensor& proj_w, const OptTensor& proj_b,
                         const at::Tensor& comp_w, const OptTensor& comp_b, const OptTensor& decomp_w,
                         const OptTensor& decomp_b, int64_t k) {
  MCL_CHECK_SHAPE(x.dim() == 4, "expected x as an image batch of rank 4 [B, C, H, W], got shape ", x.sizes(),
                  "; add a batch dimension with x.unsqueeze(0) for one image");
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()),
                   "expected a floating-point x (float32, bfloat16, float16 or float64), got ", x.scalar_type());
  MCL_CHECK_SHAPE(proj_w.dim() == 4 && proj_w.size(2) == proj_w.size(3) && proj_w.size(2) > 0,
                  "expected proj.weight of shape [D, C, p, p] (a square Conv2d patch kernel), got ",
                  proj_w.sizes());
  MCL_CHECK_DEVICE(proj_w, x, "proj.weight");
  MCL_CHECK_DTYPE(proj_w, x, "proj.weight");
  MCL_CHECK_SHAPE(k > 0, "expected compress factor k as a positive integer, got ", k);

  MclShape s{};
  const int64_t D = proj_w.size(0);
  s.C = x.size(1), s.H = x.size(2), s.W = x.size(3), s.p = proj_w.size(2);
  MCL_CHECK_SHAPE(s.C == proj_w.size(1), "expected x with ", proj_w.size(1), " channels (proj.weight is ",
                  proj_w.sizes(), "), got x of shape ", x.sizes());
  const int64_t P = s.p * k;
  MCL_CHECK_SHAPE(s.H % P == 0 && s.W % P == 0, "image size ", s.H, "x", s.W, " (x of shape ", x.sizes(),
                  ") is not a multiple of the large patch ", P, " (patch ", s.p, " x compress ", k,
                  "); resize or pad the image to a multiple of ", P, " in both dimensions");
  check_optional(proj_b, {D}, x, "proj.bias");
  check_level_params(D, k, comp_w, comp_b, decomp_w, decomp_b, x);

  LevelShape& l = s.level;
  l.B = x.size(0), l.D = D, l.k = k;
  l.Hs = s.H / s.p, l.Ws = s.W / s.p, l.Hl = l.Hs / k, l.Wl = l.Ws / k;
  l.decompress = decomp_w.has_value();
  return s;
}

LevelShape check_mcl_compress(const at::Tensor& tokens, const at::Tensor& comp_w, const OptTensor& comp_b,
                              const OptTensor& decomp_w, const OptTensor& decomp_b, int64_t grid_h,
                              int64_t grid_w, int64_t k) {
  MCL_CHECK_SHAPE(tokens.dim() == 3, "expected tokens of shape [B, N, D], got ", tokens.sizes());
  TORCH_CHECK_TYPE(is_supported_float(tokens.scalar_type()),
                   "expected floating-point tokens (float32, bfloat16, float16 or float64), got ",
                   tokens.scalar_type());
  MCL_CHECK_SHAPE(k > 0, "expected compress factor k as a positive integer, got ", k);
  MCL_CHECK_SHAPE(grid_h >= 0 && grid_w >= 0 && tokens.size(1) == grid_h * grid_w, "expected ", grid_h, "x",
                  grid_w, "=", grid_h * grid_w, " tokens, got ", tokens.size(1), " (tokens of shape ",
                  tokens.sizes(), ")");
  MCL_CHECK_SHAPE(grid_h % k == 0 && grid_w % k == 0, "compress=", k, " does not divide the token grid ", grid_h,
                  "x", grid_w, "; image height and width must be multiples of the largest patch of the chain");
  const int64_t D = tokens.size(2);
  check_level_params(D, k, comp_w, comp_b, decomp_w, decomp_b, tokens);
  LevelShape l{};
  l.B = tokens.size(0), l.D = D, l.k = k;
  l.Hs = grid_h, l.Ws = grid_w, l.Hl = grid_h / k, l.Wl = grid_w / k;
  l.decompress = decomp_w.has_value();
  return l;
}

std::tuple<at::Tensor, at::Tensor, OptTensor> mcl_embed(const at::Tensor& x, const at::Tensor& proj_w,
                                                        const OptTensor& proj_b, const at::Tensor& comp_w,
                                                        const OptTensor& comp_b, const OptTensor& decomp_w,
                                                        const OptTensor& decomp_b, int64_t k) {
  const MclShape s = check_mcl_embed(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k);
  if (!x.is_cpu()) no_kernel_for("mcl_embed", x.device());
  return mcl_embed_cpu(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, s);
}

std::vector<OptTensor> mcl_embed_backward(const OptTensor& g_small, const OptTensor& g_large,
                                          const OptTensor& g_recon, const at::Tensor& x, const at::Tensor& proj_w,
                                          const OptTensor& proj_b, const at::Tensor& comp_w,
                                          const OptTensor& comp_b, const OptTensor& decomp_w,
                                          const OptTensor& decomp_b, const at::Tensor& small,
                                          const at::Tensor& large, int64_t k, const std::vector<bool>& needs) {
  const MclShape s = check_mcl_embed(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k);
  MCL_CHECK_SHAPE(needs.size() == 7, "expected 7 flags in needs (x, proj_w, proj_b, comp_w, comp_b, decomp_w, "
                  "decomp_b), got ", needs.size());
  const LevelShape& l = s.level;
  const std::vector<int64_t> small_shape{l.B, l.Hs * l.Ws, l.D}, large_shape{l.B, l.Hl * l.Wl, l.D};
  check_grad(small, small_shape, x, "small (the saved S)");
  check_grad(large, large_shape, x, "large (the saved L)");
  check_grad(g_small, small_shape, x, "small");
  check_grad(g_large, large_shape, x, "large");
  MCL_CHECK_SHAPE(!g_recon.has_value() || l.decompress,
                  "got a gradient of the reconstruction, but there is no decompression (decomp_w is None)");
  check_grad(g_recon, small_shape, x, "recon");
  if (!x.is_cpu()) no_kernel_for("mcl_embed_backward", x.device());
  return mcl_embed_backward_cpu(dense_or_undefined(g_small), dense_or_undefined(g_large),
                                dense_or_undefined(g_recon), x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b,
                                small.contiguous(), large.contiguous(), s, needs);
}

std::tuple<at::Tensor, OptTensor> mcl_compress(const at::Tensor& tokens, const at::Tensor& comp_w,
                                               const OptTensor& comp_b, const OptTensor& decomp_w,
                                               const OptTensor& decomp_b, int64_t grid_h, int64_t grid_w,
                                               int64_t k) {
  const LevelShape l = check_mcl_compress(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k);
  if (!tokens.is_cpu()) no_kernel_for("mcl_compress", tokens.device());
  return mcl_compress_cpu(tokens.contiguous(), comp_w, comp_b, decomp_w, decomp_b, l);
}

std::vector<OptTensor> mcl_compress_backward(const OptTensor& g_large, const OptTensor& g_recon,
                                             const at::Tensor& tokens, const at::Tensor& comp_w,
                                             const OptTensor& comp_b, const OptTensor& decomp_w,
                                             const OptTensor& decomp_b, const at::Tensor& large, int64_t grid_h,
                                             int64_t grid_w, int64_t k, const std::vector<bool>& needs) {
  const LevelShape l = check_mcl_compress(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k);
  MCL_CHECK_SHAPE(needs.size() == 5, "expected 5 flags in needs (tokens, comp_w, comp_b, decomp_w, decomp_b), "
                  "got ", needs.size());
  const std::vector<int64_t> small_shape{l.B, l.Hs * l.Ws, l.D}, large_shape{l.B, l.Hl * l.Wl, l.D};
  check_grad(large, large_shape, tokens, "large (the saved L)");
  check_grad(g_large, large_shape, tokens, "large");
  MCL_CHECK_SHAPE(!g_recon.has_value() || l.decompress,
                  "got a gradient of the reconstruction, but there is no decompression (decomp_w is None)");
  check_grad(g_recon, small_shape, tokens, "recon");
  if (!tokens.is_cpu()) no_kernel_for("mcl_compress_backward", tokens.device());
  return mcl_compress_backward_cpu(dense_or_undefined(g_large), dense_or_undefined(g_recon), tokens.contiguous(),
                                   comp_w, comp_b, decomp_w, decomp_b, large.contiguous(), l, needs);
}

}  // namespace mcl
