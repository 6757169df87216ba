// Single-threaded GEMMs on cache-sized tiles, and the packing of their operands, for the CPU kernels.
//
// The fused CPU kernels split their work into tiles and run one tile per thread (at::parallel_for), so each
// GEMM here runs on the calling thread only. They go through oneDNN's brgemm micro-kernel
// (at::native::cpublas::brgemm), which on AVX-512 CPUs runs fp32 faster than the BLAS behind torch.mm and
// runs bf16 with the CPU's bf16 dot-product instructions, accumulating in fp32. Where the CPU has no bf16
// kernel (or oneDNN is disabled: torch.backends.mkldnn), bf16 B operands stay row-major and brgemm falls back
// to torch's bf16 x bf16 -> fp32 GEMM; where brgemm is not in the installed torch at all, fp32 and fp64 run
// through at::mm on the same memory and bf16 tiles are converted to fp32. On CPUs whose best ISA is AVX2 (no
// AVX-512: oneDNN's AVX2 brgemm ran these shapes at 45-71% of the FMA limit there), fp32 and row-major bf16 GEMMs run
// on gemm_avx2.h's own kernel instead (use_gemm_avx2).
//
// Operand layouts (row-major, leading dimensions in elements):
//   A [M, K] with lda >= K; C [M, N] in the accumulation type with ldc >= N;
//   B [K, N] in the "B layout" of the operand type: row-major with ldb >= N, or, for bf16 on CPUs with
//   bf16 dot products, VNNI pairs: element (kk, n) at ((kk / 2) * ldb + n) * 2 + kk % 2, K padded to even.
// K is padded to `k_align()` with zeros in both A and B so that the padding adds nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "gemm_avx2.h"
#include "simd.h"

namespace mcl::cpu {

// Accumulation type: fp32, except fp64 for fp64 inputs.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// GEMM operand type. bf16 multiplies in bf16 (fp32 accumulation) where brgemm has a bf16 kernel; fp16 has no
// fast kernel on most CPUs (AVX512-FP16/AMX-FP16 only), so its tiles are converted to fp32, which costs a copy
// the tiles make anyway.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
template <typename T>
using op_type = std::conditional_t<std::is_same_v<T, c10::Half>, float, T>;
#else
template <typename T>
using op_type = std::conditional_t<std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, float, T>;
#endif

template <typename To, typename From>
inline To cvt(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_same_v<From, double> || std::is_same_v<To, double>) {
    return static_cast<To>(static_cast<double>(v));
  } else {
    return static_cast<To>(static_cast<float>(v));
  }
}

// dst[i] = cvt(src[i]) for i < n; a memcpy when the types agree, vectorized fp32 <-> bf16.
template <typename To, typename From>
inline void convert_n(const From* src, To* dst, int64_t n) {
  if constexpr (std::is_same_v<To, From>) {
    std::memcpy(dst, src, n * sizeof(To));
  } else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, c10::BFloat16>) {
    simd::to_bf16(src, dst, n);
  } else if constexpr (std::is_same_v<From, c10::BFloat16> && std::is_same_v<To, float>) {
    simd::to_float(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = cvt<To>(src[i]);
  }
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Whether fp32 GEMMs run on gemm_avx2.h's kernel instead of brgemm: where patch_gemm::isa() is AVX2 (a CPU without
// AVX-512, or the AVX2 kernels chosen with patch_gemm::set_isa). On an AMD EPYC Zen 3, one thread, the training step's
// tile shapes ran at 73-86% of the FMA limit with operands in L2 there, brgemm at 45-71% (benchmarks/gemm_cache.py);
// on AVX-512 CPUs brgemm has AVX-512 kernels. Defined in tile_gemm.cpp.
bool use_gemm_avx2();

// Gemm<float or bf16>::run on the calling thread, for tests: returns c + a b (add) or a b, a [M, K] and b [K, N] of
// one dtype with unit column stride (rows may be spaced: a slice), c float32 [M, N]. bf16 only where Gemm takes
// row-major B (no VNNI packing: CPUs without bf16 dot products). Defined in tile_gemm.cpp.
at::Tensor tile_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool add);

