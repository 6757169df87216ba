// embed_tokens on the CPU: tiles of patches (whole images where there are enough), the same number per thread
// (at::parallel_for), each output row starting from bias + pos[t0 + n], so the epilogue costs no extra pass. Small
// batches on the direct path split the weight's panels over the threads instead (by_panels). bf16 images with unit W
// stride and a patch that is a multiple of 16, on CPUs with AMX, go through amx_patch_gemm.h's tile kernels
// (embed_tokens_cpu_amx); otherwise two ways through a tile:
//   direct (unit W stride; fp32 on AVX2 or AVX-512 CPUs, bf16 on AVX512-BF16 ones; embed_tokens_cpu_direct):
//     patch_gemm.h's micro-kernels read the pixels straight from the image, no patch matrix at all;
//   tiles (any dtype and strides, any CPU): the patches copied into a cache-sized patch matrix (implicit im2col:
//     no [B*N, C*P*P] tensor), multiplied by the weight with tile_gemm.h's single-threaded brgemm.
// fp32 accumulates in the output rows in place; bf16 in fp32, rounded once into the output. The class-token row
// is a broadcast copy. Every output element is one sum in a fixed K order, so the result does not depend on the
// tiling, and so not on the thread count (tested bitwise).
//
// Measured against timm's PatchEmbed (oneDNN conv2d, patch 32) + cat + add, see benchmarks/kernels.py: the
// stride-32 convolution runs well below the FMA limit; the direct kernel at ~90% of it, ~8% faster than the
// patch matrix + brgemm (D = 384, B = 64, fp32 and bf16, 2 threads).
#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../embed_tokens.h"
#include "amx_patch_gemm.h"
#include "embed_prepack.h"
#include "patch_gemm.h"
#include "tile_gemm.h"

namespace mcl {

namespace {

using cpu::acc_type;
using cpu::convert_n;
using cpu::cvt;
using cpu::Gemm;
using cpu::op_type;
using cpu::round_up;

// Patch rows per tile: ~2 MiB of fp32 patch matrix at patch 32. Tiles are runs of patch rows over the whole
// batch (b, n), as many per thread and as equal as rows allow: whole-image tiles left threads idle or uneven
// below ~8 images per thread (B = 8 at 2 threads: 3 + 5 images, 0.87x the reference's time in fp32).
constexpr int64_t kTilePatches = 160;

// What both paths share: the rows' starting values and the tiling.
template <typename A>
struct Plan {
  std::vector<A> add;  // row n of every image starts from add[n] = bias + pos[t0 + n] (zeros when neither given)
  // Tile t holds patch rows [t * units / ntiles, (t + 1) * units / ntiles) * unit of the flat (b, n) order;
  // thread `slot` runs tiles [slot * per_slot, (slot + 1) * per_slot).
  int64_t rows, slots, per_slot, ntiles, unit = 1, units;

  Plan(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed, const EmbedShape& s)
      : add(s.N * s.D, A(0)) {
    const int64_t D = s.D, N = s.N;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    if (pos_embed.has_value()) {
      const at::Tensor pos = pos_embed->reshape({s.T, D}).narrow(0, s.t0, N).to(acc).contiguous();
      std::copy_n(static_cast<const A*>(pos.data_ptr()), N * D, add.begin());
    }
    if (bias.has_value()) {
      const at::Tensor b = bias->to(acc).contiguous();
      const A* bp = static_cast<const A*>(b.data_ptr());
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t d = 0; d < D; ++d) add[n * D + d] += bp[d];
      }
    }
    rows = s.B * N;
    slots = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    per_slot = std::max<int64_t>(1, (rows + kTilePatches * slots - 1) / (kTilePatches * slots));
    ntiles = per_slot * slots;
    units = rows;
  }
  // The direct path's tiles: whole images (a tile edge inside an image splits a run of its patches in two) where
  // they divide evenly over the threads or are at least 8 per thread, else patches, for balance at small batches.
  void whole_images(const EmbedShape& s) {
    if (s.B % slots == 0 || s.B >= 8 * slots) unit = s.N, units = s.B;
  }
  int64_t row0(int64_t tile) const { return tile * units / ntiles * unit; }
  int64_t row1(int64_t tile) const { return (tile + 1) * units / ntiles * unit; }
};

