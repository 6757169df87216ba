// C++ tests of mcl::mcl_embed / mcl_embed_backward and mcl_compress against the math written with ATen ops
// (conv2d, reshape/permute grouping, linear) in float64, with the dependency-free harness of
// test_embed_tokens.cpp: each failed expectation prints where and by how much; the exit status is the count.
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "mcl_embed.h"

namespace {

int g_checks = 0;
int g_failures = 0;

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol) {
  if (!got.defined() || !want.defined()) {
    expect(got.defined() == want.defined(), what + ": one side is missing");
    return;
  }
  expect(got.sizes() == want.sizes(), what + ": shape " + c10::str(got.sizes()) + " vs " + c10::str(want.sizes()));
  if (got.sizes() != want.sizes() || got.numel() == 0) return;
  const double err = (got.to(at::kDouble) - want).abs().max().item<double>();
  const double scale = std::max(1.0, want.abs().max().item<double>());
  expect(err <= tol * scale, what + ": off by " + std::to_string(err) + " (tol " + std::to_string(tol * scale) + ")");
}

// [B, Hs*Ws, D] -> [B, Hl*Wl, k*k*D] (DESIGN.md section 2) and back.
at::Tensor group(const at::Tensor& t, int64_t hs, int64_t ws, int64_t k) {
  const int64_t B = t.size(0), D = t.size(2);
  return t.reshape({B, hs / k, k, ws / k, k, D})
      .permute({0, 1, 3, 2, 4, 5})
      .reshape({B, (hs / k) * (ws / k), k * k * D});
}

at::Tensor ungroup(const at::Tensor& t, int64_t hs, int64_t ws, int64_t k) {
  const int64_t B = t.size(0), D = t.size(2) / (k * k);
  return t.reshape({B, hs / k, ws / k, k, k, D}).permute({0, 1, 3, 2, 4, 5}).reshape({B, hs * ws, D});
}

struct Case {
  int64_t B, C, H, W, p, k, D;
  bool decompress;
  std::string name() const {
    return "B=" + std::to_string(B) + " C=" + std::to_string(C) + " " + std::to_string(H) + "x" + std::to_string(W) +
           " p=" + std::to_string(p) + " k=" + std::to_string(k) + " D=" + std::to_string(D) +
           (decompress ? "" : " no-decompress");
  }
};

