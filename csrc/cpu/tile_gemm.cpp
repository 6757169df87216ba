// The one run-time probe of tile_gemm.h: does brgemm take VNNI-packed bf16 here?
#include "tile_gemm.h"

#include <ATen/Context.h>

namespace mcl::cpu {

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

}  // namespace mcl::cpu