// Pixel (0, 0, 0) of patch n of the image at `image` (row stride sH, unit W stride).
template <typename T>
inline const T* patch_origin(const T* image, const EmbedShape& s, int64_t sH, int64_t n) {
  return image + (n / s.Wp) * s.P * sH + (n % s.Wp) * s.P;
}

// Calls f(b, n, m) for runs of m <= patch_gemm::max_rows() patches n .. n + m - 1 of image b (in the flat order:
// along a patch row, then on to the next) covering rows [r0, r1), each image's rows as even runs as they go. A
// run may cross patch rows, since the kernels take each patch's origin: runs cut at each patch row's end have
// fewer rows per kernel call, so fewer accumulator chains per weight load. On AVX2 (6 rows) a patch row of 7 (patch
// 32 at 224) ran as 3 + 4 rows; an image runs as 5 and 6: embed_tokens 1.17x at 1 and 2 threads (fp32, D = 384,
// B = 64, AMD EPYC Zen 3, paired; benchmarks/results/patch-runs-ab-cpu-2core-zen3.txt).
template <typename F>
void for_each_run(const EmbedShape& s, int64_t r0, int64_t r1, F&& f) {
  for (int64_t r = r0; r < r1;) {
    const int64_t b = r / s.N, n = r % s.N;
    const int64_t run = std::min(s.N - n, r1 - r);
    cpu::patch_gemm::for_each_block(run, [&](int64_t first, int64_t m) { f(b, n + first, m); });
    r += run;
  }
}

// Whether embed_direct splits the weight's panels over the threads, each packing its own panels and running them
// over every patch, rather than splitting the patches: where the panels divide evenly over the threads and the
// batch's pixels are at most kPanelsPixelRatio times the weight's bytes. Split by patches, every thread streams the
// whole weight once per tile; split by panels, each reads its share once, packed by itself (still in its cache), and
// the pixels, the smaller operand, once per panel. Either way each output element is the same FMA chain, so the
// results are bitwise the same. Measured on a 2-core Intel Xeon (AVX-512), 2 threads, fp32, paired calls
// (benchmarks/results/embed-by-panels-cpu-2core-intel.txt): patch 32, D = 384 and 768: 1.28-1.31x at B = 1,
// 1.21-1.22x at B = 2, 1.04-1.09x at B = 4..32, 0.98-0.99x at B = 128; patch 16: 0.99-1.05x up to B = 16, 0.85-0.93x
// at B = 64; D = 192 (3 panels on 2 threads): 0.82-0.89x from B = 2.
constexpr int64_t kPanelsPixelRatio = 4;

bool by_panels(const EmbedShape& s, int64_t elem_bytes, int64_t threads) {
  const int64_t Q = cpu::patch_gemm::panels(s.D), K = s.C * s.P * s.P;
  const int64_t pixels = s.B * s.N * K * elem_bytes, weight = s.D * K * elem_bytes;
  return threads >= 1 && Q % threads == 0 && pixels <= kPanelsPixelRatio * weight;
}

