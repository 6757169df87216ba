// C++ tests of mcl::embed_tokens against at::conv2d + cat + add, with a dependency-free harness:
// each failed expectation prints where and by how much, and the exit status is the failure count.
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "embed_tokens.h"

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

struct Case {
  int64_t B, C, H, W, D, P;
  bool bias, cls, pos, pos3d;
  at::ScalarType dtype;
  std::string layout;  // "contiguous", "channels_last" or "sliced"

  std::string name() const {
    return "B=" + std::to_string(B) + " C=" + std::to_string(C) + " " + std::to_string(H) + "x" +
           std::to_string(W) + " D=" + std::to_string(D) + " P=" + std::to_string(P) + (bias ? " +bias" : "") +
           (cls ? " +cls" : "") + (pos ? (pos3d ? " +pos[1,T,D]" : " +pos[T,D]") : "") + " " +
           c10::toString(dtype) + " " + layout;
  }
};

// The definition: conv2d, flatten to tokens, prepend the class token, add the position embedding.
at::Tensor reference(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                     const std::optional<at::Tensor>& cls, const std::optional<at::Tensor>& pos, int64_t P) {
  at::Tensor tok = at::conv2d(x, w, b, {P, P}).flatten(2).transpose(1, 2);
  const int64_t B = x.size(0), D = w.size(0);
  if (cls) tok = at::cat({cls->reshape({1, 1, D}).expand({B, 1, D}), tok}, 1);
  if (pos) tok = tok + pos->reshape({1, -1, D});
  return tok;
}