// Whether bf16 brgemm takes VNNI-packed B here (oneDNN's AVX512-BF16/AMX kernels); probed once, since the
// answer depends on the CPU and on torch's build. Defined in tile_gemm.cpp.
bool bf16_brgemm_vnni();

// GEMMs with operands of type `O`; results accumulate in acc_type<O> (fp32 for bf16).
// A row stride for n elements of `bytes` each that is not a multiple of 4 KiB: rows that many bytes apart fall
// into the same L1 sets, and the GEMM's micro-kernel walks several such rows at once. brgemm, one thread, M = 98,
// N = 3072 (fp32 rows of 12 KiB), K = 768: 63 GFLOP/s at ldb = ldc = 3072, 123 at 3088; N = 1536 (6 KiB): 168
// either way; only B's stride mattered (benchmarks/results/gemm-ld-cpu-2core-intel.txt).
inline int64_t padded_ld(int64_t n, int64_t bytes) { return (n * bytes) % 4096 == 0 ? n + 64 / bytes : n; }

template <typename O>
class Gemm {
 public:
  using acc_t = acc_type<O>;

  Gemm() {
    if constexpr (std::is_same_v<O, c10::BFloat16>) vnni_ = bf16_brgemm_vnni();
  }

  bool vnni() const { return vnni_; }
  // K (the reduction length) of every operand is padded to a multiple of this, with zeros.
  int64_t k_align() const { return vnni_ ? 2 : 1; }

  // The row stride to pack a B operand of N columns with: N, or padded_ld of it (a column is a VNNI pair or one
  // element). Every weight packed as B uses it.
  int64_t b_ld(int64_t N) const { return padded_ld(N, vnni_ ? 4 : static_cast<int64_t>(sizeof(O))); }

  // Offset of B[kk][n] in B layout with row length ldb.
  int64_t b_index(int64_t kk, int64_t n, int64_t ldb) const {
    return vnni_ ? ((kk >> 1) * ldb + n) * 2 + (kk & 1) : kk * ldb + n;
  }

  // C[M, N] = A[M, K] B[K, N] (+ C when `add`). K must already be padded to k_align().
  void run(int64_t M, int64_t N, int64_t K, const O* a, int64_t lda, const O* b, int64_t ldb, acc_t* c,
           int64_t ldc, bool add) const {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
      if (!add) {
        for (int64_t m = 0; m < M; ++m) std::fill_n(c + m * ldc, N, acc_t(0));
      }
      return;
    }
    if constexpr (std::is_same_v<O, float> || std::is_same_v<O, c10::BFloat16>) {
      if (on_gemm_avx2()) {  // its own K blocks; as fixed as those below
        gemm_avx2::run(M, N, K, a, lda, b, ldb, c, ldc, add);
        return;
      }
    }
    // brgemm streams its whole K for each block of C: blocks of kBlockK x kBlockN keep that B panel in L2.
    // Measured (AVX-512, fp32, K = 3072): ~75 GFLOP/s per core unblocked, ~110 with 512-deep K blocks. The
    // blocking is fixed, so every element is summed in the same order whatever the tile or thread count.
    for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
      const int64_t nb = std::min(kBlockN, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kBlockM) {
        const int64_t mb = std::min(kBlockM, M - m0);
        for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
          const int64_t kb = std::min(kBlockK, K - k0);
          call(mb, nb, kb, a + m0 * lda + k0, lda, b + b_index(k0, n0, ldb), ldb, c + m0 * ldc + n0, ldc,
               add || k0 > 0);
        }
      }
    }
  }

  // Whether run(add = true) over K = K1 + K2 gives bitwise what a call over K1 and then one over K2 give: where each
  // element is one FMA chain over k in order starting from C (gemm_avx2.h). brgemm makes no such promise.
  bool k_split_exact() const { return on_gemm_avx2(); }

  // Returns the hardware context some brgemm kernels hold (AMX tiles); call once a thread is done.
  void release() const {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
    if (vnni_) at::native::cpublas::brgemm_release(true);
#endif
  }

  static constexpr int64_t kBlockN = 256;
  static constexpr int64_t kBlockM = 1024;
  static constexpr int64_t kBlockK = 512;  // even: VNNI pairs never straddle a block

 private:
  void call(int64_t M, int64_t N, int64_t K, const O* a, int64_t lda, const O* b, int64_t ldb, acc_t* c,
            int64_t ldc, bool add) const {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
    if constexpr (std::is_same_v<O, float>) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, false);
      return;
    }
