// tile_gemm.h's run-time choices: does brgemm take VNNI-packed bf16 here, and do fp32 GEMMs run on gemm_avx2.h?
#include "tile_gemm.h"

#include <ATen/Context.h>

#include "patch_gemm.h"

namespace mcl::cpu {

bool use_gemm_avx2() { return patch_gemm::isa() == patch_gemm::Isa::kAvx2; }

bool bf16_brgemm_vnni() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  // torch's brgemm runs VNNI bf16 only where oneDNN has a bf16 kernel for the CPU (AVX512-BF16 or AMX) and
  // raises otherwise; a 1x16x2 product answers the question once, and checks the packing convention too.
  static const bool supported = [] {
    c10::BFloat16 a[2] = {c10::BFloat16(1.0f), c10::BFloat16(2.0f)};
    c10::BFloat16 b[2 * 16];
    for (int n = 0; n < 16; ++n) {
      b[2 * n] = c10::BFloat16(static_cast<float>(n));          // B[0][n]
      b[2 * n + 1] = c10::BFloat16(static_cast<float>(n + 1));  // B[1][n]
    }
    float c[16];
    try {
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
    } catch (const c10::Error&) {
      return false;
    }
    for (int n = 0; n < 16; ++n) {
      if (c[n] != static_cast<float>(n + 2 * (n + 1))) return false;
    }
    return true;
  }();
  // oneDNN kernels are off when the user disables mkldnn (torch.backends.mkldnn.enabled = False).
  return supported && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

at::Tensor tile_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool add) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2,
              "tile_gemm: expected 2-D a [M, K], b [K, N], c [M, N], got ", a.sizes(), ", ", b.sizes(), ", ", c.sizes());
  TORCH_CHECK(a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1),
              "tile_gemm: shapes do not chain: a ", a.sizes(), ", b ", b.sizes(), ", c ", c.sizes());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu(), "tile_gemm: expected CPU tensors");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16),
              "tile_gemm: expected a and b both float32 or both bfloat16, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(c.scalar_type() == at::kFloat, "tile_gemm: expected float32 c, got ", c.scalar_type());
  for (const at::Tensor* t : {&a, &b, &c}) {
    TORCH_CHECK((t->size(1) <= 1 || t->stride(1) == 1) && (t->size(0) <= 1 || t->stride(0) >= t->size(1)),
                "tile_gemm: expected rows with unit stride, apart by at least their length; got sizes ", t->sizes(),
                ", strides ", t->strides());
  }
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor out = c.clone(at::MemoryFormat::Contiguous);  // ldc = N
  auto ld = [](const at::Tensor& t) { return std::max<int64_t>(t.stride(0), t.size(1)); };
  if (a.scalar_type() == at::kFloat) {
    const Gemm<float> gemm;
    gemm.run(M, N, K, a.data_ptr<float>(), ld(a), b.data_ptr<float>(), ld(b), out.data_ptr<float>(), N, add);
  } else {
    const Gemm<c10::BFloat16> gemm;
    TORCH_CHECK(!gemm.vnni(),
                "tile_gemm: bf16 GEMMs take VNNI-packed B on this CPU; this entry point takes row-major B");
    gemm.run(M, N, K, a.data_ptr<c10::BFloat16>(), ld(a), b.data_ptr<c10::BFloat16>(), ld(b), out.data_ptr<float>(), N,
             add);
    gemm.release();
  }
  return out;
}

}  // namespace mcl::cpu
