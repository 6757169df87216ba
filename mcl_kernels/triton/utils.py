"""Helpers shared by the Triton kernels: implicit-im2col addressing, the launch wrapper torch.compile can
see through, the fp32 dot precision that follows PyTorch's matmul setting, and the dtype flags (with the
interpreter's bf16 work-arounds) every MCL kernel passes."""
from typing import Optional

import torch
import triton
import triton.language as tl


def _wrap_triton():
    """``torch.library.wrap_triton`` (or its older name) so torch.compile can trace the launch; else None."""
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None:
        try:
            from torch._library.triton import capture_triton as wrap
        except ImportError:
            return None
    return wrap


_WRAP = _wrap_triton()


def launch(kernel):
    """The kernel, indexed with a grid as usual: wrapped for torch.compile while Dynamo traces (where this torch
    can), the plain kernel otherwise. Not wrapped in eager: torch's wrapper then dispatches every launch through a
    higher-order op (host overhead per launch), and for an autotuner with ``early_config_prune`` it builds a
    fresh autotuner on each call, i.e. re-tunes every launch (measured on an H100 with torch 2.11: the fused
    forward took 382 ms instead of milliseconds)."""
    if _WRAP is not None and torch.compiler.is_compiling():
        return _WRAP(kernel)
    return kernel


def _assume_constant(fn):
    # Dynamo cannot put the str that get_float32_matmul_precision returns into a graph (torch 2.11: "torch.* op
    # returned non-Tensor", a break under fullgraph): read once while tracing, as a constant of the graph.
    mark = getattr(torch.compiler, "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_assume_constant
def _fp32_matmul_precision() -> str:
    return torch.get_float32_matmul_precision()


def input_precision(dtype: torch.dtype) -> Optional[str]:
    """``tl.dot``'s input precision: fp32 follows PyTorch's matmul setting (exact fp32 unless the user
    allowed TF32; off by default); bf16/fp16 keep Triton's default (the setting only concerns fp32)."""
    if dtype != torch.float32:
        return None
    return "ieee" if _fp32_matmul_precision() == "highest" else "tf32"


def dot_flags(dtype: torch.dtype, out_dtype: torch.dtype, on_gpu: bool) -> dict:
    """The dtype constexprs of a kernel whose ``tl.dot`` operands are ``dtype`` and whose output is ``out_dtype``:
    ``ACC_DTYPE`` (fp32; fp64 for float64), ``INPUT_PRECISION``, ``DOT_IN_FP32`` and ``BF16_RTNE``.

    Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton-lang/triton#11584):
    there the tiles go through the dot as fp32 (exact for bf16 values, fp32-accumulated like the GPU's bf16 dot),
    and the fp32 -> bf16 cast, which it truncates, is rounded to nearest even on the bits (:func:`round_to`)."""
    dot_in_fp32 = not on_gpu and dtype == torch.bfloat16
    return dict(ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
                INPUT_PRECISION="ieee" if dot_in_fp32 else input_precision(dtype), DOT_IN_FP32=dot_in_fp32,
                BF16_RTNE=not on_gpu and out_dtype == torch.bfloat16)


@triton.jit
def patch_offsets(offs_k, P: tl.constexpr, s_c, s_h, s_w):
    """Memory offsets of patch-matrix columns ``offs_k`` (pixel ``(c, a, b)`` of a P×P patch, flattened like
    ``weight.reshape(D, C·P·P)``) in a tensor with channel/row/column strides ``s_c, s_h, s_w``: the same
    helper addresses the image (implicit im2col) and the patch-embedding weight."""
    c = offs_k // (P * P)
    r = offs_k % (P * P)
    return c * s_c + (r // P) * s_h + (r % P) * s_w


@triton.jit
def round_to(v, out_ty: tl.constexpr, BF16_RTNE: tl.constexpr):
    """``v`` (fp32/fp64 accumulator) rounded to the output dtype, to nearest even like PyTorch and the GPU.
    Triton's interpreter truncates fp32 -> bf16 casts (drops the low mantissa bits): there (``BF16_RTNE``)
    the rounding is done on the bits. Finite values only, which is all these kernels produce."""
    if BF16_RTNE:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ty)
