// mcl_embed and mcl_compress on the CPU, forward and backward: fused over tiles of large tokens.
//
// A tile is a run of whole "large rows" rr = b * Hl + i (k rows of small tokens each), so the tiles of all
// images form one range and the L rows of a tile are one contiguous block of the output. Inside a tile,
// small tokens are ordered (t, u, v) -- large token t of the tile, then its k x k group -- so the small-token
// tile [k*k*T, D] *is* the grouped matrix G [T, k*k*D]: compression needs no gather. Per tile, forward:
//   im2col of the tile's pixels -> A [k*k*T, C*p*p]          (x read once; no im2col tensor)
//   S = A E^T + b_s (GEMM)  -> written to the output S, and G = S as the next GEMM's operand
//   L = G W_c^T + b_c (GEMM, straight into the output L)
//   R = ungroup(L W_d^T + b_d) (GEMM + scatter into the output R)
// on buffers of one tile (kForwardTileTokens), tiles dealt to threads as they free up (for_each_item), GEMMs through
// tile_gemm.h (single-threaded: oneDNN brgemm, or gemm_avx2.h's kernel on AVX2 CPUs). Nothing of batch size is
// allocated but the outputs. For fp32 and bf16 images with unit W stride on CPUs with the patch kernels
// (patch_gemm::reads: AVX2 or AVX-512 for fp32, AVX512-BF16 for bf16), S is computed from the pixels straight into the
// output by patch_gemm.h's kernels instead (no im2col tile; 2-4% faster forward at D = 384, B = 64), and G gathered
// from it; bf16 with p a multiple of 16 on CPUs with AMX, by amx_patch_gemm.h's tile kernels (S: 65 -> 14 thread-ms
// there).
//
// Backward, per tile, from the upstream gradients and the saved S, L (outputs, alive anyway):
//   gRg = group(gR):            dW_d += gRg^T L, db_d += colsum gRg,   gl = gL + gRg W_d
//   dW_c += gl^T G (G re-gathered from the saved S), db_c += colsum gl
//   gS' = gS (tile order) + gl W_c:  dE += gS'^T A, db_s += colsum gS',  gx = col2im(gS' E)
// Recomputed rather than stored: the im2col tile A (a copy of pixels: rebuilding it from x costs one pass over
// the image, keeping it would cost a [B*Ns, C*p*p] tensor, as large as x, alive from forward to backward; for
// fp32 images with unit W stride and p a multiple of 16 on AVX2/AVX-512 CPUs not even rebuilt: dE's kernel reads the
// pixels from x, patch_gemm.h, which saves the im2col's ~2% of the thread time, 3-4x that in the host's slow
// phases, and its 1.5 MB stack at D = 384) and
// G (a re-ordering of the saved S). No GEMM is recomputed: S and L are outputs the model holds anyway, and R
// is not needed. The weight gradients are reduced in rounds (see "Backward, in rounds" below) straight into
// the gradients, in fp32 (fp64 for fp64), without per-thread copies.
//
// Determinism: every result is a fixed sequence of GEMM calls and sums per tile, and weight gradients add the
// tiles' contributions in tile order; which thread runs a tile changes nothing. So results are bitwise
// reproducible for a given thread count, and identical across thread counts whenever the tiling is (a batch
// with at least one full tile per thread: B * H / (k * p) >= threads * tile rows); smaller batches are split
// into one tile per thread, which regroups the sums: those agree across thread counts to rounding.
//
// mcl_compress is the same level from tokens: G is gathered from the tokens instead of computed from pixels,
// and the backward ends by scattering gl W_c back to the token grid.
//
// Each step above is a phase of phases.h (its time summed over threads when the timers are on): the numbers
// behind "where does a step's time go" in benchmarks/cpu_phases.py.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../mcl_embed.h"
#include "amx_patch_gemm.h"
#include "patch_gemm.h"
#include "phases.h"
#include "tile_gemm.h"

