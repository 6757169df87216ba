// C++ tests of cpu/simd.h: each function as dispatched (AVX-512 or AVX2, whichever this CPU has) against its
// portable path, bitwise, on every block edge (shapes 1..19 around the 8- and 16-wide blocks, padded strides) and
// on the values rounding can get wrong (ties, NaN, infinities, the largest finite values). The exit status is the
// failure count.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>

#include "cpu/simd.h"

namespace simd = mcl::cpu::simd;
using bf16 = c10::BFloat16;

namespace {

int g_checks = 0;
int g_failures = 0;

template <typename T>
void expect_same(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  ++g_checks;
  if (got.size() != want.size() || std::memcmp(got.data(), want.data(), sizeof(T) * got.size()) != 0) {
    ++g_failures;
    size_t i = 0;
    while (i < got.size() && std::memcmp(&got[i], &want[i], sizeof(T)) == 0) ++i;
    std::fprintf(stderr, "FAIL: %s: first difference at element %zu of %zu\n", what.c_str(), i, got.size());
  }
}

// Random floats with the special values mixed in: ties at the bf16 rounding point (both parities), NaNs of both
// signs and payloads, infinities, the largest finite values, and values that round up to infinity.
std::vector<float> values(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 3.f);
  const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x7fc00000u, 0xffc00001u, 0x7f800001u,
                              0x7f800000u, 0xff800000u, 0x7f7fffffu, 0xff7fffffu, 0x7f7f8000u, 0x00000001u,
                              0x80000000u, 0x3f80ffffu};
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (rng() % 5 == 0) {
      std::memcpy(&v[i], &special[rng() % (sizeof special / sizeof special[0])], sizeof(float));
    } else {
      v[i] = normal(rng);
    }
  }
  return v;
}

std::vector<bf16> rounded(const std::vector<float>& v) {
  std::vector<bf16> r(v.size());
  simd::portable::to_bf16(v.data(), r.data(), static_cast<int64_t>(v.size()));
  return r;
}

std::string shape(int64_t M, int64_t N) { return std::to_string(M) + " x " + std::to_string(N); }

}  // namespace

int main() {
  std::mt19937 rng(0);
  std::printf("simd functions run with: %s\n", simd::isa());
  for (int64_t M = 1; M <= 19; ++M) {
    for (int64_t N = 1; N <= 19; ++N) {
      const int64_t lds = N + 3, ldd = M + 5;  // padded rows: the functions must touch only their M x N
      const auto src = values(static_cast<size_t>(M * lds), rng);
      const auto src16 = rounded(src);
      const auto fill = values(static_cast<size_t>(N * ldd), rng);  // what lies in dst beyond the block
      const auto fill16 = rounded(fill);

      std::vector<float> got = fill, want = fill;
      simd::transpose32(src.data(), lds, M, N, got.data(), ldd);
      simd::portable::transpose32(src.data(), lds, M, N, want.data(), ldd);
      expect_same(got, want, "transpose32 " + shape(M, N));

      std::vector<bf16> g16 = fill16, w16 = fill16;
      simd::transpose_to_bf16(src.data(), lds, M, N, g16.data(), ldd);
      simd::portable::transpose_to_bf16(src.data(), lds, M, N, w16.data(), ldd);
      expect_same(g16, w16, "transpose_to_bf16 (fp32) " + shape(M, N));

      g16 = fill16, w16 = fill16;
      simd::transpose_to_bf16(src16.data(), lds, M, N, g16.data(), ldd);
      simd::portable::transpose_to_bf16(src16.data(), lds, M, N, w16.data(), ldd);
      expect_same(g16, w16, "transpose_to_bf16 (bf16) " + shape(M, N));
    }
  }
  for (int64_t n = 0; n <= 67; ++n) {
    const auto v = values(static_cast<size_t>(n) + 1, rng);  // one past n: must stay untouched
    const auto v16 = rounded(v), w16b = rounded(values(static_cast<size_t>(n) + 1, rng));

    std::vector<bf16> g16 = rounded(values(static_cast<size_t>(n) + 1, rng)), w16 = g16;
    simd::to_bf16(v.data(), g16.data(), n);
    simd::portable::to_bf16(v.data(), w16.data(), n);
    expect_same(g16, w16, "to_bf16 n = " + std::to_string(n));

    std::vector<float> gf = values(static_cast<size_t>(n) + 1, rng), wf = gf;
    simd::to_float(v16.data(), gf.data(), n);
    simd::portable::to_float(v16.data(), wf.data(), n);
    expect_same(gf, wf, "to_float n = " + std::to_string(n));

    std::vector<bf16> gi = rounded(values(2 * static_cast<size_t>(n) + 1, rng)), wi = gi;
    simd::interleave(v16.data(), w16b.data(), gi.data(), n);
    simd::portable::interleave(v16.data(), w16b.data(), wi.data(), n);
    expect_same(gi, wi, "interleave n = " + std::to_string(n));
  }
  // The portable rounding is c10::BFloat16's (round to nearest even, NaN -> quiet NaN): pin it, so that a change to
  // both paths at once cannot pass unnoticed.
  const auto special = values(4096, rng);
  std::vector<bf16> p16(special.size());
  simd::portable::to_bf16(special.data(), p16.data(), static_cast<int64_t>(special.size()));
  for (size_t i = 0; i < special.size(); ++i) {
    const bf16 c(special[i]);
    ++g_checks;
    if (std::isnan(special[i]) ? !std::isnan(static_cast<float>(p16[i])) : p16[i].x != c.x) {
      ++g_failures;
      std::fprintf(stderr, "FAIL: portable to_bf16 of %a gives 0x%04x, c10::BFloat16 0x%04x\n", special[i], p16[i].x,
                   c.x);
      break;
    }
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures;
}