// fp32 (AVX2, AVX-512) and bf16 (AVX512-BF16) with unit W stride: pixels straight from the image (patch_gemm.h).
// Split by patches (see by_panels): each tile's patches as runs of up to max_rows() (for_each_run), all of them through
// patch_gemm::run_runs, which orders the panels, channels and runs for the ISA.
template <typename scalar_t>
void embed_direct(const at::Tensor& x, const at::Tensor& w2d, const void* prepacked, const Plan<float>& plan,
                  const EmbedShape& s, at::Tensor& out) {
  namespace pg = cpu::patch_gemm;
  const int64_t D = s.D, P = s.P, K = s.C * P * P, Q = pg::panels(D), panel = K * pg::kPanel;
  // The panels: packed here (own), or ahead of the call (prepacked).
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const at::Tensor wp = prepacked ? at::Tensor() : at::empty({Q * panel}, opts);
  scalar_t* own = prepacked ? nullptr : static_cast<scalar_t*>(wp.data_ptr());
  const scalar_t* wpp = prepacked ? static_cast<const scalar_t*>(prepacked) : own;
  const auto* wsrc = static_cast<const scalar_t*>(w2d.data_ptr());
  const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2);
  scalar_t* op = static_cast<scalar_t*>(out.data_ptr());
  const float* add = plan.add.data();
  // The runs of patches covering rows [r0, r1), each starting from add's rows (bias + position).
  const auto runs_of = [&](int64_t r0, int64_t r1, std::vector<pg::Run<scalar_t>>& runs) {
    runs.clear();
    for_each_run(s, r0, r1, [&](int64_t b, int64_t n, int64_t m) {
      pg::Run<scalar_t> run{{}, m, add + n * D, op + (b * s.T + s.t0 + n) * D};
      for (int64_t r = 0; r < m; ++r) run.px[r] = patch_origin(xp + b * sB, s, sH, n + r);
      runs.push_back(run);
    });
  };
  if (by_panels(s, static_cast<int64_t>(sizeof(scalar_t)), at::get_num_threads())) {
    std::vector<pg::Run<scalar_t>> runs;
    runs_of(0, plan.rows, runs);
    at::parallel_for(0, Q, 1, [&](int64_t q0, int64_t q1) {  // Q / threads panels each
      if (own) {
        for (int64_t q = q0; q < q1; ++q) pg::pack_panel(wsrc, D, K, P * P, q, own + q * panel);
      }
      pg::run_runs(runs.data(), static_cast<int64_t>(runs.size()), sC, sH, P, s.C, wpp, D, q0, q1, D, D);
    });
    return;
  }
  if (own) pg::pack(wsrc, D, K, P * P, own);
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    std::vector<pg::Run<scalar_t>> runs;
    for (int64_t tile = s0 * plan.per_slot; tile < s1 * plan.per_slot; ++tile) {
      runs_of(plan.row0(tile), plan.row1(tile), runs);
      pg::run_runs(runs.data(), static_cast<int64_t>(runs.size()), sC, sH, P, s.C, wpp, D, 0, Q, D, D);
    }
  });
}

// bf16 images with unit W stride where only the fp32 patch kernels run (AVX2 CPUs: no bf16 dot products;
// embed_tokens_cpu_widened): the direct path in fp32. Each tile's images are widened to fp32 (exact) into a per-thread
// buffer, the weight once, and the tile's rows summed in fp32 from bias + position and rounded once into the output:
// the fp32 result of the same values, rounded (tested bitwise). The patch-matrix path it replaces multiplied bf16 on
// the AVX2 tile GEMM at its fp32 rate behind an im2col copy. Time of that path / time of this one, patch 32, 2 threads,
// AMD EPYC Zen 3, paired, D = 192-768: B = 1 1.34-1.54, B = 2-32 1.13-1.35 (benchmarks/results/
// bf16-widen-ab-cpu-2core-zen3.txt). Before cpu/simd.h widened with AVX2 it lost below 16 images (0.76-1.03), and
// took batches of 32 images up only.
void embed_widened(const at::Tensor& x, const at::Tensor& w2d, const void* prepacked, const Plan<float>& plan,
                   const EmbedShape& s, at::Tensor& out) {
  namespace pg = cpu::patch_gemm;
  using bf16 = c10::BFloat16;
  const int64_t D = s.D, P = s.P, K = s.C * P * P, Q = pg::panels(D), N = s.N;
  at::Tensor wp;
  if (!prepacked) {
    const at::Tensor wf = w2d.to(at::kFloat).contiguous();
    wp = at::empty({Q * K * pg::kPanel}, wf.options());
    pg::pack(wf.const_data_ptr<float>(), D, K, P * P, wp.data_ptr<float>());
  }
  const float* wpp = prepacked ? static_cast<const float*>(prepacked) : wp.const_data_ptr<float>();
  const auto* xp = static_cast<const bf16*>(x.const_data_ptr());
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), HW = s.H * s.W, img = s.C * HW;
  bf16* op = static_cast<bf16*>(out.data_ptr());
  const float* add = plan.add.data();
  int64_t images_max = 0, rows_max = 0;  // over the tiles: the images a tile's patches lie in, and its rows
  for (int64_t tile = 0; tile < plan.ntiles; ++tile) {
    const int64_t r0 = plan.row0(tile), r1 = plan.row1(tile);
    if (r1 > r0) images_max = std::max(images_max, (r1 - 1) / N + 1 - r0 / N), rows_max = std::max(rows_max, r1 - r0);
  }
  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    const std::unique_ptr<float[]> xbuf(new float[images_max * img]), sums(new float[rows_max * D]);
    std::vector<pg::Run<float>> runs;
    for (int64_t tile = s0 * plan.per_slot; tile < s1 * plan.per_slot; ++tile) {
      const int64_t r0 = plan.row0(tile), r1 = plan.row1(tile);
      if (r0 == r1) continue;
      const int64_t b0 = r0 / N, b1 = (r1 - 1) / N + 1;  // the images the tile's patches lie in
      for (int64_t b = b0; b < b1; ++b) {
        // Only the image rows of the tile's patches: tiles of a few patches split an image (small batches), and each
        // thread widens its own rows rather than the whole image.
        const int64_t n0 = b == b0 ? r0 % N : 0, n1 = b == b1 - 1 ? (r1 - 1) % N + 1 : N;
        const int64_t y0 = n0 / s.Wp * P, y1 = ((n1 - 1) / s.Wp + 1) * P;
        for (int64_t c = 0; c < s.C; ++c) {
          for (int64_t y = y0; y < y1; ++y) {
            cpu::simd::to_float(xp + b * sB + c * sC + y * sH, xbuf.get() + (b - b0) * img + c * HW + y * s.W, s.W);
          }
        }
      }
      runs.clear();
      for_each_run(s, r0, r1, [&](int64_t b, int64_t n, int64_t m) {
        pg::Run<float> run{{}, m, add + n * D, sums.get() + (b * N + n - r0) * D};
        const float* ib = xbuf.get() + (b - b0) * img;
        for (int64_t r = 0; r < m; ++r) run.px[r] = patch_origin(ib, s, s.W, n + r);
        runs.push_back(run);
      });
      pg::run_runs(runs.data(), static_cast<int64_t>(runs.size()), HW, s.W, P, s.C, wpp, D, 0, Q, D, D);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N, n = r % N;
        cpu::simd::to_bf16(sums.get() + (r - r0) * D, op + (b * s.T + s.t0 + n) * D, D);
      }
    }
  });
}