namespace mcl {

namespace {

using cpu::acc_type;
using cpu::convert_n;
using cpu::cvt;
using cpu::Gemm;
using cpu::op_type;
using cpu::round_up;
using Phase = cpu::phases::Phase;
using PhaseScope = cpu::phases::Scope;
namespace patch_gemm = cpu::patch_gemm;
namespace amx = cpu::amx;

// Large tokens per tile (times k*k small tokens; whole large rows, so 98 = 2 images and 63 = 9 rows of 7 at
// 224x224 / 32). Tiles of 49 to 196 large tokens ran within noise of each other on a 2-core AVX-512 machine
// (fp32 and bf16, D = 384): GEMMs over fewer rows lose speed, larger tiles cost memory. The backward holds a
// round of tiles' weight-gradient operands at once, so in fp32 its tiles are the smaller: with these sizes one fp32
// training step at B = 64, D = 384 peaks at 0.55x the eager reference's memory (benchmarks/kernels.py). Each
// round also streams the fp32 weight-gradient accumulators once, which costs bf16's faster GEMMs relatively
// more: the backward's tiles hold backward_tile_tokens(gemm) tokens. fp32: 64. bf16: 256, measured against
// 128 in alternating runs (D = 384, B = 64, fwd+bwd vs the eager reference in the same run: 1.06-1.23x against
// 0.99-1.07x; 392 gave 1.05x), at 43.6 instead of 37.5 MiB peak (eager: 52.3); 128 had been ~12% faster
// than 64. fp32 on gemm_avx2.h's kernel (AVX2 CPUs) takes 128: a round's weight-gradient GEMM is one call over all
// its tiles there (Gemm::k_split_exact), so larger tiles mean a longer K per pass over the accumulators (AMD EPYC
// Zen 3, D = 384, B = 64, paired steps against the eager reference: 0.907x against 0.887x with 64).
constexpr int64_t kForwardTileTokens = 98;
template <typename O>
int64_t backward_tile_tokens(const Gemm<O>& gemm) {
  if (sizeof(O) == 2) return 256;
  if (std::is_same_v<O, float> && gemm.k_split_exact()) return 128;
  return 256 / int64_t(sizeof(O));  // fp64: 32, fp32: 64 (the same bytes)
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T>
at::Tensor buffer(int64_t n, bool zero) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return zero ? at::zeros({n}, opts) : at::empty({n}, opts);
}

template <typename T>
std::vector<at::Tensor> per_slot(int64_t slots, int64_t n, bool zero) {
  std::vector<at::Tensor> v;
  v.reserve(slots);
  for (int64_t s = 0; s < slots; ++s) v.push_back(buffer<T>(n, zero));
  return v;
}

// A bias as a vector of the accumulation type; empty when absent.
template <typename A>
std::vector<A> bias_vector(const OptTensor& b) {
  if (!b.has_value()) return {};
  const at::Tensor t = b->to(c10::CppTypeToScalarType<A>::value).contiguous();
  return std::vector<A>(ptr<A>(t), ptr<A>(t) + t.numel());
}

// Token geometry of one level: large rows rr = b * Hl + i; small token (u, v) of large token (rr, j) has the
// flat index (over [B * Hs * Ws]) small(rr, j, u) + v.
struct Grid {
  int64_t k, D, Ws, Wl, rows;
  explicit Grid(const LevelShape& l) : k(l.k), D(l.D), Ws(l.Ws), Wl(l.Wl), rows(l.B * l.Hl) {}
  int64_t small(int64_t rr, int64_t j, int64_t u) const { return (rr * k + u) * Ws + j * k; }
};

// Calls f(t, u, flat) for each large token t of the tile and each row u of its group: the k small tokens
// (v = 0..k-1) are consecutive both in the tile (rows (t*k + u)*k + v) and in a [B, Hs*Ws, D] tensor
// (flat + v), so every gather and scatter moves blocks of k*D contiguous elements.
template <typename F>
inline void for_each_group_row(const Grid& g, int64_t r0, int64_t r1, F&& f) {
  int64_t t = 0;
  for (int64_t rr = r0; rr < r1; ++rr) {
    for (int64_t j = 0; j < g.Wl; ++j, ++t) {
      for (int64_t u = 0; u < g.k; ++u) f(t, u, g.small(rr, j, u));
    }
  }
}

// Tiles of whole large rows, and `nslots`: the threads that get work, each with its own private buffers. `rounds`:
// the tiles run in rounds of one per thread (the backward), rather than dealt to threads as they free up.
struct Tiling {
  int64_t tile_rows = 1, ntiles = 0, nslots = 0;
  Tiling(const Grid& g, int64_t threads, int64_t tile_tokens, bool rounds = false) {
    if (g.rows == 0) return;
    tile_rows = std::max<int64_t>(1, tile_tokens / std::max<int64_t>(g.Wl, 1));
    // In rounds, an even number of tiles where tiles at most a quarter smaller give one: an odd count leaves threads
    // idle through the last round. B = 64 at 224/32 in 128-token tiles had 25 tiles of 18 large rows; 28 of 16 made
    // the fp32 step 1.021-1.023x faster (AMD EPYC Zen 3, 2 threads, paired in one process;
    // benchmarks/results/backward-tiles-ab-cpu-2core-zen3.txt). The choice depends on the shape alone, so the
    // results do not depend on the thread count through it.
    for (int64_t r = tile_rows; rounds && r >= 1 && 4 * r >= 3 * tile_rows; --r) {
      if (((g.rows + r - 1) / r) % 2 == 0) {
        tile_rows = r;
        break;
      }
    }
    // Small batches: smaller tiles rather than idle threads.
    tile_rows = std::max<int64_t>(1, std::min(tile_rows, (g.rows + threads - 1) / threads));
    ntiles = (g.rows + tile_rows - 1) / tile_rows;
    nslots = std::min(threads, ntiles);
  }
  int64_t row0(int64_t tile) const { return tile * tile_rows; }
  int64_t row1(int64_t tile, const Grid& g) const { return std::min(g.rows, (tile + 1) * tile_rows); }
  int64_t max_tokens(const Grid& g) const { return tile_rows * g.Wl; }
};

// Runs f(slot, i) once for every item i < n on up to `slots` threads, then releases the threads' GEMM
// contexts. Threads take the next item when done with one (an atomic counter), so a thread that is slowed down
// (by another process, say) does not hold the others back; `slot` (< slots, one per thread) names the thread's
// private buffers. No result depends on which thread runs an item.
template <typename O, typename F>
void for_each_item(int64_t n, int64_t slots, const Gemm<O>& gemm, F&& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(slots, n), 1, [&](int64_t s0, int64_t s1) {
    for (int64_t slot = s0; slot < s1; ++slot) {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(slot, i);
    }
    gemm.release();
  });
}

// Runs f(slot, r0, r1) for every tile of the forward.
template <typename O, typename F>
void run_tiles(const Tiling& tl, const Grid& g, const Gemm<O>& gemm, F&& f) {
  for_each_item(tl.ntiles, tl.nslots, gemm, [&](int64_t slot, int64_t t) { f(slot, tl.row0(t), tl.row1(t, g)); });
}

// Pixel (0, 0, 0) of large row rr (image rr / Hl, large-patch row rr % Hl) in an image tensor with base pointer
// `base` and strides `st`: small patch (u, v) of its large token j starts at
//   origin + u * p * sH + (j * k + v) * p * sW,
// and is row ((rr - r0) * Wl + j) * k + u) * k + v of a tile starting at large row r0 (S's (t, u, v) order).
template <typename P>
P large_row_origin(P base, at::IntArrayRef st, const MclShape& s, int64_t rr) {
  return base + rr / s.level.Hl * st[0] + rr % s.level.Hl * s.level.k * s.p * st[2];
}

// Pixels of the tile's small patches: f(row, col0, px, sW) gets the p pixels px[q * sW] of tile row (t, u, v) at
// columns col0 + q, columns ordered (c, a, q) like proj_w.reshape(D, -1), walking each image row left to right.
// Any strides (contiguous, channels_last, sliced views).
template <typename P, typename F>
void for_each_patch_row(P base, at::IntArrayRef st, const MclShape& s, int64_t r0, int64_t r1, F&& f) {
  const int64_t sC = st[1], sH = st[2], sW = st[3];
  const int64_t p = s.p, k = s.level.k, Wl = s.level.Wl;
  for (int64_t rr = r0; rr < r1; ++rr) {
    const int64_t t0 = (rr - r0) * Wl;
    const P origin = large_row_origin(base, st, s, rr);
    for (int64_t c = 0; c < s.C; ++c) {
      for (int64_t y = 0; y < k * p; ++y) {
        const int64_t u = y / p, col0 = (c * p + y % p) * p;
        P row = origin + c * sC + y * sH;
        for (int64_t j = 0; j < Wl; ++j) {
          for (int64_t v = 0; v < k; ++v) f(((t0 + j) * k + u) * k + v, col0, row + (j * k + v) * p * sW, sW);
        }
      }
    }
  }
}

// The tile's small patches one by one, in tile row order: f(row, px), px the patch's pixel (0, 0, 0).
template <typename P, typename F>
void for_each_patch(P base, at::IntArrayRef st, const MclShape& s, int64_t r0, int64_t r1, F&& f) {
  const int64_t sH = st[2], sW = st[3], p = s.p, k = s.level.k, Wl = s.level.Wl;
  for (int64_t rr = r0; rr < r1; ++rr) {
    const P origin = large_row_origin(base, st, s, rr);
    for (int64_t j = 0; j < Wl; ++j) {
      for (int64_t u = 0; u < k; ++u) {
        for (int64_t v = 0; v < k; ++v) {
          f((((rr - r0) * Wl + j) * k + u) * k + v, origin + u * p * sH + (j * k + v) * p * sW);
        }
      }
    }
  }
}

// One patch row of p pixels: short, so an inline loop rather than a memcpy call.
template <typename To, typename From>
inline void copy_pixels(const From* src, int64_t sW, int64_t p, To* dst) {
  if (sW == 1) {
    for (int64_t q = 0; q < p; ++q) dst[q] = cvt<To>(src[q]);
  } else {
    for (int64_t q = 0; q < p; ++q) dst[q] = cvt<To>(src[q * sW]);
  }
}

// B = w [K, N] as stored (rows of a contiguous tensor) in B layout, row stride ldb (set here: gemm.b_ld(N)): the
// weight itself when the layout is plain row-major, the types agree and N needs no padding (no copy), else a
// packed copy. `hold` keeps the memory alive.
template <typename O, typename scalar_t>
const O* weight_rows_b(const Gemm<O>& gemm, const at::Tensor& w2d, int64_t Kp, at::Tensor& hold, int64_t& ldb) {
  const int64_t K = w2d.size(0), N = w2d.size(1);
  ldb = gemm.b_ld(N);
  if constexpr (std::is_same_v<O, scalar_t>) {
    if (!gemm.vnni() && Kp == K && ldb == N) {
      hold = w2d;
      return ptr<O>(hold);
    }
  }
  hold = buffer<O>(Kp * ldb, false);
  cpu::pack_b_rows(gemm, ptr<scalar_t>(w2d), N, K, Kp, N, ptr<O>(hold), ldb);
  return ptr<O>(hold);
}

// B = w^T for w [N, K] (contiguous) in B layout, row stride ldb (set here: gemm.b_ld(N)).
template <typename O, typename scalar_t>
at::Tensor weight_transposed_b(const Gemm<O>& gemm, const at::Tensor& w2d, int64_t Kp, int64_t& ldb) {
  const int64_t N = w2d.size(0), K = w2d.size(1);
  ldb = gemm.b_ld(N);
  at::Tensor out = buffer<O>(Kp * ldb, false);
  cpu::pack_b_transposed(gemm, ptr<scalar_t>(w2d), K, K, Kp, N, ptr<O>(out), ldb);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// One level, forward: L = G W_c^T + b_c into the output, R = ungroup(L W_d^T + b_d) into the output.

template <typename scalar_t>
struct LevelForward {
  using O = op_type<scalar_t>;
  using A = acc_type<scalar_t>;
  static constexpr bool kAlias = std::is_same_v<O, A>;          // fp32 tiles serve as GEMM operands as they are
  static constexpr bool kDirect = std::is_same_v<A, scalar_t>;  // GEMMs may write the outputs in place

  const Gemm<O>& gemm;
  const Grid& g;
  int64_t KD, KDp, Dp, ldwc = 0, ldwd = 0;  // ldw*: the row strides of wc_b, wd_b
  bool decompress;
  at::Tensor wc_b, wd_b;  // B = comp_w^T [KDp, D], decomp_w^T [Dp, KD]
  std::vector<A> bc, bd;
  scalar_t* L;
  scalar_t* R;
  std::vector<at::Tensor> lbuf, lop, rbuf;

  LevelForward(const Gemm<O>& gemm_, const Grid& g_, const at::Tensor& comp_w, const OptTensor& comp_b,
               const OptTensor& decomp_w, const OptTensor& decomp_b, const at::Tensor& L_, const OptTensor& R_,
               int64_t slots, int64_t tmax)
      : gemm(gemm_), g(g_) {
    const int64_t D = g.D, ka = gemm.k_align();
    KD = g.k * g.k * D, KDp = round_up(KD, ka), Dp = round_up(D, ka);
    decompress = decomp_w.has_value();
    wc_b = weight_transposed_b<O, scalar_t>(gemm, comp_w.contiguous(), KDp, ldwc);
    bc = bias_vector<A>(comp_b);
    L = ptr<scalar_t>(L_);
    R = decompress ? ptr<scalar_t>(*R_) : nullptr;
    if (!kDirect) lbuf = per_slot<A>(slots, tmax * D, false);
    if (decompress) {
      wd_b = weight_transposed_b<O, scalar_t>(gemm, decomp_w->contiguous(), Dp, ldwd);
      bd = bias_vector<A>(decomp_b);
      if (!kAlias) lop = per_slot<O>(slots, tmax * Dp, true);  // zero: the padding column stays 0
      rbuf = per_slot<A>(slots, tmax * KD, false);
    }
  }

  // G [T, KD] (op type, row stride ldg) of large rows [r0, r1) -> L and R rows of the tile.
  void tile(int64_t slot, int64_t r0, int64_t r1, const O* ga, int64_t ldg) {
    const int64_t D = g.D, T = (r1 - r0) * g.Wl, kD = g.k * D;
    scalar_t* lout = L + r0 * g.Wl * D;
    A* l;
    if constexpr (kDirect) {
      l = lout;
    } else {
      l = ptr<A>(lbuf[slot]);
    }
    {
      const PhaseScope ps(Phase::kForwardLarge);
      if (!bc.empty()) cpu::fill_rows(l, D, T, D, bc.data());
      gemm.run(T, D, KDp, ga, ldg, ptr<O>(wc_b), ldwc, l, D, !bc.empty());
      if constexpr (!kDirect) convert_n(l, lout, T * D);
    }
    if (!decompress) return;

    const O* la;
    int64_t ldl;
    if constexpr (kAlias) {
      la = l, ldl = D;
    } else {  // bf16: decompress the rounded L, as the output holds it
      O* lo = ptr<O>(lop[slot]);
      for (int64_t t = 0; t < T; ++t) convert_n(lout + t * D, lo + t * Dp, D);
      la = lo, ldl = Dp;
    }
    A* r = ptr<A>(rbuf[slot]);
    {
      const PhaseScope ps(Phase::kForwardRecon);
      gemm.run(T, KD, Dp, la, ldl, ptr<O>(wd_b), ldwd, r, KD, false);
    }
    const PhaseScope ps(Phase::kForwardUngroup);
    for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
      A* src = r + t * KD + u * kD;
      if (!bd.empty()) {
        const A* b = bd.data() + u * kD;
        for (int64_t e = 0; e < kD; ++e) src[e] += b[e];
      }
      convert_n(src, R + flat * D, kD);
    });
  }
};

