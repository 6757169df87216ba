// amx_patch_gemm.h: AMX tile kernels, compiled through target attributes and run only where available().
#include "amx_patch_gemm.h"

#include <algorithm>
#include <cstring>

#include <c10/util/Exception.h>

#include "simd.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && defined(__linux__)
#define MCL_AMX_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mcl::cpu::amx {

int64_t packed_size(int64_t D, int64_t K) { return (D + kCols - 1) / kCols * kCols * K; }

void pack(const c10::BFloat16* w, int64_t D, int64_t K, c10::BFloat16* dst) {
  TORCH_CHECK(K % (2 * kMinChunk) == 0, "mcl_kernels: AMX weight tiles need K a multiple of 32, got ", K);
  simd::pack_panels32(w, D, K / 2, kCols, dst);  // pairs (k, k + 1) as 32-bit words: VNNI is their transpose
}

bool reads(const at::Tensor& x, int64_t P) {
  return x.dim() == 4 && x.scalar_type() == at::kBFloat16 && (x.stride(3) == 1 || x.size(3) <= 1) &&
         P % kMinChunk == 0 && available();
}

#if defined(MCL_AMX_X86)

namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool probe() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
  if (!tile || !bf16) return false;
  // The tile data state is off until the process asks for it (Linux 5.16+); refused on older kernels or in a VM
  // that does not pass AMX through.
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Tiles 0-3: accumulators (group g, column block c) at 2 g + c; 4, 5: the groups' A tiles; 6, 7: the B tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

#define MCL_AMX __attribute__((target("amx-tile,amx-bf16,avx512f")))