// Groups of patches per amx::run call: 8 x 16 patches' pixels (768 KiB at patch 32) stay in L2 beside a pair of
// the weight's 16-column blocks (192 KiB) while the call walks the column blocks.
constexpr int64_t kAmxGroupsPerCall = 8;

// bf16 images with unit W stride and P a multiple of 16 on AMX CPUs (amx_patch_gemm.h). A group is one patch
// position in up to 16 images when there are enough images to fill most of a tile (as many as a patch row has
// patches), else up to 16 consecutive patches of one patch row.
void embed_amx(const at::Tensor& x, const at::Tensor& w2d, const void* prepacked, const Plan<float>& plan,
               const EmbedShape& s, at::Tensor& out) {
  namespace amx = cpu::amx;
  using bf16 = c10::BFloat16;
  const int64_t D = s.D, P = s.P, K = s.C * P * P, N = s.N, T = s.T;
  at::Tensor wp;
  if (!prepacked) {
    wp = at::empty({amx::packed_size(D, K)}, x.options().memory_format(at::MemoryFormat::Contiguous));
    amx::pack(static_cast<const bf16*>(w2d.data_ptr()), D, K, static_cast<bf16*>(wp.data_ptr()));
  }
  const auto* wpp = static_cast<const bf16*>(prepacked ? prepacked : wp.const_data_ptr());
  const auto* xp = static_cast<const bf16*>(x.const_data_ptr());
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2);
  bf16* op = static_cast<bf16*>(out.data_ptr());
  const float* add = plan.add.data();
  std::vector<amx::Group> groups;
  if (s.B >= std::min(amx::kRows, s.Wp)) {
    for (int64_t n = 0; n < N; ++n) {
      const bf16* px = patch_origin(xp, s, sH, n);
      for (int64_t b0 = 0; b0 < s.B; b0 += amx::kRows) {
        groups.push_back({px + b0 * sB, sB, std::min(amx::kRows, s.B - b0), add + n * D, 0,
                          op + (b0 * T + s.t0 + n) * D, T * D});
      }
    }
  } else {
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t i = 0; i < s.Hp; ++i) {
        for (int64_t j0 = 0; j0 < s.Wp; j0 += amx::kRows) {
          const int64_t n = i * s.Wp + j0;
          groups.push_back({xp + b * sB + i * P * sH + j0 * P, P, std::min(amx::kRows, s.Wp - j0), add + n * D, D,
                            op + (b * T + s.t0 + n) * D, D});
        }
      }
    }
  }
  const auto G = static_cast<int64_t>(groups.size());
  const int64_t calls = std::max(std::min<int64_t>(G, 2 * at::get_num_threads()),
                                 (G + kAmxGroupsPerCall - 1) / kAmxGroupsPerCall);
  at::parallel_for(0, calls, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t g0 = c * G / calls, g1 = (c + 1) * G / calls;
      amx::run(groups.data() + g0, g1 - g0, sC, sH, P, s.C, wpp, D);
    }
  });
}