// ---------------------------------------------------------------------------------------------------------
// Backward, in rounds of up to `nslots` tiles (one per thread):
//   phase A, one tile per thread: the gradients with respect to the tile's tokens, and the operands of the
//     weight-gradient GEMMs, written into "stacks" in which the round's tiles sit side by side along the
//     token dimension (the GEMMs' reduction dimension);
//   phase B, rows of the weight gradients split over the threads: for each block of kJobRows rows of a weight
//     gradient, one GEMM per tile of the round accumulates the tile's contribution straight into the gradient.
// Each element of a weight gradient is therefore the sum of the tiles' contributions in tile order, computed by
// the same GEMM calls whatever the number of threads; and no per-thread copy of a weight gradient exists.

constexpr int64_t kJobRows = 64;

// dE from the pixels (fp32): items of every row of dE and kDirectPanels panels of 64 columns. Items of kJobRows
// rows (each re-reading all the round's pixels) were no faster than the im2col path; of 1, 2 or 3 panels, 2 was
// 0.2-1.7% faster a step than 1 (B = 64, D = 384 and 768, paired steps in one process:
// benchmarks/results/de-pixels-ab-cpu-2core.txt).
constexpr int64_t kDirectPanels = 2;

// C [M, N] += sum over the round's tiles i of A[:, off_i : off_i + len_i] B[off_i : off_i + len_i, :], where
// off = round.off (stack positions of the tiles; len_i = off[i + 1] - off[i]).
template <typename O>
struct GemmJob {
  const O* a;
  int64_t lda;
  const O* b;
  int64_t ldb;
  acc_type<O>* c;
  int64_t ldc, M, N;
  const std::vector<int64_t>* off;
  // Set for dE from the pixels (fp32, patch_gemm::run_weight_grad): B's row at stack position i is the pixels of the
  // patch at tok[i] (no im2col stack), kPanel/16 runs of 16 at tok[i] + poff[4 * q + v] for panel q; and A is
  // token-major, its element (row r, stack position i) at a[i * lda + r] (gS' as computed, no transpose).
  const O* const* tok = nullptr;
  const int64_t* poff = nullptr;
  Phase phase = Phase::kBackwardWeightGemm;  // whose time the job's items count as
};