#endif
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
    if constexpr (std::is_same_v<O, c10::BFloat16>) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, vnni_);
      return;
    }
#endif
    if constexpr (std::is_same_v<O, float> || std::is_same_v<O, double>) {
      // at::mm on the same memory (fp64, or a torch without brgemm); single-threaded inside parallel_for.
      const auto dt = c10::CppTypeToScalarType<O>::value;
      const at::Tensor ta = at::from_blob(const_cast<O*>(a), {M, K}, {lda, 1}, at::TensorOptions().dtype(dt));
      const at::Tensor tb = at::from_blob(const_cast<O*>(b), {K, N}, {ldb, 1}, at::TensorOptions().dtype(dt));
      at::Tensor tc = at::from_blob(c, {M, N}, {ldc, 1}, at::TensorOptions().dtype(dt));
      if (add) {
        tc.addmm_(ta, tb);
      } else {
        tc.copy_(at::mm(ta, tb));
      }
    } else {
      TORCH_CHECK(false, "mcl_kernels: no CPU GEMM for operand type ", c10::CppTypeToScalarType<O>::value);
    }
  }

  // Whether run() goes to gemm_avx2.h: fp32, or bf16 with row-major B, where use_gemm_avx2().
  bool on_gemm_avx2() const {
    if constexpr (std::is_same_v<O, float> || std::is_same_v<O, c10::BFloat16>) return !vnni_ && use_gemm_avx2();
    return false;
  }

  bool vnni_ = false;
};

// B layout `dst` (N columns, row stride ldd >= N) from row-major rows src [K, N] (row stride lds), rows K..Kp zero.
template <typename O>
void pack_rows(const Gemm<O>& gemm, const O* src, int64_t lds, int64_t K, int64_t Kp, int64_t N, O* dst,
               int64_t ldd) {
  if (!gemm.vnni()) {
    for (int64_t kk = 0; kk < K; ++kk) std::memcpy(dst + kk * ldd, src + kk * lds, N * sizeof(O));
    for (int64_t kk = K; kk < Kp; ++kk) std::fill(dst + kk * ldd, dst + kk * ldd + N, O(0));
    return;
  }
  if constexpr (std::is_same_v<O, c10::BFloat16>) {
    std::vector<O> zeros(K % 2 ? N : 0, O(0));
    for (int64_t kk = 0; kk < K; kk += 2) {
      const O* second = kk + 1 < K ? src + (kk + 1) * lds : zeros.data();
      simd::interleave(src + kk * lds, second, dst + kk * ldd, N);
    }
  }
}