// Any dtype and strides: per tile, the patches copied into a patch matrix, times the packed weight by brgemm.
template <typename scalar_t>
void embed_tiles(const at::Tensor& x, const at::Tensor& w2d, const Plan<acc_type<scalar_t>>& plan,
                 const EmbedShape& s, at::Tensor& out) {
  using O = op_type<scalar_t>;
  using A = acc_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<A, scalar_t>;  // the GEMM accumulates in the output itself
  const Gemm<O> gemm;
  const int64_t D = s.D, N = s.N, P = s.P, K = s.C * P * P, Kp = round_up(K, gemm.k_align());
  const int64_t tile_max = (plan.rows + plan.ntiles - 1) / plan.ntiles;
  const auto op_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<O>::value);
  const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  std::vector<at::Tensor> abuf, cbuf;
  for (int64_t i = 0; i < plan.slots; ++i) {
    abuf.push_back(at::zeros({tile_max * Kp}, op_opts));  // zero: the padding columns stay 0
    if (!kDirect) cbuf.push_back(at::empty({std::min(tile_max, N) * D}, acc_opts));
  }
  // B = weight^T [K, D] in the GEMM's layout.
  const int64_t ldb = gemm.b_ld(D);
  at::Tensor wb = at::empty({Kp * ldb}, op_opts);
  cpu::pack_b_transposed(gemm, static_cast<const scalar_t*>(w2d.data_ptr()), K, K, Kp, D,
                         static_cast<O*>(wb.data_ptr()), ldb);
  const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  scalar_t* op = static_cast<scalar_t*>(out.data_ptr());

  at::parallel_for(0, plan.slots, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      O* a = static_cast<O*>(abuf[slot].data_ptr());
      for (int64_t tile = slot * plan.per_slot; tile < (slot + 1) * plan.per_slot; ++tile) {
        const int64_t r0 = plan.row0(tile), r1 = plan.row1(tile);
        // Patch matrix of rows [r0, r1): row r - r0, columns (c, u, v) = weight's order. Walked by runs of one
        // patch row (b, i) so that each image row is read left to right.
        for (int64_t r = r0; r < r1;) {
          const int64_t b = r / N, n = r % N, i = n / s.Wp, j0 = n % s.Wp;
          const int64_t j1 = std::min(s.Wp, j0 + (r1 - r));
          O* run = a + (r - r0) * Kp;  // row of patch (b, i, j0)
          for (int64_t c = 0; c < s.C; ++c) {
            for (int64_t u = 0; u < P; ++u) {
              const scalar_t* src = xp + b * sB + c * sC + (i * P + u) * sH;
              for (int64_t j = j0; j < j1; ++j) {
                O* dst = run + (j - j0) * Kp + (c * P + u) * P;
                const scalar_t* px = src + j * P * sW;
                if (sW == 1) {
                  for (int64_t v = 0; v < P; ++v) dst[v] = cvt<O>(px[v]);
                } else {
                  for (int64_t v = 0; v < P; ++v) dst[v] = cvt<O>(px[v * sW]);
                }
              }
            }
          }
          r += j1 - j0;
        }
        // One GEMM per image in the tile: an image's rows of the output are contiguous.
        for (int64_t r = r0; r < r1;) {
          const int64_t b = r / N, n = r % N, m = std::min(N - n, r1 - r);
          scalar_t* dst = op + (b * s.T + s.t0 + n) * D;
          A* c;
          if constexpr (kDirect) {
            c = dst;
          } else {
            c = static_cast<A*>(cbuf[slot].data_ptr());
          }
          std::copy(plan.add.begin() + n * D, plan.add.begin() + (n + m) * D, c);
          gemm.run(m, D, Kp, a + (r - r0) * Kp, Kp, static_cast<const O*>(wb.data_ptr()), ldb, c, D, true);
          if constexpr (!kDirect) convert_n(c, dst, m * D);
          r += m;
        }
      }
    }
    gemm.release();
  });
}

