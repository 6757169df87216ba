// pybind11 module mcl_kernels._C: the Python face of the native kernels (built by setup.py only; the
// CMake build links the kernels without Python). Argument validation lives in csrc/, not here.
#include <torch/csrc/utils/pybind.h>

#include "embed_tokens.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of mcl_kernels (C++ on the CPU, CUDA C++ when built with CUDA).";
  m.def("embed_tokens", &mcl::embed_tokens, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("cls_token"), py::arg("pos_embed"), py::arg("patch"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Inference patch embedding written straight into its output.

x [B, C, H, W] (any strides), weight [D, C, P, P] with P == patch, bias [D] or None, cls_token [D] or
[1, 1, D] or None, pos_embed [T, D] or [1, T, D] or None, all of x's dtype and device.
Returns [B, T, D] (contiguous, x.dtype) with T = (1 if cls_token else 0) + (H/P)*(W/P): the class token
(+ pos[0]) in row 0, then conv2d(x, weight, bias, stride=P).flatten(2).transpose(1, 2) + pos[t0:].)doc");
  m.attr("built_with_cuda") = py::bool_(mcl::built_with_cuda());
}
