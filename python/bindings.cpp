// pybind11 module mcl_kernels._C: the Python face of the native kernels (built by setup.py only; the
// CMake build links the kernels without Python). Argument validation lives in csrc/, not here.
#include <torch/csrc/utils/pybind.h>

#include "cpu/patch_gemm.h"
#include "cpu/phases.h"
#include "cpu/tile_gemm.h"
#include "embed_tokens.h"
#include "mcl_embed.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of mcl_kernels (C++ on the CPU, CUDA C++ when built with CUDA).";
  m.def("embed_tokens", &mcl::embed_tokens, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("cls_token"), py::arg("pos_embed"), py::arg("patch"), py::arg("packed_weight") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Inference patch embedding written straight into its output.

x [B, C, H, W] (any strides), weight [D, C, P, P] with P == patch, bias [D] or None, cls_token [D] or
[1, 1, D] or None, pos_embed [T, D] or [1, T, D] or None, all of x's dtype and device.
Returns [B, T, D] (contiguous, x.dtype) with T = (1 if cls_token else 0) + (H/P)*(W/P): the class token
(+ pos[0]) in row 0, then conv2d(x, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos[t0:].
packed_weight: None, or embed_tokens_pack(weight): the CPU kernels then skip packing the weight where the blob
holds it unchanged for this call's path (embed_tokens_cpu_uses_packed), and pack it as usual otherwise.)doc");
  m.def("embed_tokens_pack", &mcl::embed_tokens_pack, py::arg("weight"), py::call_guard<py::gil_scoped_release>(),
        R"doc(The CPU weight [D, C, P, P] packed once for embed_tokens' CPU kernels (the layout a contiguous image of
its dtype is read with on this CPU): a 1-D uint8 tensor, empty where that path packs nothing or the weight is an
inference tensor (no version counter to tell a change by). Valid while the weight is unchanged: an in-place change
moves its version counter on and the blob is no longer used; a change through weight.data does not, so pack again
after one.)doc");
  m.def("embed_tokens_cpu_uses_packed", &mcl::embed_tokens_cpu_uses_packed, py::arg("x"), py::arg("weight"),
        py::arg("packed_weight"),
        "Whether embed_tokens on the CPU reads the weight from packed_weight for images x instead of packing it.");
  m.def("mcl_embed", &mcl::mcl_embed, py::arg("x"), py::arg("proj_w"), py::arg("proj_b"), py::arg("comp_w"),
        py::arg("comp_b"), py::arg("decomp_w"), py::arg("decomp_b"), py::arg("k"),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(MCL training embedding, fused over tiles (CPU).

x [B, C, H, W] (any strides), proj_w [D, C, p, p], proj_b [D] or None, comp_w [D, k*k*D], comp_b [D] or None,
decomp_w [k*k*D, D] or None (any strides: tied decompression is comp_w.t()), decomp_b [k*k*D] or None.
Returns (S [B, Hs*Ws, D], L [B, Hl*Wl, D], R [B, Hs*Ws, D] or None), contiguous, x.dtype (DESIGN.md section 2).)doc");
  m.def("mcl_embed_backward", &mcl::mcl_embed_backward, py::arg("g_small"), py::arg("g_large"), py::arg("g_recon"),
        py::arg("x"), py::arg("proj_w"), py::arg("proj_b"), py::arg("comp_w"), py::arg("comp_b"),
        py::arg("decomp_w"), py::arg("decomp_b"), py::arg("small"), py::arg("large"), py::arg("k"),
        py::arg("needs"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Gradients of mcl_embed for (x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b).

g_small / g_large / g_recon: upstream gradients of S, L, R (None counts as zeros); small, large: the forward's S
and L; needs: 7 flags. Returns a list of 7 tensors, None where not needed or where the input is None.
Bitwise reproducible for a given torch.get_num_threads().)doc");
  m.def("mcl_compress", &mcl::mcl_compress, py::arg("tokens"), py::arg("comp_w"), py::arg("comp_b"),
        py::arg("decomp_w"), py::arg("decomp_b"), py::arg("grid_h"), py::arg("grid_w"), py::arg("k"),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(One token-level compression: tokens [B, grid_h*grid_w, D] -> (L [B, (grid_h/k)*(grid_w/k), D],
R [B, grid_h*grid_w, D] or None).)doc");
  m.def("mcl_compress_backward", &mcl::mcl_compress_backward, py::arg("g_large"), py::arg("g_recon"),
        py::arg("tokens"), py::arg("comp_w"), py::arg("comp_b"), py::arg("decomp_w"), py::arg("decomp_b"),
        py::arg("large"), py::arg("grid_h"), py::arg("grid_w"), py::arg("k"), py::arg("needs"),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Gradients of mcl_compress for (tokens, comp_w, comp_b, decomp_w, decomp_b); needs: 5 flags.)doc");
  m.def("embed_tokens_cpu_direct", &mcl::embed_tokens_cpu_direct, py::arg("x"), py::arg("patch"),
        R"doc(Whether embed_tokens on the CPU reads x's pixels directly (AVX-512 or AVX2 micro-kernels) rather than
through a patch matrix and brgemm: float32 on a CPU with AVX2 and FMA (or AVX-512F), or bfloat16 with an even patch
on one with AVX512-BF16 (and patch_gemm_isa() "avx512"); unit W stride only.)doc");
  m.def("embed_tokens_cpu_by_panels", &mcl::embed_tokens_cpu_by_panels, py::arg("x"), py::arg("width"),
        py::arg("patch"),
        "Whether the CPU embed_tokens' direct path splits the weight's panels over the threads (small batches, panels "
        "dividing evenly over torch's thread count) instead of the patches; both give bitwise the same result.");
  m.def("embed_tokens_cpu_widened", &mcl::embed_tokens_cpu_widened, py::arg("x"), py::arg("patch"),
        "Whether the CPU embed_tokens runs bf16 x through the fp32 direct kernels on widened copies of each tile's "
        "images (unit W stride, a CPU whose patch kernels run fp32 only: AVX2).");
  m.def("embed_tokens_cpu_amx", &mcl::embed_tokens_cpu_amx, py::arg("x"), py::arg("patch"),
        "Whether the CPU embed_tokens runs x on the AMX tile kernels (bf16, unit W stride, patch a multiple of 16, "
        "a CPU with AMX-BF16).");
  m.def(
      "patch_gemm_isa", [] { return std::string(mcl::cpu::patch_gemm::isa_name(mcl::cpu::patch_gemm::isa())); },
      R"doc(The instruction set the CPU's direct patch kernels (cpu/patch_gemm.h) run with: "avx512", "avx2" or "none"
(then the patch-matrix path runs instead). Under "avx2" the tile GEMMs run on cpu/gemm_avx2.h's kernel too, else on
oneDNN's brgemm.)doc");
  m.def(
      "patch_gemm_best_isa",
      [] { return std::string(mcl::cpu::patch_gemm::isa_name(mcl::cpu::patch_gemm::detected_isa())); },
      R"doc(The widest instruction set this CPU gives the direct patch kernels: "avx512", "avx2" or "none", whatever
set_patch_gemm_isa chose since.)doc");
  m.def(
      "set_patch_gemm_isa",
      [](const std::string& name) {
        namespace pg = mcl::cpu::patch_gemm;
        const pg::Isa all[] = {pg::Isa::kNone, pg::Isa::kAvx2, pg::Isa::kAvx512};
        for (const pg::Isa isa : all) {
          if (name == pg::isa_name(isa)) return pg::set_isa(isa);
        }
        TORCH_CHECK(false, "set_patch_gemm_isa: expected \"avx512\", \"avx2\" or \"none\", got \"", name, "\"");
      },
      py::arg("isa"),
      R"doc(Run the direct patch kernels with a lesser instruction set than the CPU's best ("avx2" on an AVX-512 CPU,
"none" for the patch-matrix path), or back with the best; raises where the CPU lacks it. For tests and benchmarks:
process-wide, not thread-safe against running kernels. Both ISAs' patch kernels give bitwise the same results; the
tile GEMMs (brgemm, or gemm_avx2 under "avx2") sum in different orders.)doc");
  m.def("cpu_tile_gemm", &mcl::cpu::tile_gemm, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("add"),
        R"doc(c + a @ b (add) or a @ b through the CPU kernels' single-threaded tile GEMM (cpu/tile_gemm.h: on AVX2 CPUs
cpu/gemm_avx2.h's kernel, else oneDNN's brgemm), for tests: a [M, K] and b [K, N] float32 or bfloat16 with unit
column stride, c float32 [M, N]; the result is a new float32 tensor.)doc");
  m.def("cpu_phases_enable", &mcl::cpu::phases::set_enabled, py::arg("on"),
        R"doc(Switch the per-phase timers of the CPU training kernels (mcl_embed, mcl_compress) on or off (off at import).
While on, every phase adds its duration, summed over threads, to a counter: see cpu_phases_take and
benchmarks/cpu_phases.py.)doc");
  m.def("cpu_phases_take", &mcl::cpu::phases::take,
        R"doc(The per-phase counters as a list of (phase name, seconds summed over threads), phases with no time left out;
then zeroes them. Names starting "bwd.wall." are wall-clock times of one thread, the rest thread time.)doc");
  m.attr("built_with_cuda") = py::bool_(mcl::built_with_cuda());
}