// Runs the jobs' blocks of kJobRows rows (a split independent of the thread count, so the results are too),
// the costliest first, on `slots` threads.
template <typename O>
void run_jobs(const Gemm<O>& gemm, const std::vector<GemmJob<O>>& jobs, int64_t slots) {
  struct Item {
    size_t job;
    int64_t m0, rows;
    double cost;
    int64_t q0 = 0, q1 = 0;  // direct dE: the item's panels (all rows)
  };
  std::vector<Item> items;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const int64_t K = jobs[j].off->back();
    if (K == 0) continue;
    if (jobs[j].tok != nullptr) {  // by panels: an item reads its pixels once, all rows of dE against them
      const int64_t panels = jobs[j].N / cpu::patch_gemm::kPanel;
      for (int64_t q = 0; q < panels; q += kDirectPanels) {
        const int64_t q1 = std::min(panels, q + kDirectPanels);
        const double cost = static_cast<double>(jobs[j].M) * (q1 - q) * cpu::patch_gemm::kPanel * K;
        items.push_back({j, 0, jobs[j].M, cost, q, q1});
      }
      continue;
    }
    for (int64_t m0 = 0; m0 < jobs[j].M; m0 += kJobRows) {
      const int64_t rows = std::min(kJobRows, jobs[j].M - m0);
      items.push_back({j, m0, rows, static_cast<double>(rows) * jobs[j].N * K});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  for_each_item(static_cast<int64_t>(items.size()), slots, gemm, [&](int64_t, int64_t i) {
    const GemmJob<O>& j = jobs[items[i].job];
    const int64_t m0 = items[i].m0;
    const std::vector<int64_t>& off = *j.off;
    const PhaseScope ps(j.phase);
    if constexpr (std::is_same_v<O, float>) {
      if (j.tok != nullptr) {  // the tile's pixels in one panel stay in L2 across the row blocks
        namespace pg = cpu::patch_gemm;
        for (int64_t q = items[i].q0; q < items[i].q1; ++q) {
          for (size_t t = 0; t + 1 < off.size(); ++t) {
            pg::for_each_block(items[i].rows, [&](int64_t first, int64_t m) {
              pg::run_weight_grad(j.a + off[t] * j.lda + m0 + first, j.lda, m, j.tok + off[t], off[t + 1] - off[t],
                                  j.poff + 4 * q, j.c + (m0 + first) * j.ldc + q * pg::kPanel, j.ldc);
            });
          }
        }
        return;
      }
    }
    if (gemm.k_split_exact()) {  // the round's tiles sit side by side along K: one call, the same sums bitwise
      gemm.run(items[i].rows, j.N, off.back() - off.front(), j.a + m0 * j.lda + off.front(), j.lda,
               j.b + off.front() * j.ldb, j.ldb, j.c + m0 * j.ldc, j.ldc, true);
      return;
    }
    for (size_t t = 0; t + 1 < off.size(); ++t) {  // B's rows of tile t start at row off[t] (VNNI: even)
      gemm.run(items[i].rows, j.N, off[t + 1] - off[t], j.a + m0 * j.lda + off[t], j.lda, j.b + off[t] * j.ldb, j.ldb,
               j.c + m0 * j.ldc, j.ldc, true);
    }
  });
}

// Token layout of round r: tile i of the round holds stack positions [off[i], off[i + 1]) (its tokens times
// per_token, padded to `align`); the last entry is the round's total.
struct Round {
  std::vector<int64_t> off;
};

inline Round make_round(const Tiling& tl, const Grid& g, int64_t r, int64_t per_token, int64_t align) {
  const int64_t first = r * tl.nslots, tiles = std::min(tl.nslots, tl.ntiles - first);
  Round rd;
  rd.off.assign(tiles + 1, 0);
  for (int64_t i = 0; i < tiles; ++i) {
    const int64_t tokens = (tl.row1(first + i, g) - tl.row0(first + i)) * g.Wl * per_token;
    rd.off[i + 1] = rd.off[i] + round_up(tokens, align);
  }
  return rd;
}

// A weight-gradient accumulator: the gradient itself where it is already in the accumulation type, else an
// fp32 buffer converted at the end.
template <typename scalar_t>
struct GradAcc {
  using A = acc_type<scalar_t>;
  at::Tensor out, acc;
  GradAcc() = default;
  GradAcc(at::IntArrayRef shape, const at::TensorOptions& opts) {
    if constexpr (std::is_same_v<A, scalar_t>) {
      out = acc = at::zeros(shape, opts);
    } else {  // `out` is only ever written by finish(): zeroing it too cost 10 MiB of stores at D = 768
      out = at::empty(shape, opts);
      acc = at::zeros(shape, opts.dtype(c10::CppTypeToScalarType<A>::value));
    }
  }
  A* ptr() const { return static_cast<A*>(acc.data_ptr()); }
  at::Tensor finish() {
    if (!std::is_same_v<A, scalar_t>) out.copy_(acc);
    return out;
  }
};

// Bias gradients: per tile column sums (phase A), added to the gradient in tile order after phase B.
template <typename A>
struct BiasParts {
  int64_t n = 0;
  at::Tensor parts;  // [tiles per round, n]
  void init(int64_t slots, int64_t len) {
    n = len;
    parts = buffer<A>(slots * len, false);
  }
  A* part(int64_t s) const {  // tile s of the round; zeroed
    A* p = static_cast<A*>(parts.data_ptr()) + s * n;
    std::fill_n(p, n, A(0));
    return p;
  }
  void add_to(A* acc, int64_t tiles) const {
    const A* p = static_cast<const A*>(parts.data_ptr());
    for (int64_t s = 0; s < tiles; ++s) {
      for (int64_t i = 0; i < n; ++i) acc[i] += p[s * n + i];
    }
  }
};

// One level, backward: gradients of compression and decompression, and the gradient gl of L for each tile,
// which the caller turns into the gradient of G (gl W_c).
template <typename scalar_t>
struct LevelBackward {
  using O = op_type<scalar_t>;
  using A = acc_type<scalar_t>;
  static constexpr bool kAlias = std::is_same_v<O, A>;

  const Gemm<O>& gemm;
  const Grid& g;
  int64_t KD, KDp, Dp, ka, ldst;  // ldst: capacity of the token stacks
  bool need_cw, need_cb, need_dw, need_db, need_gl, has_gl, has_gr;
  const scalar_t* gL;  // [B*Hl*Wl, D] or null
  const scalar_t* gR;  // [B*Hs*Ws, D] or null
  const scalar_t* Ls;  // saved L
  const scalar_t* Gs;  // G's source: the saved S (mcl_embed) or the tokens (mcl_compress)
  const O* wd_b = nullptr;  // B = decomp_w [KDp, D], row stride ldwd
  const O* wc_b = nullptr;  // B = comp_w [Dp, KD], row stride ldwc
  int64_t ldwd = 0, ldwc = 0;
  at::Tensor wd_hold, wc_hold;
  GradAcc<scalar_t> dw, cw, db, cb;
  BiasParts<A> db_parts, cb_parts;
  at::Tensor grT, lB, glT, gB;         // stacks: [KD, ldst], [ldst, D], [D, ldst], [ldst, KD]
  std::vector<at::Tensor> scratch, gl, gl_a;  // per slot

  // scratch[slot] (bytes) holds the grouped gR of a tile until gl is computed; then the caller may reuse it
  // for up to `caller_bytes` (the gradient of G), which keeps one tile-sized buffer per thread instead of two.
  LevelBackward(const Gemm<O>& gemm_, const Grid& g_, const Tiling& tl, const at::Tensor& g_large,
                const at::Tensor& g_recon, const at::Tensor& comp_w, const OptTensor& decomp_w,
                const at::Tensor& large, const at::Tensor& g_source, const std::vector<bool>& level_needs,
                bool need_g_grad, const at::TensorOptions& opts, int64_t caller_bytes)
      : gemm(gemm_), g(g_) {
    const int64_t D = g.D, slots = tl.nslots, tmax = tl.max_tokens(g);
    ka = gemm.k_align();
    KD = g.k * g.k * D, KDp = round_up(KD, ka), Dp = round_up(D, ka);
    ldst = slots * round_up(tmax, ka);
    const bool decompress = decomp_w.has_value();
    has_gr = decompress && g_recon.defined();
    has_gl = g_large.defined() || has_gr;  // otherwise the gradient of L is zero
    need_cw = level_needs[0] && has_gl, need_cb = level_needs[1] && has_gl;
    need_dw = level_needs[2] && has_gr, need_db = level_needs[3] && has_gr;
    need_gl = has_gl && (need_cw || need_cb || need_g_grad);
    gL = g_large.defined() ? ptr<const scalar_t>(g_large) : nullptr;
    gR = has_gr ? ptr<const scalar_t>(g_recon) : nullptr;
    Ls = ptr<const scalar_t>(large);
    Gs = ptr<const scalar_t>(g_source);

    if (level_needs[0]) cw = GradAcc<scalar_t>({D, KD}, opts);
    if (level_needs[1]) cb = GradAcc<scalar_t>({D}, opts);
    if (level_needs[2] && decompress) dw = GradAcc<scalar_t>({KD, D}, opts);
    if (level_needs[3] && decompress) db = GradAcc<scalar_t>({KD}, opts);
    if (slots == 0) return;
    const bool group_gr = has_gr && (need_dw || need_db || need_gl);
    const int64_t bytes = std::max<int64_t>(group_gr ? tmax * KDp * sizeof(O) : 0, caller_bytes);
    if (bytes > 0) scratch = per_slot<uint8_t>(slots, bytes, false);
    if (group_gr) {
      if (need_db) db_parts.init(slots, KD);
      if (need_dw) {
        grT = buffer<O>(KD * ldst, false);
        lB = buffer<O>(ldst * D, false);
      }
      if (need_gl) wd_b = weight_rows_b<O, scalar_t>(gemm, decomp_w->contiguous(), KDp, wd_hold, ldwd);
    }
    if (need_gl) {
      gl = per_slot<A>(slots, tmax * D, false);
      if (!kAlias && need_g_grad) gl_a = per_slot<O>(slots, tmax * Dp, true);
      if (need_cb) cb_parts.init(slots, D);
      if (need_cw) {
        glT = buffer<O>(D * ldst, false);
        gB = buffer<O>(ldst * KD, false);
      }
      if (need_g_grad) wc_b = weight_rows_b<O, scalar_t>(gemm, comp_w.contiguous(), Dp, wc_hold, ldwc);
    }
  }

  // Phase A for tile `i` of a round (large rows [r0, r1), stack offset `off`) on the thread owning the private
  // buffers `slot`; afterwards gl_operand(slot) is the gradient of L of the tile (when need_gl).
  void tile(int64_t slot, int64_t i, int64_t r0, int64_t r1, int64_t off) {
    const int64_t D = g.D, T = (r1 - r0) * g.Wl, kD = g.k * D, Tp = round_up(T, ka);
    const int64_t lrow0 = r0 * g.Wl;
    O* gra = scratch.empty() ? nullptr : ptr<O>(scratch[slot]);
    if (has_gr && (need_dw || need_db || need_gl)) {
      {
        const PhaseScope ps(Phase::kBackwardGroup);
        for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
          convert_n(gR + flat * D, gra + t * KDp + u * kD, kD);
        });
        for (int64_t t = 0; KDp > KD && t < T; ++t) std::fill(gra + t * KDp + KD, gra + (t + 1) * KDp, O(0));
      }
      if (need_db) {
        const PhaseScope ps(Phase::kBackwardBias);
        cpu::add_column_sums(gra, KDp, T, KD, db_parts.part(i));
      }
      if (need_dw) {  // dW_d [KD, D] += gRg^T [KD, T] L [T, D]
        const PhaseScope ps(Phase::kBackwardStacks);
        cpu::transpose_to(gra, KDp, T, Tp, KD, ptr<O>(grT) + off, ldst);
        stack_rows(Ls + lrow0 * D, T, Tp, D, ptr<O>(lB) + off * D);
      }
    }
    if (!need_gl) return;
    A* gla = ptr<A>(gl[slot]);
    {
      const PhaseScope ps(Phase::kBackwardTokenGemm);
      if (gL != nullptr) convert_n(gL + lrow0 * D, gla, T * D);
      if (has_gr) gemm.run(T, D, KDp, gra, KDp, wd_b, ldwd, gla, D, gL != nullptr);
    }
    if (need_cb) {
      const PhaseScope ps(Phase::kBackwardBias);
      cpu::add_column_sums(gla, D, T, D, cb_parts.part(i));
    }
    if (need_cw) {  // dW_c [D, KD] += gl^T [D, T] G [T, KD], G re-gathered from its source
      const PhaseScope ps(Phase::kBackwardStacks);
      cpu::transpose_to(gla, D, T, Tp, D, ptr<O>(glT) + off, ldst);
      // Rows of k*D elements; in VNNI layout, large tokens t and t + 1 interleaved (bf16, where the source
      // already has the operand type).
      O* gb = ptr<O>(gB) + off * KD;
      if (!gemm.vnni()) {
        for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
          convert_n(Gs + flat * D, gb + t * KD + u * kD, kD);
        });
      } else if constexpr (std::is_same_v<O, c10::BFloat16> && std::is_same_v<scalar_t, c10::BFloat16>) {
        const std::vector<O> zeros(kD, O(0));
        auto row = [&](int64_t t, int64_t u) { return Gs + g.small(r0 + t / g.Wl, t % g.Wl, u) * D; };
        for (int64_t t = 0; t < T; t += 2) {
          for (int64_t u = 0; u < g.k; ++u) {
            cpu::simd::interleave(row(t, u), t + 1 < T ? row(t + 1, u) : zeros.data(), gb + (t * KD + 2 * u * kD), kD);
          }
        }
      }
    }
    if constexpr (!kAlias) {
      if (wc_b != nullptr) {
        O* o = ptr<O>(gl_a[slot]);
        for (int64_t t = 0; t < T; ++t) convert_n(gla + t * D, o + t * Dp, D);
      }
    }
  }

  // Rows [0, T) of a token-major source as B-layout stack rows (padding rows Tp > T zero).
  void stack_rows(const scalar_t* src, int64_t T, int64_t Tp, int64_t N, O* dst) const {
    if constexpr (std::is_same_v<O, scalar_t>) {
      cpu::pack_rows(gemm, src, N, T, Tp, N, dst, N);
    } else {
      convert_n(src, dst, T * N);
      std::fill(dst + T * N, dst + Tp * N, O(0));
    }
  }

  std::pair<const O*, int64_t> gl_operand(int64_t slot) const {
    if constexpr (kAlias) {
      return {ptr<A>(gl[slot]), g.D};
    } else {
      return {ptr<O>(gl_a[slot]), Dp};
    }
  }

  // Phase B's GEMMs for a round whose tiles sit at stack positions `off`.
  void jobs(std::vector<GemmJob<O>>& out, const std::vector<int64_t>& off) {
    const int64_t D = g.D;
    if (need_dw) out.push_back({ptr<O>(grT), ldst, ptr<O>(lB), D, dw.ptr(), D, KD, D, &off});
    if (need_cw) out.push_back({ptr<O>(glT), ldst, ptr<O>(gB), KD, cw.ptr(), KD, D, KD, &off});
  }

  void add_bias_parts(int64_t tiles) {
    if (need_db) db_parts.add_to(db.ptr(), tiles);
    if (need_cb) cb_parts.add_to(cb.ptr(), tiles);
  }

  // Gradients (comp_w, comp_b, decomp_w, decomp_b).
  std::vector<OptTensor> finish() {
    std::vector<OptTensor> out(4);
    GradAcc<scalar_t>* accs[4] = {&cw, &cb, &dw, &db};
    for (int i = 0; i < 4; ++i) {
      if (accs[i]->out.defined()) out[i] = accs[i]->finish();
    }
    return out;
  }
};