// B = W^T for a weight W [N, K] (row stride ldw) in B layout, built in parallel: the forward multiplies by
// transposed weights. In VNNI layout, the pairs (W[n][kk], W[n][kk + 1]) are 32-bit words of W's rows, so
// W^T packed is the 32-bit transpose of W. ldb >= N: B's row stride (Gemm::b_ld).
template <typename O, typename S>
void pack_b_transposed(const Gemm<O>& gemm, const S* w, int64_t ldw, int64_t K, int64_t Kp, int64_t N, O* dst,
                       int64_t ldb) {
  if constexpr (std::is_same_v<O, S> && sizeof(O) == 4) {
    if (!gemm.vnni()) {
      at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
        simd::transpose32(w + begin * ldw, ldw, end - begin, K, dst + begin, ldb);
      });
      return;
    }
  }
  if constexpr (std::is_same_v<O, S> && sizeof(O) == 2) {
    if (gemm.vnni() && K % 2 == 0 && ldw % 2 == 0) {
      const auto* w32 = reinterpret_cast<const uint32_t*>(w);
      auto* d32 = reinterpret_cast<uint32_t*>(dst);
      at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
        simd::transpose32(w32 + begin * (ldw / 2), ldw / 2, end - begin, K / 2, d32 + begin, ldb);
      });
      return;
    }
  }
  at::parallel_for(0, Kp, 16, [&](int64_t begin, int64_t end) {
    for (int64_t kk = begin; kk < end; ++kk) {
      for (int64_t n = 0; n < N; ++n) dst[gemm.b_index(kk, n, ldb)] = kk < K ? cvt<O>(w[n * ldw + kk]) : O(0);
    }
  });
}

// B = W for a weight W [K, N] (row stride ldw) in B layout.
template <typename O, typename S>
void pack_b_rows(const Gemm<O>& gemm, const S* w, int64_t ldw, int64_t K, int64_t Kp, int64_t N, O* dst,
                 int64_t ldb) {
  if constexpr (std::is_same_v<O, S>) {
    pack_rows(gemm, w, ldw, K, Kp, N, dst, ldb);
  } else {  // fp16 weights for fp32 GEMMs (never VNNI)
    at::parallel_for(0, K, 16, [&](int64_t begin, int64_t end) {
      for (int64_t kk = begin; kk < end; ++kk) convert_n(w + kk * ldw, dst + kk * ldb, N);
    });
    for (int64_t kk = K; kk < Kp; ++kk) std::fill(dst + kk * ldb, dst + kk * ldb + N, O(0));
  }
}

// dst [N, ldd] (row-major, op type) = src[M, N]^T (row stride lds), with dst columns M..Mp zeroed: the
// token-major tiles become the A operand of a weight-gradient GEMM that reduces over tokens.
template <typename O, typename S>
void transpose_to(const S* src, int64_t lds, int64_t M, int64_t Mp, int64_t N, O* dst, int64_t ldd) {
  if constexpr (std::is_same_v<O, S> && sizeof(O) == 4) {
    simd::transpose32(src, lds, M, N, dst, ldd);
  } else if constexpr (std::is_same_v<O, c10::BFloat16> &&
                       (std::is_same_v<S, float> || std::is_same_v<S, c10::BFloat16>)) {
    simd::transpose_to_bf16(src, lds, M, N, dst, ldd);
  } else {
    constexpr int64_t kB = 16;
    for (int64_t m0 = 0; m0 < M; m0 += kB) {
      for (int64_t n0 = 0; n0 < N; n0 += kB) {
        for (int64_t n = n0; n < std::min(N, n0 + kB); ++n) {
          for (int64_t m = m0; m < std::min(M, m0 + kB); ++m) dst[n * ldd + m] = cvt<O>(src[m * lds + n]);
        }
      }
    }
  }
  if (Mp > M) {
    for (int64_t n = 0; n < N; ++n) std::fill(dst + n * ldd + M, dst + n * ldd + Mp, O(0));
  }
}

// acc[n] += sum over rows m of src[m, n] (row stride lds), summed in row order: deterministic.
template <typename A, typename S>
void add_column_sums(const S* src, int64_t lds, int64_t M, int64_t N, A* acc) {
  for (int64_t m = 0; m < M; ++m) {
    const S* row = src + m * lds;
    for (int64_t n = 0; n < N; ++n) acc[n] += cvt<A>(row[n]);
  }
}

// Each row m of dst [M, N] (row stride ldd) set to v[0:N].
template <typename A>
void fill_rows(A* dst, int64_t ldd, int64_t M, int64_t N, const A* v) {
  for (int64_t m = 0; m < M; ++m) std::memcpy(dst + m * ldd, v, N * sizeof(A));
}

}  // namespace mcl::cpu
