// phases.h: the counters.
#include "phases.h"

namespace mcl::cpu::phases {

namespace {

std::array<std::atomic<int64_t>, kCount> counters{};

constexpr std::array<const char*, kCount> kNames = {
    "fwd.small_gemm", "fwd.group",       "fwd.large_gemm", "fwd.recon_gemm",   "fwd.ungroup",
    "bwd.group",      "bwd.token_gemms", "bwd.stacks",     "bwd.bias_sums",    "bwd.input_grad",
    "bwd.weight_gemms", "bwd.wall.tiles", "bwd.wall.weight_gemms"};

}  // namespace

namespace detail {
std::atomic<bool> on{false};
void add(Phase p, int64_t ns) { counters[p].fetch_add(ns, std::memory_order_relaxed); }
}  // namespace detail

const char* name(Phase p) { return kNames[p]; }

void set_enabled(bool on) { detail::on.store(on, std::memory_order_relaxed); }

bool enabled() { return detail::on.load(std::memory_order_relaxed); }

std::vector<std::pair<std::string, double>> take() {
  std::vector<std::pair<std::string, double>> out;
  for (int p = 0; p < kCount; ++p) {
    const int64_t ns = counters[p].exchange(0);
    if (ns > 0) out.emplace_back(kNames[p], ns * 1e-9);
  }
  return out;
}

}  // namespace mcl::cpu::phases