// A tiles of m0 and m1 rows (m1 = 0: one group) and `chunk` pixels; B tiles of chunk / 2 pair rows.
MCL_AMX void configure(int64_t m0, int64_t m1, int64_t chunk) {
  TileConfig cfg;
  const auto r0 = static_cast<uint8_t>(m0), r1 = static_cast<uint8_t>(m1);
  const auto a_bytes = static_cast<uint16_t>(2 * chunk);
  for (int t : {0, 1}) cfg.rows[t] = r0, cfg.colsb[t] = 64;
  if (m1 > 0) {
    for (int t : {2, 3}) cfg.rows[t] = r1, cfg.colsb[t] = 64;
    cfg.rows[5] = r1, cfg.colsb[5] = a_bytes;
  }
  cfg.rows[4] = r0, cfg.colsb[4] = a_bytes;
  for (int t : {6, 7}) cfg.rows[t] = static_cast<uint8_t>(chunk / 2), cfg.colsb[t] = 64;
  // Not _tile_loadconfig: GCC 12's declares only 8 bytes of the 64 as read, so the stores of the rest may be dropped.
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

// Rows of one accumulator tile, plus their starting values, rounded into the output.
MCL_AMX void finish(const float* acc, const Group& g, int64_t col0, int64_t cols) {
  const auto mask = static_cast<__mmask16>(cols >= kCols ? 0xFFFF : (1u << cols) - 1);
  alignas(64) float row[kCols];
  for (int64_t r = 0; r < g.rows; ++r) {
    const __m512 init = _mm512_maskz_loadu_ps(mask, g.init + r * g.is + col0);
    _mm512_store_ps(row, _mm512_add_ps(_mm512_load_ps(acc + r * kCols), init));
    simd::to_bf16(row, g.out + r * g.os + col0, cols);
  }
}

// Groups g0 (and g1 when two) x column blocks n (and n + 1 when two_cols), over every k step.
template <bool kTwoGroups, bool kTwoCols>
MCL_AMX void tiles(const Group& g0, const Group& g1, int64_t sC, int64_t sH, int64_t P, int64_t C,
                   const c10::BFloat16* b0, int64_t K) {
  const c10::BFloat16* b1 = b0 + kCols * K;
  _tile_zero(0);
  if constexpr (kTwoCols) _tile_zero(1);
  if constexpr (kTwoGroups) {
    _tile_zero(2);
    if constexpr (kTwoCols) _tile_zero(3);
  }
  const int64_t chunk = step(P), chunks = P / chunk, s0 = g0.ps * 2, s1 = g1.ps * 2;
  const int64_t tile = chunk * kCols;  // bf16 elements of a B tile: chunk / 2 pair rows of kCols pairs
  int64_t t = 0;  // k step: B tile t of the column block
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t u = 0; u < P; ++u) {
      for (int64_t q = 0; q < chunks; ++q, ++t) {
        const int64_t off = c * sC + u * sH + q * chunk;
        _tile_loadd(4, g0.px + off, s0);
        _tile_loadd(6, b0 + t * tile, 64);
        _tile_dpbf16ps(0, 4, 6);
        if constexpr (kTwoGroups) {
          _tile_loadd(5, g1.px + off, s1);
          _tile_dpbf16ps(2, 5, 6);
        }
        if constexpr (kTwoCols) {
          _tile_loadd(7, b1 + t * tile, 64);
          _tile_dpbf16ps(1, 4, 7);
          if constexpr (kTwoGroups) _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
  }
}

MCL_AMX void store(float* acc, bool two_groups, bool two_cols) {
  _tile_stored(0, acc, kCols * 4);
  if (two_cols) _tile_stored(1, acc + kRows * kCols, kCols * 4);
  if (two_groups) {
    _tile_stored(2, acc + 2 * kRows * kCols, kCols * 4);
    if (two_cols) _tile_stored(3, acc + 3 * kRows * kCols, kCols * 4);
  }
}

MCL_AMX void release() { _tile_release(); }

}  // namespace

bool available() {
  static const bool ok = probe();
  return ok;
}

void run(const Group* groups, int64_t n, int64_t sC, int64_t sH, int64_t P, int64_t C, const c10::BFloat16* wp,
         int64_t D) {
  TORCH_CHECK(available() && P % kMinChunk == 0, "mcl_kernels: amx::run called outside its contract");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(groups[i].rows >= 1 && groups[i].rows <= kRows, "mcl_kernels: amx::run group of ",
                groups[i].rows, " rows");
  }
  const int64_t K = C * P * P, blocks = (D + kCols - 1) / kCols;
  alignas(64) float acc[4 * kRows * kCols];
  int64_t m0 = -1, m1 = -1;  // the rows the tiles are configured for
  for (int64_t nb = 0; nb < blocks; nb += 2) {
    const bool two_cols = nb + 1 < blocks;
    const c10::BFloat16* b0 = wp + nb * kCols * K;
    for (int64_t i = 0; i < n; i += 2) {
      const bool two_groups = i + 1 < n;
      const Group& g0 = groups[i];
      const Group& g1 = two_groups ? groups[i + 1] : groups[i];
      const int64_t r1 = two_groups ? g1.rows : 0;
      if (g0.rows != m0 || r1 != m1) configure(g0.rows, r1, step(P)), m0 = g0.rows, m1 = r1;
      if (two_groups) {
        two_cols ? tiles<true, true>(g0, g1, sC, sH, P, C, b0, K) : tiles<true, false>(g0, g1, sC, sH, P, C, b0, K);
      } else {
        two_cols ? tiles<false, true>(g0, g1, sC, sH, P, C, b0, K)
                 : tiles<false, false>(g0, g1, sC, sH, P, C, b0, K);
      }
      store(acc, two_groups, two_cols);
      for (int64_t cb = 0; cb < (two_cols ? 2 : 1); ++cb) {
        const int64_t col0 = (nb + cb) * kCols, cols = std::min(kCols, D - col0);
        finish(acc + cb * kRows * kCols, g0, col0, cols);
        if (two_groups) finish(acc + (2 + cb) * kRows * kCols, g1, col0, cols);
      }
    }
  }
  release();
}

#else

bool available() { return false; }

void run(const Group*, int64_t, int64_t, int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "mcl_kernels: the AMX kernels need an x86-64 Linux CPU with AMX-BF16");
}

#endif

}  // namespace mcl::cpu::amx
