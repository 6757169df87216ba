// phases.h: the counters.
#include "phases.h"

#include <array>

namespace mcl::cpu::phases {

namespace {

std::array<std::atomic<int64_t>, kCount> counters{};

// The names benchmarks/cpu_phases.py reports, in Phase order.
constexpr const char* kNames[] = {
    "fwd.small_gemm", "fwd.group",       "fwd.large_gemm", "fwd.recon_gemm",   "fwd.ungroup",
    "bwd.group",      "bwd.token_gemms", "bwd.stacks",     "bwd.bias_sums",    "bwd.input_grad",
    "bwd.weight_gemms", "bwd.embed_grad", "bwd.wall.tiles", "bwd.wall.weight_gemms"};
static_assert(sizeof(kNames) / sizeof(kNames[0]) == kCount, "one name per phase");

}  // namespace

namespace detail {
std::atomic<bool> on{false};
void add(Phase p, int64_t ns) { counters[p].fetch_add(ns, std::memory_order_relaxed); }
}  // namespace detail

void set_enabled(bool on) { detail::on.store(on, std::memory_order_relaxed); }

std::vector<std::pair<std::string, double>> take() {
  std::vector<std::pair<std::string, double>> out;
  for (int p = 0; p < kCount; ++p) {
    const int64_t ns = counters[p].exchange(0);
    if (ns > 0) out.emplace_back(kNames[p], ns * 1e-9);
  }
  return out;
}

}  // namespace mcl::cpu::phases