// Runs phase A for every tile of each round, then phase B: `tile(slot, i, r0, r1, round)` (tile i of the round
// on the thread owning private buffers `slot`), `jobs(vector, round)` and `after(tiles)` supply the work.
template <typename O, typename TileFn, typename JobsFn, typename AfterFn>
void run_rounds(const Tiling& tl, const Grid& g, const Gemm<O>& gemm, TileFn&& tile, JobsFn&& jobs,
                AfterFn&& after) {
  if (tl.nslots == 0) return;
  const int64_t rounds = (tl.ntiles + tl.nslots - 1) / tl.nslots;
  for (int64_t r = 0; r < rounds; ++r) {
    const int64_t first = r * tl.nslots, tiles = std::min(tl.nslots, tl.ntiles - first);
    {
      const PhaseScope ps(Phase::kBackwardTilesWall);
      for_each_item(tiles, tl.nslots, gemm, [&](int64_t slot, int64_t i) {
        tile(slot, i, tl.row0(first + i), tl.row1(first + i, g), r);
      });
    }
    std::vector<GemmJob<O>> list;
    jobs(list, r);
    const PhaseScope ps(Phase::kBackwardGemmWall);
    run_jobs(gemm, list, tl.nslots);
    after(tiles);
  }
}

// ---------------------------------------------------------------------------------------------------------
// mcl_embed

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, OptTensor> embed_forward(const at::Tensor& x, const at::Tensor& proj_w,
                                                            const OptTensor& proj_b, const at::Tensor& comp_w,
                                                            const OptTensor& comp_b, const OptTensor& decomp_w,
                                                            const OptTensor& decomp_b, const MclShape& s) {
  using O = op_type<scalar_t>;
  using A = acc_type<scalar_t>;
  constexpr bool kAlias = std::is_same_v<O, A>;
  const LevelShape& l = s.level;
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor S = at::empty({l.B, l.Hs * l.Ws, l.D}, opts);
  at::Tensor L = at::empty({l.B, l.Hl * l.Wl, l.D}, opts);
  OptTensor R;
  if (l.decompress) R = at::empty({l.B, l.Hs * l.Ws, l.D}, opts);
  const Grid g(l);
  if (g.rows == 0 || l.D == 0) return {S, L, R};

  const Gemm<O> gemm;
  const int64_t D = l.D, k = l.k, k2 = k * k, K = s.C * s.p * s.p, KD = k2 * D;
  const int64_t Kp = round_up(K, gemm.k_align()), KDp = round_up(KD, gemm.k_align());
  const std::vector<A> bs = bias_vector<A>(proj_b);

  const Tiling tl(g, at::get_num_threads(), kForwardTileTokens);
  const int64_t tmax = tl.max_tokens(g), tsmax = tmax * k2;
  LevelForward<scalar_t> level(gemm, g, comp_w, comp_b, decomp_w, decomp_b, L, R, tl.nslots, tmax);
  const auto gbuf = kAlias ? std::vector<at::Tensor>{} : per_slot<O>(tl.nslots, tmax * KDp, true);
  scalar_t* Sout = ptr<scalar_t>(S);
  const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());

  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (patch_gemm::reads(x, s.p)) {
      // S straight from the pixels into the output (patch_gemm.h, or in bf16 on AMX CPUs amx_patch_gemm.h: no
      // im2col tile), then G gathered from it.
      constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
      const bool on_tiles = kBf16 && amx::reads(x, s.p);
      const int64_t Q = patch_gemm::panels(D), panel = K * patch_gemm::kPanel;
      at::Tensor es_p = at::empty({on_tiles ? amx::packed_size(D, K) : Q * panel}, opts);
      const at::Tensor ew = proj_w.reshape({D, K}).contiguous();
      if constexpr (kBf16) {
        if (on_tiles) amx::pack(ptr<const scalar_t>(ew), D, K, ptr<scalar_t>(es_p));
      }
      if (!on_tiles) patch_gemm::pack(ptr<const scalar_t>(ew), D, K, s.p * s.p, ptr<scalar_t>(es_p));
      const std::vector<float> start = bs.empty() ? std::vector<float>(D, 0.0f) : bs;  // every row: the bias
      const auto sbuf = kAlias ? per_slot<A>(tl.nslots, tsmax * D, false) : std::vector<at::Tensor>{};
      const int64_t sC = x.stride(1), sH = x.stride(2);
      std::vector<std::vector<patch_gemm::Run<scalar_t>>> srun(tl.nslots);  // per slot: its tile's runs
      run_tiles(tl, g, gemm, [&](int64_t slot, int64_t r0, int64_t r1) {
        {
          const PhaseScope ps(Phase::kForwardSmall);
          if (on_tiles) {  // groups of up to 16 consecutive patches of a small-patch row
            if constexpr (kBf16) {
              std::vector<amx::Group> groups;
              for (int64_t rr = r0; rr < r1; ++rr) {
                for (int64_t u = 0; u < k; ++u) {
                  const scalar_t* row = large_row_origin(xp, x.strides(), s, rr) + u * s.p * sH;
                  scalar_t* srow = Sout + g.small(rr, 0, u) * D;
                  for (int64_t j = 0; j < g.Ws; j += amx::kRows) {
                    groups.push_back({row + j * s.p, s.p, std::min(amx::kRows, g.Ws - j), start.data(), 0,
                                      srow + j * D, D});
                  }
                }
              }
              amx::run(groups.data(), static_cast<int64_t>(groups.size()), sC, sH, s.p, s.C, ptr<scalar_t>(es_p), D);
            }
          } else {
            // The tile's small patches are rows [r0 * k * Ws, r1 * k * Ws) of S in order (small-patch rows
            // rr * k + u, Ws each), walked as even runs that may cross small-patch rows (patch_gemm::Run).
            std::vector<patch_gemm::Run<scalar_t>>& runs = srun[slot];
            runs.clear();
            const int64_t f0 = g.small(r0, 0, 0);
            patch_gemm::for_each_block(g.small(r1, 0, 0) - f0, [&](int64_t first, int64_t m) {
              patch_gemm::Run<scalar_t> run{{}, m, start.data(), Sout + (f0 + first) * D};
              for (int64_t r = 0; r < m; ++r) {
                const int64_t f = f0 + first + r, sr = f / g.Ws, col = f % g.Ws;  // small-patch row sr = rr * k + u
                run.px[r] = large_row_origin(xp, x.strides(), s, sr / k) + (sr % k) * s.p * sH + col * s.p;
              }
              runs.push_back(run);
            });
            patch_gemm::run_runs(runs.data(), static_cast<int64_t>(runs.size()), sC, sH, s.p, s.C,
                                 ptr<const scalar_t>(es_p), D, 0, Q, 0, D);
          }
        }
        const int64_t kD = k * D;
        O* ga = kAlias ? ptr<O>(sbuf[slot]) : ptr<O>(gbuf[slot]);
        const int64_t ldg = kAlias ? KD : KDp;
        {
          const PhaseScope ps(Phase::kForwardGroup);
          for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
            convert_n(Sout + flat * D, ga + t * ldg + u * kD, kD);
          });
        }
        level.tile(slot, r0, r1, ga, ldg);
      });
      return {S, L, R};
    }
  }

  int64_t ldes = 0;
  const at::Tensor es_b = weight_transposed_b<O, scalar_t>(gemm, proj_w.reshape({D, K}).contiguous(), Kp, ldes);
  const auto abuf = per_slot<O>(tl.nslots, tsmax * Kp, true);  // zero: padding columns stay 0
  const auto sbuf = per_slot<A>(tl.nslots, tsmax * D, false);
  run_tiles(tl, g, gemm, [&](int64_t slot, int64_t r0, int64_t r1) {
    const int64_t T = (r1 - r0) * l.Wl, Ts = T * k2, kD = k * D;
    A* sa = ptr<A>(sbuf[slot]);
    {
      const PhaseScope ps(Phase::kForwardSmall);
      O* a = ptr<O>(abuf[slot]);
      for_each_patch_row(xp, x.strides(), s, r0, r1, [&](int64_t row, int64_t col0, const scalar_t* px, int64_t sW) {
        copy_pixels(px, sW, s.p, a + row * Kp + col0);
      });
      if (!bs.empty()) cpu::fill_rows(sa, D, Ts, D, bs.data());
      gemm.run(Ts, D, Kp, a, Kp, ptr<O>(es_b), ldes, sa, D, !bs.empty());
    }
    if constexpr (kAlias) {
      {
        const PhaseScope ps(Phase::kForwardGroup);
        for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
          convert_n(sa + (t * k + u) * kD, Sout + flat * D, kD);
        });
      }
      level.tile(slot, r0, r1, sa, KD);  // the (t, u, v) tile [k*k*T, D] is G [T, k*k*D]
    } else {  // bf16: round S once, output it, and compress the rounded S as the reference does
      O* ga = ptr<O>(gbuf[slot]);
      {
        const PhaseScope ps(Phase::kForwardGroup);
        for (int64_t t = 0; t < T; ++t) convert_n(sa + t * KD, ga + t * KDp, KD);
        for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
          convert_n(ga + t * KDp + u * kD, Sout + flat * D, kD);
        });
      }
      level.tile(slot, r0, r1, ga, KDp);
    }
  });
  return {S, L, R};
}

