"""MCL training embedding as one Triton kernel: pixels -> small tokens ``S``, large tokens ``L`` and the
reconstruction ``R`` (DESIGN §2), without the small tokens ever making a round trip through memory.

Each program owns ``BLOCK_L`` large tokens (rows of the flattened ``B·Hl·Wl``). For each of the ``k²``
sub-positions ``(u, v)`` it computes the small-token tile ``S_uv [BLOCK_L, D]`` -- small token
``(i·k+u, j·k+v)`` of every large token ``(i, j)`` it owns -- as an implicit-im2col GEMM against
``proj_w`` (``K = C·p·p``; pixels gathered straight from ``x`` through its strides, so contiguous,
channels_last and sliced images run without a copy), adds the bias, rounds it once to ``x.dtype``,
stores it to ``S`` at row ``b·Hs·Ws + (i·k+u)·Ws + j·k+v`` and, still on chip, accumulates
``L += S_uv @ comp_w[:, uv·D:(uv+1)·D]^T`` (``uv = u·k+v``: the grouping order ``(u·k+v)·D + d``).
Then it adds ``comp_b``, stores ``L`` and, with decompression, computes for each ``uv``
``R_uv = L @ decomp_w[uv·D:(uv+1)·D, :]^T + decomp_b[uv·D:(uv+1)·D]`` and stores it at the rows of ``S_uv``.
``decomp_w`` is read through its strides, so the tied ``comp_w.t()`` view needs no copy.

Accumulation is fp32 (fp64 for float64 inputs). Like the reference, the second and third GEMMs take the
*rounded* ``S`` and ``L`` (what the reference's next op would read back), so low-precision results match
PyTorch's own rounding points.

Contract (backends.py): ``mcl_embed(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k) -> (S, L, R)``,
arguments already validated by the op layer (`mcl_kernels._checks.check_mcl_embed`). The backward is
`mcl_embed_backward.py` (it reads the saved ``S`` and ``L``; the math defines it independently of this forward).

Limitation of this first version: the whole width ``D`` lives on chip (``BLOCK_D = next_power_of_2(D)``:
the ``[BLOCK_L, BLOCK_D]`` accumulators of ``S_uv`` and ``L`` plus a ``[BLOCK_D, BLOCK_D]`` weight tile per
``uv``). That is fine for ViT-Ti/S widths (D ≤ 384); for D ≥ 512 a GPU's register/shared-memory budget
calls for a D-tiled variant (tile L's output columns and recompute or stage ``S_uv`` through shared memory).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import input_precision, launch, patch_offsets, round_to


@triton.jit
def _mcl_embed_kernel(
    x_ptr, pw_ptr, pb_ptr, cw_ptr, cb_ptr, dw_ptr, db_ptr, s_ptr, l_ptr, r_ptr,
    ML, NL, grid_wl, NS, grid_ws, D, K,
    sx_b, sx_c, sx_h, sx_w,
    spw_d, spw_c, spw_h, spw_w,
    s_pb, scw_o, scw_i, s_cb, sdw_o, sdw_i, s_db,
    P: tl.constexpr, KF: tl.constexpr,
    HAS_PB: tl.constexpr, HAS_CB: tl.constexpr, HAS_DEC: tl.constexpr, HAS_DB: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_l = pid * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)  # flattened large-token rows b·NL + n
    mask_l = offs_l < ML
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)  # the whole width (d >= D masked)
    mask_d = offs_d < D
    mask_ld = mask_l[:, None] & mask_d[None, :]
    mask_dd = mask_d[:, None] & mask_d[None, :]

    img = offs_l // NL
    n = offs_l % NL
    li = n // grid_wl
    lj = n % grid_wl
    out_ty = s_ptr.dtype.element_ty

    if HAS_PB:
        pbias = tl.load(pb_ptr + offs_d * s_pb, mask=mask_d, other=0.0).to(ACC_DTYPE)

    large = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC_DTYPE)
    for u in tl.static_range(KF):
        for v in tl.static_range(KF):
            hs = li * KF + u  # small-token grid position of sub-position (u, v)
            ws = lj * KF + v
            x_row = img * sx_b + (hs * P) * sx_h + (ws * P) * sx_w  # top-left pixel of each small patch

            small = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC_DTYPE)
            for k0 in range(0, K, BLOCK_K):
                # Column k of the patch matrix is pixel (c, a, b), flattened like proj_w.reshape(D, K).
                offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                mask_k = offs_k < K
                x_col = patch_offsets(offs_k, P, sx_c, sx_h, sx_w)
                w_col = patch_offsets(offs_k, P, spw_c, spw_h, spw_w)
                xt = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=mask_l[:, None] & mask_k[None, :],
                             other=0.0)
                wt = tl.load(pw_ptr + w_col[:, None] + (offs_d * spw_d)[None, :],
                             mask=mask_k[:, None] & mask_d[None, :], other=0.0)
                if DOT_IN_FP32:
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                small = tl.dot(xt, wt, small, input_precision=INPUT_PRECISION)
            if HAS_PB:
                small += pbias[None, :]
            small_lo = round_to(small, out_ty, BF16_RTNE)  # S as the reference has it: rounded once to x.dtype
            s_row = (img * NS + hs * grid_ws + ws) * D
            tl.store(s_ptr + s_row[:, None] + offs_d[None, :], small_lo, mask=mask_ld)

            # L += S_uv @ comp_w[:, uv·D:(uv+1)·D]^T: operand [d', d] = comp_w[d, uv·D + d'].
            col0 = (u * KF + v) * D
            cwt = tl.load(cw_ptr + (col0 + offs_d)[:, None] * scw_i + (offs_d * scw_o)[None, :], mask=mask_dd,
                          other=0.0)
            if DOT_IN_FP32:
                small_lo = small_lo.to(tl.float32)
                cwt = cwt.to(tl.float32)
            large = tl.dot(small_lo, cwt, large, input_precision=INPUT_PRECISION)

    if HAS_CB:
        large += tl.load(cb_ptr + offs_d * s_cb, mask=mask_d, other=0.0).to(ACC_DTYPE)[None, :]
    large_lo = round_to(large, out_ty, BF16_RTNE)
    tl.store(l_ptr + (offs_l * D)[:, None] + offs_d[None, :], large_lo, mask=mask_ld)

    if HAS_DEC:
        if DOT_IN_FP32:
            large_lo = large_lo.to(tl.float32)
        for u in tl.static_range(KF):
            for v in tl.static_range(KF):
                # R_uv = L @ decomp_w[uv·D:(uv+1)·D, :]^T: operand [d, e] = decomp_w[uv·D + e, d].
                row0 = (u * KF + v) * D
                dwt = tl.load(dw_ptr + (offs_d * sdw_i)[:, None] + (row0 + offs_d)[None, :] * sdw_o, mask=mask_dd,
                              other=0.0)
                if DOT_IN_FP32:
                    dwt = dwt.to(tl.float32)
                recon = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC_DTYPE)
                recon = tl.dot(large_lo, dwt, recon, input_precision=INPUT_PRECISION)
                if HAS_DB:
                    recon += tl.load(db_ptr + (row0 + offs_d) * s_db, mask=mask_d, other=0.0).to(ACC_DTYPE)[None, :]
                hs = li * KF + u
                ws = lj * KF + v
                r_row = (img * NS + hs * grid_ws + ws) * D
                tl.store(r_ptr + r_row[:, None] + offs_d[None, :], round_to(recon, out_ty, BF16_RTNE), mask=mask_ld)


# GPUs: a few tilings of the large-token rows, tuned once per (D, K, k). BLOCK_D and BLOCK_K are fixed by the
# whole-width design; BLOCK_L trades occupancy against the on-chip [BLOCK_L, BLOCK_D] accumulators.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_L": 16, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_L": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_L": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_L": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_L": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_mcl_embed_autotuned = triton.autotune(configs=_GPU_CONFIGS, key=["D", "K", "KF"])(_mcl_embed_kernel)

# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) runs each program in numpy: one small fixed tiling.
_INTERPRETER_BLOCKS = {"BLOCK_L": 16, "BLOCK_K": 32}


def mcl_embed(x: Tensor, proj_w: Tensor, proj_b: Optional[Tensor], comp_w: Tensor, comp_b: Optional[Tensor],
              decomp_w: Optional[Tensor], decomp_b: Optional[Tensor], k: int
              ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``x [B, C, H, W]`` (any strides), ``proj_w [D, C, p, p]``, ``comp_w [D, k²D]``, ``decomp_w [k²D, D]``
    (any strides, e.g. ``comp_w.t()``) -> contiguous ``(S [B, Hs·Ws, D], L [B, Hl·Wl, D], R [B, Hs·Ws, D] or
    None)`` in ``x.dtype``, exactly :func:`mcl_kernels.reference.mcl_embed`."""
    B, C, H, W = x.shape
    D, p = proj_w.shape[0], proj_w.shape[-1]
    k = int(k)
    hs, ws = H // p, W // p
    hl, wl = hs // k, ws // k
    NS, NL = hs * ws, hl * wl
    K = C * p * p
    ML = B * NL
    small = torch.empty((B, NS, D), dtype=x.dtype, device=x.device)
    large = torch.empty((B, NL, D), dtype=x.dtype, device=x.device)
    recon = torch.empty((B, NS, D), dtype=x.dtype, device=x.device) if decomp_w is not None else None
    if ML == 0:
        return small, large, recon

    dummy = comp_w  # stands in for absent tensors; never read (HAS_* is False)
    args = (x, proj_w, proj_b if proj_b is not None else dummy, comp_w, comp_b if comp_b is not None else dummy,
            decomp_w if decomp_w is not None else dummy, decomp_b if decomp_b is not None else dummy,
            small, large, recon if recon is not None else small,
            ML, NL, wl, NS, ws, D, K,
            *x.stride(), *proj_w.stride(),
            proj_b.stride(0) if proj_b is not None else 0,
            comp_w.stride(0), comp_w.stride(1),
            comp_b.stride(0) if comp_b is not None else 0,
            decomp_w.stride(0) if decomp_w is not None else 0, decomp_w.stride(1) if decomp_w is not None else 0,
            decomp_b.stride(0) if decomp_b is not None else 0)
    # Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton-lang/triton#11584):
    # there the tiles go through the dot as fp32, exact for bf16 values, fp32-accumulated like the GPU's bf16 dot.
    # It also truncates fp32 -> bf16 casts, which would compound from S into L into R: there the kernel rounds
    # to nearest even on the bits (BF16_RTNE); a GPU's cast already does.
    on_gpu = x.device.type == "cuda"
    dot_in_fp32 = not on_gpu and x.dtype == torch.bfloat16
    flags = dict(P=p, KF=k, HAS_PB=proj_b is not None, HAS_CB=comp_b is not None, HAS_DEC=decomp_w is not None,
                 HAS_DB=decomp_w is not None and decomp_b is not None,
                 ACC_DTYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
                 INPUT_PRECISION="ieee" if dot_in_fp32 else input_precision(x.dtype), DOT_IN_FP32=dot_in_fp32,
                 BF16_RTNE=dot_in_fp32,
                 BLOCK_D=max(16, triton.next_power_of_2(D)))  # tl.dot needs every dim >= 16

    if on_gpu:
        def grid(meta):
            return (triton.cdiv(ML, meta["BLOCK_L"]),)
        launch(_mcl_embed_autotuned)[grid](*args, **flags)
    else:
        blocks = _INTERPRETER_BLOCKS
        launch(_mcl_embed_kernel)[(triton.cdiv(ML, blocks["BLOCK_L"]),)](*args, **flags, **blocks)
    return small, large, recon