void run_case(const Case& c, at::ScalarType dtype, double tol) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t KD = c.k * c.k * c.D, hs = c.H / c.p, ws = c.W / c.p;
  const at::Tensor x = at::randn({c.B, c.C, c.H, c.W}, f64).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor pw = at::randn({c.D, c.C, c.p, c.p}, f64) / std::sqrt(double(c.C * c.p * c.p));
  const at::Tensor pb = at::randn({c.D}, f64), cw = at::randn({c.D, KD}, f64) / std::sqrt(double(KD));
  const at::Tensor cb = at::randn({c.D}, f64), db = at::randn({KD}, f64);
  const at::Tensor dw = at::randn({KD, c.D}, f64) / std::sqrt(double(c.D));
  std::optional<at::Tensor> odw, odb;
  if (c.decompress) odw = dw.to(dtype), odb = db.to(dtype);
  auto [S, L, R] = mcl::mcl_embed(x.to(dtype), pw.to(dtype), pb.to(dtype), cw.to(dtype), cb.to(dtype), odw, odb, c.k);

  // The math, in float64 from the same rounded inputs.
  auto up = [&](const at::Tensor& t) { return t.to(dtype).to(at::kDouble); };
  const at::Tensor xs = up(x), pws = up(pw), cws = up(cw), dws = up(dw);
  const at::Tensor s_ref = at::conv2d(xs, pws, up(pb), {c.p, c.p}).flatten(2).transpose(1, 2);
  const at::Tensor g_ref = group(s_ref, hs, ws, c.k);
  const at::Tensor l_ref = at::linear(g_ref, cws, up(cb));
  expect_close(c.name() + " S", S, s_ref, tol);
  expect_close(c.name() + " L", L, l_ref, tol);
  expect(R.has_value() == c.decompress, c.name() + ": R present iff decompression");
  if (c.decompress) expect_close(c.name() + " R", *R, ungroup(at::linear(l_ref, dws, up(db)), hs, ws, c.k), tol);

  // Backward: the explicit gradient formulas (mcl_kernels/reference.py), from the kernel's own S and L.
  const at::Tensor gS = at::randn_like(s_ref), gL = at::randn_like(l_ref), gR = at::randn_like(s_ref);
  std::optional<at::Tensor> ogR;
  if (c.decompress) ogR = gR.to(dtype);
  const std::vector<bool> needs{true, true, true, true, true, c.decompress, c.decompress};
  const auto grads = mcl::mcl_embed_backward(gS.to(dtype), gL.to(dtype), ogR, x.to(dtype), pw.to(dtype),
                                             pb.to(dtype), cw.to(dtype), cb.to(dtype), odw, odb, S, L, c.k, needs);
  const at::Tensor Sd = S.to(at::kDouble), Ld = L.to(at::kDouble), gSd = up(gS), gLd = up(gL), gRd = up(gR);
  at::Tensor g_l = gLd;
  if (c.decompress) {
    const at::Tensor g_rg = group(gRd, hs, ws, c.k).reshape({-1, KD});
    expect_close(c.name() + " grad decomp_w", *grads[5], g_rg.t().mm(Ld.reshape({-1, c.D})), tol);
    expect_close(c.name() + " grad decomp_b", *grads[6], g_rg.sum(0), tol);
    g_l = g_l + g_rg.mm(dws).reshape(g_l.sizes());
  }
  const at::Tensor g_l2 = g_l.reshape({-1, c.D});
  expect_close(c.name() + " grad comp_w", *grads[3], g_l2.t().mm(group(Sd, hs, ws, c.k).reshape({-1, KD})), tol);
  expect_close(c.name() + " grad comp_b", *grads[4], g_l2.sum(0), tol);
  const at::Tensor g_s = (gSd + ungroup(g_l.matmul(cws), hs, ws, c.k)).reshape({-1, c.D});
  const at::Tensor patches =
      xs.reshape({c.B, c.C, hs, c.p, ws, c.p}).permute({0, 2, 4, 1, 3, 5}).reshape({-1, c.C * c.p * c.p});
  expect_close(c.name() + " grad proj_w", *grads[1], g_s.t().mm(patches).reshape(pw.sizes()), tol);
  expect_close(c.name() + " grad proj_b", *grads[2], g_s.sum(0), tol);
  const at::Tensor gx = g_s.mm(pws.reshape({c.D, -1})).reshape({c.B, hs, ws, c.C, c.p, c.p})
                            .permute({0, 3, 1, 4, 2, 5}).reshape(x.sizes());
  expect_close(c.name() + " grad x", *grads[0], gx, tol);

  // mcl_compress: the same level from the tokens S.
  auto [L2, R2] = mcl::mcl_compress(S, cw.to(dtype), cb.to(dtype), odw, odb, hs, ws, c.k);
  expect_close(c.name() + " compress L", L2, at::linear(group(Sd, hs, ws, c.k), cws, up(cb)), tol);
}

void expect_throws(const std::string& what, const std::string& needle, const std::function<void()>& fn) {
  try {
    fn();
    expect(false, what + ": no error raised");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    expect(msg.find(needle) != std::string::npos, what + ": message lacks '" + needle + "': " + msg);
  }
}

void bad_inputs() {
  const at::Tensor x = at::randn({2, 3, 16, 24}), pw = at::randn({20, 3, 4, 4}), cw = at::randn({20, 80});
  expect_throws("image not a multiple of the large patch", "16x20", [&] {
    mcl::mcl_embed(at::randn({2, 3, 16, 20}), pw, {}, cw, {}, {}, {}, 2);
  });
  expect_throws("compress weight", "[20, 80]", [&] { mcl::mcl_embed(x, pw, {}, at::randn({20, 40}), {}, {}, {}, 2); });
  expect_throws("dtype", "Double", [&] { mcl::mcl_embed(x, pw.to(at::kDouble), {}, cw, {}, {}, {}, 2); });
  expect_throws("needs", "7 flags", [&] {
    mcl::mcl_embed_backward({}, {}, {}, x, pw, {}, cw, {}, {}, {}, at::zeros({2, 24, 20}), at::zeros({2, 6, 20}), 2,
                            {true});
  });
  expect_throws("token grid", "4x6", [&] { mcl::mcl_compress(at::randn({2, 23, 20}), cw, {}, {}, {}, 4, 6, 2); });
}

}  // namespace

int main() {
  at::manual_seed(0);
  const std::vector<Case> cases{{2, 3, 16, 24, 4, 2, 20, true}, {1, 2, 12, 18, 2, 3, 16, true},
                                {3, 1, 24, 12, 3, 2, 40, false}, {12, 1, 64, 16, 2, 2, 8, true}};
  for (const Case& c : cases) {
    const std::vector<std::pair<at::ScalarType, double>> dtypes{{at::kDouble, 1e-10}, {at::kFloat, 2e-4}};
    for (const auto& [dtype, tol] : dtypes) {
      try {
        run_case(c, dtype, tol);
      } catch (const c10::Error& e) {
        expect(false, c.name() + ": threw " + e.what_without_backtrace());
      }
    }
  }
  bad_inputs();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