void run_case(const Case& c) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t N = (c.H / c.P) * (c.W / c.P), T = N + (c.cls ? 1 : 0), K = c.C * c.P * c.P;
  at::Tensor x = at::randn({c.B, c.C, c.H, c.W}, f64);
  if (c.layout == "channels_last") {
    x = x.contiguous(at::MemoryFormat::ChannelsLast);
  } else if (c.layout == "sliced") {  // every other column of a twice-as-wide image
    x = at::randn({c.B, c.C, c.H, 2 * c.W}, f64).slice(3, 0, 2 * c.W, 2);
  }
  const at::Tensor w = at::randn({c.D, c.C, c.P, c.P}, f64) / std::sqrt(static_cast<double>(K));
  std::optional<at::Tensor> b, cls, pos;
  if (c.bias) b = at::randn({c.D}, f64);
  if (c.cls) cls = at::randn({1, 1, c.D}, f64);
  if (c.pos) pos = c.pos3d ? at::randn({1, T, c.D}, f64) : at::randn({T, c.D}, f64);

  auto cast = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t) return std::nullopt;
    return t->to(c.dtype);
  };
  const at::Tensor xl = x.to(c.dtype);  // keeps x's strides (preserve_format)
  const at::Tensor wl = w.to(c.dtype);
  const at::Tensor out = mcl::embed_tokens(xl, wl, cast(b), cast(cls), cast(pos), c.P);
  // The weight packed ahead: bitwise the same tokens, read from the blob wherever the call's kernel packs at all.
  const at::Tensor blob = mcl::embed_tokens_pack(wl);
  const at::Tensor with_blob = mcl::embed_tokens(xl, wl, cast(b), cast(cls), cast(pos), c.P, blob);
  expect(at::equal(with_blob, out), c.name() + ": tokens with the packed weight differ from packing per call");
  expect(mcl::embed_tokens_cpu_uses_packed(xl, wl, blob) == (blob.numel() > 0 && xl.stride(3) == 1),
         c.name() + ": the blob is " + (mcl::embed_tokens_cpu_uses_packed(xl, wl, blob) ? "" : "not ") +
         "used (blob of " + std::to_string(blob.numel()) + " bytes)");
  // Reference in float64 from the same rounded inputs.
  auto up = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t) return std::nullopt;
    return t->to(at::kDouble);
  };
  const at::Tensor ref = reference(xl.to(at::kDouble), w.to(c.dtype).to(at::kDouble), up(cast(b)),
                                   up(cast(cls)), up(cast(pos)), c.P);

  expect(out.sizes() == at::IntArrayRef({c.B, T, c.D}), c.name() + ": output shape " +
         c10::str(out.sizes()) + ", expected " + c10::str(ref.sizes()));
  expect(out.scalar_type() == c.dtype, c.name() + ": output dtype " + c10::toString(out.scalar_type()));
  expect(out.is_contiguous(), c.name() + ": output is not contiguous");
  if (out.sizes() != ref.sizes() || out.numel() == 0) return;
  const double tol = c.dtype == at::kFloat ? 1e-4 : c.dtype == at::kDouble ? 1e-10 : 5e-2;
  const at::Tensor err = (out.to(at::kDouble) - ref).abs() - tol * ref.abs();
  const double worst = err.max().item<double>();
  expect(worst <= tol, c.name() + ": off by " + std::to_string(worst + tol) + " at flat index " +
         std::to_string(err.argmax().item<int64_t>()) + " (atol " + std::to_string(tol) + ")");
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
  const at::Tensor x = at::randn({2, 3, 64, 96});
  const at::Tensor w = at::randn({40, 3, 32, 32});
  const at::Tensor b = at::randn({40});
  expect_throws("H not a multiple of P", "50x96", [&] { mcl::embed_tokens(at::randn({2, 3, 50, 96}), w, b, {}, {}, 32); });
  expect_throws("rank-3 image", "[3, 64, 96]", [&] { mcl::embed_tokens(at::randn({3, 64, 96}), w, b, {}, {}, 32); });
  expect_throws("channel mismatch", "[2, 4, 64, 96]", [&] { mcl::embed_tokens(at::randn({2, 4, 64, 96}), w, b, {}, {}, 32); });
  expect_throws("patch mismatch", "[40, 3, 32, 32]", [&] { mcl::embed_tokens(x, w, b, {}, {}, 16); });
  expect_throws("bias size", "[41]", [&] { mcl::embed_tokens(x, w, at::randn({41}), {}, {}, 32); });
  expect_throws("cls size", "[1, 1, 39]", [&] { mcl::embed_tokens(x, w, b, at::randn({1, 1, 39}), {}, 32); });
  expect_throws("pos without cls row", "[7, 40]", [&] { mcl::embed_tokens(x, w, b, {}, at::randn({7, 40}), 32); });
  expect_throws("pos size", "[1, 7, 40]", [&] { mcl::embed_tokens(x, w, b, at::randn({40}), at::randn({1, 6, 40}), 32); });
  expect_throws("weight dtype", "Double", [&] { mcl::embed_tokens(x, w.to(at::kDouble), b, {}, {}, 32); });
  expect_throws("bias dtype", "BFloat16", [&] { mcl::embed_tokens(x, w, b.to(at::kBFloat16), {}, {}, 32); });
  expect_throws("integer image", "Int", [&] { mcl::embed_tokens(x.to(at::kInt), w, b, {}, {}, 32); });
  expect_throws("meta tensors", "meta", [&] { mcl::embed_tokens(x.to(at::kMeta), w.to(at::kMeta), {}, {}, {}, 32); });
  expect_throws("packed weight of floats", "1-D uint8 CPU tensor", [&] { mcl::embed_tokens(x, w, b, {}, {}, 32, w); });
  expect_throws("pack a rank-3 weight", "got shape [3, 32, 32]", [&] { mcl::embed_tokens_pack(w[0]); });
}

}  // namespace

int main() {
  at::manual_seed(0);
  std::vector<Case> cases;
  for (int64_t B : {0, 1, 3}) {
    for (const char* layout : {"contiguous", "channels_last", "sliced"}) {
      cases.push_back({B, 3, 64, 96, 40, 32, true, true, true, false, at::kFloat, layout});
    }
  }
  for (int mask = 0; mask < 8; ++mask) {  // every combination of bias, cls, pos
    cases.push_back({2, 2, 12, 20, 7, 4, bool(mask & 1), bool(mask & 2), bool(mask & 4), true, at::kFloat, "contiguous"});
  }
  for (at::ScalarType dt : {at::kBFloat16, at::kHalf, at::kDouble}) {
    cases.push_back({3, 3, 64, 32, 40, 16, true, true, true, true, dt, "contiguous"});
    cases.push_back({1, 3, 32, 48, 24, 16, false, true, true, false, dt, "channels_last"});
  }
  for (const Case& c : cases) {
    try {
      run_case(c);
    } catch (const c10::Error& e) {
      expect(false, c.name() + ": threw " + e.what_without_backtrace());
    }
  }
  bad_inputs();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
