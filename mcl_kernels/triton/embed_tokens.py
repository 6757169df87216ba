"""Inference embedding as one Triton kernel: pixels -> ``[B, T, D]`` tokens with class token and position embedding.

The patch embedding is a GEMM ``[B·N, K] @ [K, D]`` with ``K = C·P·P``. The kernel never builds the
``[B·N, K]`` patch matrix: each K step gathers its pixels straight from ``x`` through ``x``'s strides
(implicit im2col), so contiguous, channels_last and sliced images all run without a copy. The epilogue
adds bias and position embedding in the accumulator (fp32; fp64 for float64 inputs), rounds once to
``x.dtype`` and stores each token at its place in the ``[B, T, D]`` output (row ``b·T + t0 + n``); the
programs that hold a patch 0 also write that image's class-token row, so the whole output comes from one launch.

Contract (backends.py): ``embed_tokens(x, weight, bias, cls_token, pos_embed) -> [B, T, D]``, arguments
already validated by the op layer (`mcl_kernels._checks.check_embed_tokens`). No backward here: the op layer
falls back to the reference's backward, which the math defines independently of this forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import input_precision, launch, patch_offsets


@triton.jit
def _embed_tokens_kernel(
    x_ptr, w_ptr, bias_ptr, cls_ptr, pos_ptr, out_ptr,
    M, D, K, N, T, grid_w,
    sx_b, sx_c, sx_h, sx_w,
    sw_d, sw_c, sw_h, sw_w,
    s_bias, s_cls, s_pos_t, s_pos_d,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr, HAS_POS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: a BLOCK_M (tokens over the flattened B·N rows) x BLOCK_N (D) output tile. The D tiles of
    # one token tile are neighbouring programs, so they run together and share its pixels through L2.
    pid = tl.program_id(0).to(tl.int64)
    num_pid_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # flattened token rows b·N + n
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_d = offs_d < D

    img = offs_m // N
    n = offs_m % N
    gi = n // grid_w
    gj = n % grid_w
    x_row = img * sx_b + (gi * P) * sx_h + (gj * P) * sx_w  # top-left pixel of each patch
    w_row = offs_d * sw_d

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        # Column k of the patch matrix is pixel (c, a, b) of the patch, flattened like weight.reshape(D, K).
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x_col = patch_offsets(offs_k, P, sx_c, sx_h, sx_w)
        w_col = patch_offsets(offs_k, P, sw_c, sw_h, sw_w)
        xt = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + w_col[:, None] + w_row[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        if DOT_IN_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(ACC_DTYPE)[None, :]
    t0 = 1 if HAS_CLS else 0
    if HAS_POS:
        pos = tl.load(pos_ptr + (t0 + n)[:, None] * s_pos_t + offs_d[None, :] * s_pos_d,
                      mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        acc += pos.to(ACC_DTYPE)
    out_row = (img * T + t0 + n) * D
    tl.store(out_ptr + out_row[:, None] + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])

    if HAS_CLS:
        # Row b·T is image b's class token: written by the program holding that image's patch 0.
        cls = tl.load(cls_ptr + offs_d * s_cls, mask=mask_d, other=0.0).to(ACC_DTYPE)
        if HAS_POS:
            cls += tl.load(pos_ptr + offs_d * s_pos_d, mask=mask_d, other=0.0).to(ACC_DTYPE)
        first = mask_m & (n == 0)
        cls_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE) + cls[None, :]
        tl.store(out_ptr + (img * T * D)[:, None] + offs_d[None, :], cls_tile.to(out_ptr.dtype.element_ty),
                 mask=first[:, None] & mask_d[None, :])


# GPUs: a handful of GEMM tilings, tuned once per (D, K) (ViT widths 192..1024, K = 3·32·32 and friends).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
_embed_tokens_autotuned = triton.autotune(configs=_GPU_CONFIGS, key=["D", "K"])(_embed_tokens_kernel)

# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) runs each program in numpy: one small fixed tiling
# keeps it fast, and autotuning there would only time the interpreter.
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


def embed_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
                 pos_embed: Optional[Tensor]) -> Tensor:
    """``x [B, C, H, W]`` (any strides), ``weight [D, C, P, P]``, ``bias [D]``, ``cls_token`` (D elements),
    ``pos_embed [T, D]`` or ``[1, T, D]`` -> contiguous ``[B, T, D]`` in ``x.dtype``, ``T = N (+1 with cls)``."""
    B, C, H, W = x.shape
    D, P = weight.shape[0], weight.shape[-1]
    grid_w = W // P
    N = (H // P) * grid_w
    T = N + (1 if cls_token is not None else 0)
    K = C * P * P
    M = B * N
    out = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    if M == 0:
        return out

    cls = cls_token.reshape(D) if cls_token is not None else None
    pos = pos_embed.reshape(T, D) if pos_embed is not None else None
    dummy = weight  # stands in for absent tensors; never read (HAS_* is False)
    args = (x, weight, bias if bias is not None else dummy, cls if cls is not None else dummy,
            pos if pos is not None else dummy, out,
            M, D, K, N, T, grid_w,
            *x.stride(), *weight.stride(),
            bias.stride(0) if bias is not None else 0,
            cls.stride(0) if cls is not None else 0,
            pos.stride(0) if pos is not None else 0, pos.stride(1) if pos is not None else 0)
    # Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton-lang/triton#11584,
    # "not supported yet"): there the tiles go through the dot as fp32, which is exact for bf16 values and
    # gives the same fp32-accumulated products as the GPU's bf16 dot.
    on_gpu = x.device.type == "cuda"
    dot_in_fp32 = not on_gpu and x.dtype == torch.bfloat16
    flags = dict(P=P, HAS_BIAS=bias is not None, HAS_CLS=cls is not None, HAS_POS=pos is not None,
                 ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
                 INPUT_PRECISION="ieee" if dot_in_fp32 else input_precision(x.dtype), DOT_IN_FP32=dot_in_fp32)

    if on_gpu:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)
        launch(_embed_tokens_autotuned)[grid](*args, **flags)
    else:
        blocks = _INTERPRETER_BLOCKS
        grid = (triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(D, blocks["BLOCK_N"]),)
        launch(_embed_tokens_kernel)[grid](*args, **flags, **blocks)
    return out