template <typename scalar_t>
std::vector<OptTensor> embed_backward(const at::Tensor& g_small, const at::Tensor& g_large,
                                      const at::Tensor& g_recon, const at::Tensor& x, const at::Tensor& proj_w,
                                      const OptTensor& proj_b, const at::Tensor& comp_w, const OptTensor& comp_b,
                                      const OptTensor& decomp_w, const OptTensor& decomp_b,
                                      const at::Tensor& small, const at::Tensor& large, const MclShape& s,
                                      const std::vector<bool>& needs) {
  using O = op_type<scalar_t>;
  using A = acc_type<scalar_t>;
  constexpr bool kAlias = std::is_same_v<O, A>;
  const LevelShape& l = s.level;
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  const Grid g(l);
  const Gemm<O> gemm;
  const int64_t D = l.D, k = l.k, k2 = k * k, K = s.C * s.p * s.p, KD = k2 * D, ka = gemm.k_align();
  const int64_t Dp = round_up(D, ka);
  const bool need_x = needs[0], need_pw = needs[1], need_pb = needs[2] && proj_b.has_value();
  const bool need_small = need_x || need_pw || need_pb;
  const std::vector<bool> level_needs{needs[3], needs[4] && comp_b.has_value(), needs[5],
                                      needs[6] && decomp_b.has_value()};
  const bool has_gs = g_small.defined();
  // The VNNI im2col as vector interleaves: with k even, tile rows 2m and 2m + 1 (v even, v + 1) are adjacent
  // patches, p pixels apart when the image has unit W stride. It took 22% of a bf16 backward (D = 192, B = 16)
  // element by element.
  const bool vnni_pairs = gemm.vnni() && std::is_same_v<scalar_t, c10::BFloat16> && k % 2 == 0 && x.stride(3) == 1;

  // dE from the pixels straight from x (no im2col stack; patch_gemm.h): fp32, unit W stride, p a multiple of 16
  // (a token's panel columns are then runs of 16 pixels of one image row).
  bool direct_de = false;
  if constexpr (std::is_same_v<scalar_t, float>) {
    direct_de = s.p % 16 == 0 && cpu::patch_gemm::reads(x, s.p);
  }

  const Tiling tl(g, at::get_num_threads(), backward_tile_tokens(gemm), /*rounds=*/true);
  const int64_t tmax = tl.max_tokens(g), tsmax = tmax * k2, ldst = tl.nslots * round_up(tsmax, ka);
  LevelBackward<scalar_t> level(gemm, g, tl, g_large, g_recon, comp_w, decomp_w, large, small, level_needs,
                                need_small, opts, need_small ? tsmax * D * int64_t(sizeof(A)) : 0);
  // Whether the gradient of S is nonzero at all (the upstream gradient of S, or one through L).
  const bool small_grad = need_small && (has_gs || level.has_gl) && tl.nslots > 0 && D > 0;

  GradAcc<scalar_t> pw, pb;
  if (need_pw) pw = GradAcc<scalar_t>({D, K}, opts);
  if (need_pb) pb = GradAcc<scalar_t>({D}, opts);
  BiasParts<A> pb_parts;
  std::vector<at::Tensor> gs_a, gx_buf;
  at::Tensor gsT, imB, es_hold, gx;  // stacks: gS'^T [D, ldst] (direct_de: gS' [ldst, D]), A [ldst, K]
  const O* es_b = nullptr;
  int64_t ldes = 0;
  if (need_x) gx = small_grad ? at::empty(x.sizes(), opts) : at::zeros(x.sizes(), opts);
  if (small_grad) {
    if (need_pb) pb_parts.init(tl.nslots, D);
    if (need_pw) {
      gsT = buffer<O>(D * ldst, false);
      if (!direct_de) imB = buffer<O>(ldst * K, false);
    }
    if (need_x) {
      if (!kAlias) gs_a = per_slot<O>(tl.nslots, tsmax * Dp, true);
      gx_buf = per_slot<A>(tl.nslots, tsmax * K, false);
      es_b = weight_rows_b<O, scalar_t>(gemm, proj_w.reshape({D, K}).contiguous(), Dp, es_hold, ldes);
    }
  }
  std::vector<const O*> tokp;  // direct dE: the pixels of the token at each stack position of the round
  std::vector<int64_t> poff;   // direct dE: offset of panel q's run v of 16 pixels from a patch's pixel (0, 0, 0)
  if (direct_de && small_grad && need_pw) {
    tokp.assign(ldst, nullptr);
    for (int64_t col = 0; col < K; col += 16) {
      const int64_t c = col / (s.p * s.p), y = col / s.p % s.p, v = col % s.p;
      poff.push_back(c * x.stride(1) + y * x.stride(2) + v);
    }
  }
  std::vector<Round> lr, sr;  // stack layouts of each round: large tokens, small tokens
  for (int64_t r = 0; tl.nslots > 0 && r * tl.nslots < tl.ntiles; ++r) {
    lr.push_back(make_round(tl, g, r, 1, ka));
    sr.push_back(make_round(tl, g, r, k2, ka));
  }
  const auto* gS = has_gs ? ptr<const scalar_t>(g_small) : nullptr;
  const auto* xp = static_cast<const scalar_t*>(x.const_data_ptr());
  scalar_t* gxp = need_x ? ptr<scalar_t>(gx) : nullptr;

  auto tile = [&](int64_t slot, int64_t i, int64_t r0, int64_t r1, int64_t r) {
    level.tile(slot, i, r0, r1, lr[r].off[i]);
    if (!small_grad) return;
    const int64_t T = (r1 - r0) * l.Wl, Ts = T * k2, Tsp = round_up(Ts, ka), kD = k * D, off = sr[r].off[i];
    // gS' = gS in tile order + gl W_c (the gradient of G, whose [T, k*k*D] rows are the tile's [k*k*T, D] rows)
    A* gs = ptr<A>(level.scratch[slot]);  // the grouped gR is no longer needed
    if constexpr (std::is_same_v<A, O>) {
      if (direct_de && need_pw) gs = ptr<O>(gsT) + off * D;
    }
    if (has_gs) {
      const PhaseScope ps(Phase::kBackwardGroup);
      for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
        convert_n(gS + flat * D, gs + (t * k + u) * kD, kD);
      });
    }
    if (level.has_gl) {
      const PhaseScope ps(Phase::kBackwardTokenGemm);
      const auto [gla, ldg] = level.gl_operand(slot);
      gemm.run(T, KD, Dp, gla, ldg, level.wc_b, level.ldwc, gs, KD, has_gs);
    }
    if (need_pb) {
      const PhaseScope ps(Phase::kBackwardBias);
      cpu::add_column_sums(gs, D, Ts, D, pb_parts.part(i));
    }
    if (need_pw) {  // dE [D, K] += gS'^T [D, Ts] A [Ts, K], A rebuilt from x (direct_de: read from x in phase B)
      const PhaseScope ps(Phase::kBackwardStacks);
      if (direct_de) {  // gs is already in the stack (token-major); phase B reads each patch's pixels from x
        for_each_patch(xp, x.strides(), s, r0, r1, [&](int64_t row, const scalar_t* px) {
          tokp[off + row] = reinterpret_cast<const O*>(px);
        });
      } else {
        cpu::transpose_to(gs, D, Ts, Tsp, D, ptr<O>(gsT) + off, ldst);
        O* imb = ptr<O>(imB) + off * K;
        if (!gemm.vnni()) {
          auto copy = [&](int64_t row, int64_t col0, const scalar_t* px, int64_t sW) {
            copy_pixels(px, sW, s.p, imb + row * K + col0);
          };
          for_each_patch_row(xp, x.strides(), s, r0, r1, copy);
        } else if (vnni_pairs) {  // rows 2m, 2m + 1 are neighbours v, v + 1: p pixels apart in one image row
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            for_each_patch_row(xp, x.strides(), s, r0, r1, [&](int64_t row, int64_t col0, const scalar_t* px, int64_t) {
              if ((row & 1) == 0) cpu::simd::interleave(px, px + s.p, imb + ((row >> 1) * K + col0) * 2, s.p);
            });
          }
        } else {  // VNNI: rows 2m and 2m + 1 interleaved, element by element
          for_each_patch_row(xp, x.strides(), s, r0, r1, [&](int64_t row, int64_t col0, const scalar_t* px,
                                                             int64_t sW) {
            O* dst = imb + ((row >> 1) * K + col0) * 2 + (row & 1);
            for (int64_t q = 0; q < s.p; ++q) dst[2 * q] = cvt<O>(px[q * sW]);
          });
          if (Tsp > Ts) {
            for (int64_t col = 0; col < K; ++col) imb[((Ts >> 1) * K + col) * 2 + 1] = O(0);
          }
        }
      }
    }
    if (need_x) {  // gx = col2im(gS' E): patches do not overlap, so every pixel is written once
      const PhaseScope ps(Phase::kBackwardInput);
      const O* gsa;
      int64_t ldgs;
      if constexpr (kAlias) {
        gsa = gs, ldgs = D;
      } else {
        O* o = ptr<O>(gs_a[slot]);
        for (int64_t row = 0; row < Ts; ++row) convert_n(gs + row * D, o + row * Dp, D);
        gsa = o, ldgs = Dp;
      }
      A* gxa = ptr<A>(gx_buf[slot]);
      gemm.run(Ts, K, Dp, gsa, ldgs, es_b, ldes, gxa, K, false);
      for_each_patch_row(gxp, gx.strides(), s, r0, r1, [&](int64_t row, int64_t col0, scalar_t* px, int64_t sW) {
        const A* src = gxa + row * K + col0;
        for (int64_t q = 0; q < s.p; ++q) px[q * sW] = cvt<scalar_t>(src[q]);
      });
    }
  };
  auto jobs = [&](std::vector<GemmJob<O>>& list, int64_t r) {
    level.jobs(list, lr[r].off);
    if (small_grad && need_pw) {
      if (direct_de) {
        list.push_back({ptr<O>(gsT), D, nullptr, K, pw.ptr(), K, D, K, &sr[r].off, tokp.data(), poff.data(),
                        Phase::kBackwardEmbedGrad});
      } else {
        list.push_back({ptr<O>(gsT), ldst, ptr<O>(imB), K, pw.ptr(), K, D, K, &sr[r].off, nullptr, nullptr,
                        Phase::kBackwardEmbedGrad});
      }
    }
  };
  auto after = [&](int64_t tiles) {
    level.add_bias_parts(tiles);
    if (small_grad && need_pb) pb_parts.add_to(pb.ptr(), tiles);
  };
  run_rounds(tl, g, gemm, tile, jobs, after);

  std::vector<OptTensor> out(7);
  if (need_x) out[0] = gx;
  if (need_pw) out[1] = pw.finish().view(proj_w.sizes());
  if (need_pb) out[2] = pb.finish();
  const std::vector<OptTensor> lv = level.finish();
  std::copy(lv.begin(), lv.end(), out.begin() + 3);
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// mcl_compress

