// Where the fused CPU training kernels spend their time: per-phase thread time, off unless switched on.
//
// The kernels are GEMM-bound, so "how far from the roofline" splits into two questions: how fast do their GEMMs
// run where they are called (operands in L2, or streamed from L3 or memory), and how much time goes to the
// tile movement around them (gathers, transposes, im2col). benchmarks/cpu_phases.py answers both from these
// counters. A Scope adds its lifetime to its phase, summed over threads (so two threads in one phase for 10 ms
// count 20 ms); when profiling is off, a Scope is one relaxed atomic load.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mcl::cpu::phases {

enum Phase : int {
  kForwardSmall,      // S from the pixels (patch_gemm, or im2col + brgemm)
  kForwardGroup,      // G = group(S) into the tile buffer / S out in token order
  kForwardLarge,      // L = G W_c^T + b_c
  kForwardRecon,      // L W_d^T into the tile buffer
  kForwardUngroup,    // R = ungroup(...) + b_d into the output
  kBackwardGroup,     // gR and gS into tile order
  kBackwardTokenGemm, // gradients of the tokens: gl = gL + gRg W_d, gS' = gS + gl W_c
  kBackwardStacks,    // weight-gradient operands: transposes of gradient tiles, L, G, the im2col of x (not for
                      // dE read from the pixels)
  kBackwardBias,      // column sums for the bias gradients
  kBackwardInput,     // the gradient of the input: gx = col2im(gS' E), or the tokens' (mcl_compress)
  kBackwardWeightGemm,// the rounds' compression and decompression weight-gradient GEMMs (phase B): dW_c, dW_d
  kBackwardEmbedGrad, // the rounds' patch-embedding weight gradient dE (phase B), from the pixels or the im2col stack
  kBackwardTilesWall, // wall time of the rounds' phase A (one thread's clock, whole parallel region)
  kBackwardGemmWall,  // wall time of the rounds' phase B
  kCount
};

void set_enabled(bool on);

// (name, seconds) of every phase with time recorded since the last take(); then zeroes the counters.
std::vector<std::pair<std::string, double>> take();

namespace detail {
extern std::atomic<bool> on;
void add(Phase p, int64_t ns);
}  // namespace detail

class Scope {
 public:
  explicit Scope(Phase p) : phase_(p), timed_(detail::on.load(std::memory_order_relaxed)) {
    if (timed_) start_ = std::chrono::steady_clock::now();
  }
  ~Scope() {
    if (timed_) {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start_);
      detail::add(phase_, ns.count());
    }
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Phase phase_;
  bool timed_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace mcl::cpu::phases