template <typename scalar_t>
void embed_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
               const std::optional<at::Tensor>& pos_embed, const std::optional<at::Tensor>& packed_weight,
               const EmbedShape& s, at::Tensor& out) {
  // The weight as packed ahead of the call, where the blob holds it for this call's path (else packed below).
  const void* pre = cpu::prepack::prepacked(packed_weight, weight, cpu::prepack::kind_for(x, s.P));
  const at::Tensor w2d = weight.reshape({s.D, s.C * s.P * s.P}).contiguous();  // a view of a contiguous weight
  Plan<acc_type<scalar_t>> plan(bias, pos_embed, s);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (embed_tokens_cpu_amx(x, s.P)) return embed_amx(x, w2d, pre, plan, s, out);
  }
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (embed_tokens_cpu_direct(x, s.P)) {
      plan.whole_images(s);
      return embed_direct<scalar_t>(x, w2d, pre, plan, s, out);
    }
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (embed_tokens_cpu_widened(x, s.P)) {
      plan.whole_images(s);
      return embed_widened(x, w2d, pre, plan, s, out);
    }
  }
  embed_tiles<scalar_t>(x, w2d, plan, s, out);
}

}  // namespace

bool embed_tokens_cpu_direct(const at::Tensor& x, int64_t patch) {
  return cpu::patch_gemm::reads(x, patch);
}

bool embed_tokens_cpu_by_panels(const at::Tensor& x, int64_t width, int64_t patch) {
  TORCH_CHECK(x.dim() == 4 && patch > 0 && width > 0,
              "embed_tokens_cpu_by_panels: expected x [B, C, H, W] and a positive width and patch, got x of ", x.dim(),
              " dims, width ", width, ", patch ", patch);
  if (!embed_tokens_cpu_direct(x, patch) || embed_tokens_cpu_amx(x, patch)) return false;
  EmbedShape s{};
  s.B = x.size(0), s.C = x.size(1), s.P = patch, s.D = width, s.N = (x.size(2) / patch) * (x.size(3) / patch);
  return by_panels(s, x.element_size(), at::get_num_threads());
}

bool embed_tokens_cpu_amx(const at::Tensor& x, int64_t patch) { return cpu::amx::reads(x, patch); }

at::Tensor embed_tokens_pack(const at::Tensor& weight) { return cpu::prepack::pack(weight); }

bool embed_tokens_cpu_uses_packed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed_weight) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "embed_tokens_cpu_uses_packed: expected x [B, C, H, W] and weight "
              "[D, C, P, P], got shapes ", x.sizes(), " and ", weight.sizes());
  cpu::prepack::check_blob(packed_weight);
  return x.is_cpu() && cpu::prepack::prepacked(packed_weight, weight, cpu::prepack::kind_for(x, weight.size(-1)));
}

bool embed_tokens_cpu_widened(const at::Tensor& x, int64_t patch) {
  return x.scalar_type() == at::kBFloat16 && x.dim() == 4 && (x.stride(3) == 1 || x.size(3) <= 1) &&
         cpu::patch_gemm::available(at::kFloat, patch) && !embed_tokens_cpu_direct(x, patch) &&
         !embed_tokens_cpu_amx(x, patch);
}

at::Tensor embed_tokens_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& cls_token,
                            const std::optional<at::Tensor>& pos_embed,
                            const std::optional<at::Tensor>& packed_weight, const EmbedShape& s) {
  at::Tensor out = at::empty({s.B, s.T, s.D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (s.B == 0) return out;
  if (cls_token.has_value()) {
    at::Tensor row = cls_token->reshape({s.D});
    if (pos_embed.has_value()) row = row + pos_embed->reshape({s.T, s.D})[0];
    out.select(1, 0).copy_(row);  // broadcast over the batch
  }
  if (s.N == 0 || s.D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "embed_tokens_cpu", [&] {
    embed_cpu<scalar_t>(x, weight, bias, pos_embed, packed_weight, s, out);
  });
  return out;
}

}  // namespace mcl