template <typename scalar_t>
std::tuple<at::Tensor, OptTensor> compress_forward(const at::Tensor& tokens, const at::Tensor& comp_w,
                                                   const OptTensor& comp_b, const OptTensor& decomp_w,
                                                   const OptTensor& decomp_b, const LevelShape& l) {
  using O = op_type<scalar_t>;
  const auto opts = tokens.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor L = at::empty({l.B, l.Hl * l.Wl, l.D}, opts);
  OptTensor R;
  if (l.decompress) R = at::empty({l.B, l.Hs * l.Ws, l.D}, opts);
  const Grid g(l);
  if (g.rows == 0 || l.D == 0) return {L, R};

  const Gemm<O> gemm;
  const int64_t D = l.D, k = l.k, KD = k * k * D, KDp = round_up(KD, gemm.k_align());
  const Tiling tl(g, at::get_num_threads(), kForwardTileTokens);
  const int64_t tmax = tl.max_tokens(g);
  LevelForward<scalar_t> level(gemm, g, comp_w, comp_b, decomp_w, decomp_b, L, R, tl.nslots, tmax);
  const auto gbuf = per_slot<O>(tl.nslots, tmax * KDp, true);
  const auto* tok = ptr<const scalar_t>(tokens);
  run_tiles(tl, g, gemm, [&](int64_t slot, int64_t r0, int64_t r1) {
    O* ga = ptr<O>(gbuf[slot]);
    {
      const PhaseScope ps(Phase::kForwardGroup);
      for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
        convert_n(tok + flat * D, ga + t * KDp + u * k * D, k * D);
      });
    }
    level.tile(slot, r0, r1, ga, KDp);
  });
  return {L, R};
}

