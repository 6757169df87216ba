// How fast the CPU kernels' GEMMs run on operands in L2 against operands that stream from L3: the explanation
// that benchmarks/cpu_phases.py's per-phase rates need. Built and run by benchmarks/gemm_cache.py.
//
// rate(M, N, K, sets, reps, path) : GFLOP/s of `reps` calls of Gemm<float>::run (csrc/cpu/tile_gemm.h, the calls the
// training kernels make) computing C [M, N] += A [M, K] B [K, N], single-threaded, on one of its paths: "brgemm"
// (oneDNN) or "avx2" (csrc/cpu/gemm_avx2.h), chosen as the kernels choose it, through patch_gemm's ISA. The calls
// cycle through `sets` separate copies of A, B and C: with one set the operands stay in L2 from call to call; with
// enough sets to exceed L2 (and to fit L3), every call streams its operands from L3, as the backward's rounds do.
#include <torch/extension.h>

#include <chrono>
#include <string>
#include <vector>

#include "patch_gemm.h"
#include "tile_gemm.h"

namespace {

// The patch kernels' ISA that puts Gemm<float> on `path` (this module's own copy of the setting).
void select(const std::string& path) {
  namespace pg = mcl::cpu::patch_gemm;
  if (path == "avx2") {
    pg::set_isa(pg::Isa::kAvx2);  // raises where the CPU has no AVX2
  } else {
    TORCH_CHECK(path == "brgemm", "gemm_cache: expected path \"brgemm\" or \"avx2\", got \"", path, "\"");
    pg::set_isa(pg::detected_isa() == pg::Isa::kAvx2 ? pg::Isa::kNone : pg::detected_isa());
  }
  TORCH_CHECK(mcl::cpu::use_gemm_avx2() == (path == "avx2"), "gemm_cache: could not select the ", path, " path");
}

double rate(int64_t M, int64_t N, int64_t K, int64_t sets, int64_t reps, const std::string& path) {
  TORCH_CHECK(M > 0 && N > 0 && K > 0 && sets > 0 && reps > 0, "gemm_cache: sizes, sets and reps must be positive");
  select(path);
  const mcl::cpu::Gemm<float> gemm;
  std::vector<std::vector<float>> a(sets), b(sets), c(sets);
  for (int64_t s = 0; s < sets; ++s) {
    a[s].assign(M * K, 0.5f);
    b[s].assign(K * N, 0.25f);
    c[s].assign(M * N, 0.0f);
  }
  auto call = [&](int64_t s) { gemm.run(M, N, K, a[s].data(), K, b[s].data(), N, c[s].data(), N, true); };
  for (int64_t s = 0; s < sets; ++s) call(s);  // warm-up: every set touched once
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) call(r % sets);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  gemm.release();
  return 2.0 * M * N * K * reps / sec / 1e9;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rate", &rate, "GFLOP/s of Gemm<float>::run on a path (\"brgemm\" or \"avx2\"), one thread");
  m.def(
      "has_avx2", [] { return mcl::cpu::patch_gemm::detected_isa() != mcl::cpu::patch_gemm::Isa::kNone; },
      "Whether this CPU runs the avx2 path (AVX2 and FMA; AVX-512 CPUs have them too)");
}
