// embed_prepack.h: the packed-weight blob's header, its packing and its check.
#include "embed_prepack.h"

#include <cstdint>
#include <cstring>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include "../embed_tokens.h"
#include "amx_patch_gemm.h"
#include "patch_gemm.h"

namespace mcl::cpu::prepack {

namespace {

constexpr int64_t kMagic = 0x4d434c5057310001;  // this format, version 1: not a blob of anything else
constexpr int64_t kHeaderBytes = 64;          // keeps the packed weight 64-byte aligned

struct Header {
  int64_t magic, kind, isa, D, C, P, weight_ptr, version;
};
static_assert(sizeof(Header) == kHeaderBytes, "the header is one 64-byte line");

// Bytes of the packed weight of D x K in layout `kind`.
int64_t packed_bytes(Kind kind, int64_t D, int64_t K) {
  switch (kind) {
    case Kind::kPanelsF32: return patch_gemm::panels(D) * K * patch_gemm::kPanel * 4;
    case Kind::kPanelsBf16: return patch_gemm::panels(D) * K * patch_gemm::kPanel * 2;
    case Kind::kAmx: return amx::packed_size(D, K) * 2;
    default: return 0;
  }
}

// The version counter of `weight`; inference tensors have none (-1: never matches).
int64_t version_of(const at::Tensor& weight) {
  return weight.is_inference() ? -1 : static_cast<int64_t>(weight._version());
}

}  // namespace

Kind kind_for(const at::Tensor& x, int64_t P) {
  if (x.scalar_type() == at::kBFloat16 && embed_tokens_cpu_amx(x, P)) return Kind::kAmx;
  if (embed_tokens_cpu_direct(x, P)) {
    if (x.scalar_type() == at::kFloat) return Kind::kPanelsF32;
    if (x.scalar_type() == at::kBFloat16) return Kind::kPanelsBf16;
  }
  if (x.scalar_type() == at::kBFloat16 && embed_tokens_cpu_widened(x, P)) return Kind::kPanelsF32;
  return Kind::kNone;
}

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3),
              "embed_tokens_pack: expected a patch embedding weight [D, C, P, P] (square patches), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.device().is_cpu(), "embed_tokens_pack: packs CPU weights for the CPU kernels, got a weight on ",
              weight.device());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "embed_tokens_pack: expected a floating-point weight, got ",
              weight.scalar_type());
  const int64_t D = weight.size(0), C = weight.size(1), P = weight.size(2), K = C * P * P;
  const auto bytes = at::TensorOptions().dtype(at::kByte);
  // How a contiguous image of the weight's dtype runs (the path depends on the dtype, the strides and the CPU only).
  const Kind kind = kind_for(at::empty({1, C, P, P}, weight.options()), P);
  if (kind == Kind::kNone || weight.is_inference() || D == 0 || K == 0) return at::empty({0}, bytes);
  at::Tensor blob = at::empty({kHeaderBytes + packed_bytes(kind, D, K)}, bytes);
  const Header h{kMagic, static_cast<int64_t>(kind), static_cast<int64_t>(patch_gemm::isa()), D, C, P,
                 reinterpret_cast<int64_t>(weight.const_data_ptr()), version_of(weight)};
  uint8_t* base = blob.data_ptr<uint8_t>();
  std::memcpy(base, &h, sizeof(h));
  void* dst = base + kHeaderBytes;
  if (kind == Kind::kPanelsF32) {
    const at::Tensor w2d = weight.reshape({D, K}).to(at::kFloat).contiguous();
    patch_gemm::pack(w2d.const_data_ptr<float>(), D, K, P * P, static_cast<float*>(dst));
  } else {
    const at::Tensor w2d = weight.reshape({D, K}).contiguous();
    const auto* w = static_cast<const c10::BFloat16*>(w2d.const_data_ptr());
    if (kind == Kind::kPanelsBf16) {
      patch_gemm::pack(w, D, K, P * P, static_cast<c10::BFloat16*>(dst));
    } else {
      amx::pack(w, D, K, static_cast<c10::BFloat16*>(dst));
    }
  }
  return blob;
}

void check_blob(const std::optional<at::Tensor>& blob) {
  if (!blob.has_value() || !blob->defined()) return;
  TORCH_CHECK(blob->scalar_type() == at::kByte && blob->dim() == 1 && blob->device().is_cpu(),
              "embed_tokens: expected packed_weight as the 1-D uint8 CPU tensor embed_tokens_pack returns, got a ",
              blob->scalar_type(), " tensor of shape ", blob->sizes(), " on ", blob->device());
}

const void* prepacked(const std::optional<at::Tensor>& blob, const at::Tensor& weight, Kind kind) {
  if (kind == Kind::kNone || !blob.has_value() || !blob->defined() || blob->numel() < kHeaderBytes ||
      !blob->is_contiguous() || weight.dim() != 4) {
    return nullptr;
  }
  Header h{};
  const auto* base = static_cast<const uint8_t*>(blob->const_data_ptr());
  std::memcpy(&h, base, sizeof(h));
  const int64_t D = weight.size(0), C = weight.size(1), P = weight.size(2);
  const bool match = h.magic == kMagic && h.kind == static_cast<int64_t>(kind) &&
                     h.isa == static_cast<int64_t>(patch_gemm::isa()) && h.D == D && h.C == C && h.P == P &&
                     h.weight_ptr == reinterpret_cast<int64_t>(weight.const_data_ptr()) &&
                     h.version == version_of(weight) && h.version >= 0 &&
                     blob->numel() == kHeaderBytes + packed_bytes(kind, D, C * P * P) &&
                     reinterpret_cast<uintptr_t>(base + kHeaderBytes) % 64 == 0;
  return match ? base + kHeaderBytes : nullptr;
}

}  // namespace mcl::cpu::prepack