template <typename scalar_t>
std::vector<OptTensor> compress_backward(const at::Tensor& g_large, const at::Tensor& g_recon,
                                         const at::Tensor& tokens, const at::Tensor& comp_w, const OptTensor& comp_b,
                                         const OptTensor& decomp_w, const OptTensor& decomp_b,
                                         const at::Tensor& large, const LevelShape& l, const std::vector<bool>& needs) {
  using O = op_type<scalar_t>;
  using A = acc_type<scalar_t>;
  const auto opts = tokens.options().memory_format(at::MemoryFormat::Contiguous);
  const Grid g(l);
  const Gemm<O> gemm;
  const int64_t D = l.D, k = l.k, KD = k * k * D, Dp = round_up(D, gemm.k_align());
  const bool need_tok = needs[0];
  const std::vector<bool> level_needs{needs[1], needs[2] && comp_b.has_value(), needs[3],
                                      needs[4] && decomp_b.has_value()};
  const Tiling tl(g, at::get_num_threads(), backward_tile_tokens(gemm), /*rounds=*/true);
  const int64_t tmax = tl.max_tokens(g);
  LevelBackward<scalar_t> level(gemm, g, tl, g_large, g_recon, comp_w, decomp_w, large, tokens, level_needs,
                                need_tok, opts, need_tok ? tmax * KD * int64_t(sizeof(A)) : 0);
  const bool tok_grad = need_tok && level.has_gl && tl.nslots > 0 && D > 0;
  at::Tensor gt;
  if (need_tok) gt = tok_grad ? at::empty(tokens.sizes(), opts) : at::zeros(tokens.sizes(), opts);
  scalar_t* gtp = need_tok ? ptr<scalar_t>(gt) : nullptr;
  std::vector<Round> lr;
  for (int64_t r = 0; tl.nslots > 0 && r * tl.nslots < tl.ntiles; ++r) {
    lr.push_back(make_round(tl, g, r, 1, gemm.k_align()));
  }

  auto tile = [&](int64_t slot, int64_t i, int64_t r0, int64_t r1, int64_t r) {
    level.tile(slot, i, r0, r1, lr[r].off[i]);
    if (!tok_grad) return;
    const int64_t T = (r1 - r0) * l.Wl;
    const PhaseScope ps(Phase::kBackwardInput);
    A* gg = ptr<A>(level.scratch[slot]);  // the grouped gR is no longer needed
    const auto [gla, ldg] = level.gl_operand(slot);
    gemm.run(T, KD, Dp, gla, ldg, level.wc_b, level.ldwc, gg, KD, false);
    for_each_group_row(g, r0, r1, [&](int64_t t, int64_t u, int64_t flat) {
      convert_n(gg + t * KD + u * k * D, gtp + flat * D, k * D);
    });
  };
  auto jobs = [&](std::vector<GemmJob<O>>& list, int64_t r) { level.jobs(list, lr[r].off); };
  auto after = [&](int64_t tiles) { level.add_bias_parts(tiles); };
  run_rounds(tl, g, gemm, tile, jobs, after);

  std::vector<OptTensor> out(5);
  if (need_tok) out[0] = gt;
  const std::vector<OptTensor> lv = level.finish();
  std::copy(lv.begin(), lv.end(), out.begin() + 1);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, OptTensor> mcl_embed_cpu(const at::Tensor& x, const at::Tensor& proj_w,
                                                            const OptTensor& proj_b, const at::Tensor& comp_w,
                                                            const OptTensor& comp_b, const OptTensor& decomp_w,
                                                            const OptTensor& decomp_b, const MclShape& s) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mcl_embed_cpu", [&] {
    return embed_forward<scalar_t>(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, s);
  });
}

std::vector<OptTensor> mcl_embed_backward_cpu(const at::Tensor& g_small, const at::Tensor& g_large,
                                              const at::Tensor& g_recon, const at::Tensor& x,
                                              const at::Tensor& proj_w, const OptTensor& proj_b,
                                              const at::Tensor& comp_w, const OptTensor& comp_b,
                                              const OptTensor& decomp_w, const OptTensor& decomp_b,
                                              const at::Tensor& small, const at::Tensor& large, const MclShape& s,
                                              const std::vector<bool>& needs) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mcl_embed_backward_cpu", [&] {
    return embed_backward<scalar_t>(g_small, g_large, g_recon, x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b,
                                    small, large, s, needs);
  });
}

std::tuple<at::Tensor, OptTensor> mcl_compress_cpu(const at::Tensor& tokens, const at::Tensor& comp_w,
                                                   const OptTensor& comp_b, const OptTensor& decomp_w,
                                                   const OptTensor& decomp_b, const LevelShape& l) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tokens.scalar_type(), "mcl_compress_cpu", [&] {
    return compress_forward<scalar_t>(tokens, comp_w, comp_b, decomp_w, decomp_b, l);
  });
}

std::vector<OptTensor> mcl_compress_backward_cpu(const at::Tensor& g_large, const at::Tensor& g_recon,
                                                 const at::Tensor& tokens, const at::Tensor& comp_w,
                                                 const OptTensor& comp_b, const OptTensor& decomp_w,
                                                 const OptTensor& decomp_b, const at::Tensor& large,
                                                 const LevelShape& l, const std::vector<bool>& needs) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tokens.scalar_type(), "mcl_compress_backward_cpu",
                                         [&] {
    return compress_backward<scalar_t>(g_large, g_recon, tokens, comp_w, comp_b, decomp_w, decomp_b, large, l, needs);
  });
}

}  // namespace mcl
