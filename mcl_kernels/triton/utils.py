"""Helpers shared by the Triton kernels: implicit-im2col addressing, the launch wrapper torch.compile can
see through, and the fp32 dot precision that follows PyTorch's matmul setting."""
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
    """The kernel, wrapped for torch.compile where this torch can; indexed with a grid as usual."""
    return _WRAP(kernel) if _WRAP is not None else kernel


def input_precision(dtype: torch.dtype) -> Optional[str]:
    """``tl.dot``'s input precision: fp32 follows PyTorch's matmul setting (exact fp32 unless the user
    allowed TF32; off by default); bf16/fp16 keep Triton's default (the setting only concerns fp32)."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


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
