"""Fused self-attention in Triton (flash-attention 2 style), plain and packed (block-diagonal), forward and backward.

Layout: ``q, k, v [B, H, N, Dh]`` read through their strides (timm's ``qkv(x).reshape(B, N, 3, H, Dh)
.permute(2, 0, 3, 1, 4)`` views run without a copy). Packed: every image's ``N`` rows are segments of lengths
``seqlens`` (MCL: small, large and reconstructed branches of one image) and each attends only to itself; plain
attention is the one-segment case, so one set of kernels serves both.

Block-diagonal without masked work: each segment is tiled by its own row blocks (no block straddles two
segments; the last block of a segment is ragged and masked), and a block's inner loop runs over the keys of
its own segment only, ``[seg_lo, seg_hi)``. Blocks outside the diagonal are never visited, so three segments
(Ns, Nl, Ns) cost ``2·Ns² + Nl²`` score entries, not ``(2·Ns + Nl)²``. Program ``pid`` finds its block with a
short unrolled scan of the segment table (``NUM_SEG + 1`` int32 boundaries, a constexpr count), so any tiling
the autotuner picks maps onto the same table.

Forward (:func:`_attn_fwd_kernel`): one program = ``BLOCK_M`` query rows of one (image, head); online softmax
over ``BLOCK_N`` key tiles in base 2 (``exp2``, scores pre-scaled by ``scale·log2 e``), fp32 accumulator,
output divided once at the end; also stores the row log-sum-exp ``lse`` (natural log, fp32) for the backward.
Key masks: on every key tile, or (``MASK_TAIL_ONLY``, offered to the autotuner next to the same tilings) on the
segment's ragged last tile only; both compute the same values (bitwise, in the interpreter tests).
Backward: ``δ = rowsum(dO ⊙ O)`` (:func:`_attn_bwd_delta_kernel`), then two kernels that recompute the softmax
from ``lse``: :func:`_attn_bwd_dkdv_kernel` (one program per key block, looping over the query blocks of its
segment) and :func:`_attn_bwd_dq_kernel` (one program per query block, looping over the key blocks of its
segment). Every gradient element is owned by one program: no atomics, deterministic.

Offsets: the (image, head) base of every tensor is a 64-bit scalar; indices inside a tile are 32-bit (cheaper
address arithmetic in every load) unless some tensor's in-tile offsets can pass 2^31 (:func:`_offsets_64`,
checked on the host per call), and then 64-bit. The head dim is a compile-time constant (32, 64 or 128 in
practice), so the column masks are known when the kernel compiles. Together with plain attention reading no segment
table (:func:`_segment_block`), these took the forward from 103 to 90 µs at 197 tokens (SDPA: 88), from 16.8
to 15.0 at 50, and packed 197+50+197 from 219 to 191; the backward from 299 to 286 at 197 (an H100, bf16,
batch 256, 6 heads of 64, CUDA-graph replays, before and after in one process).

Low precision: q/k/v tiles enter ``tl.dot`` in their dtype with fp32 accumulation; the softmax probabilities
are rounded to that dtype for the ``P·V`` and ``dS·K`` products (as flash-attention does). In Triton's
interpreter bfloat16 tiles go through the dot as fp32 (triton-lang/triton#11584), probabilities included.

Contracts (backends.py): ``attention(q, k, v, scale) -> (out, lse)``,
``attention_backward(g_out, q, k, v, out, lse, scale, needs) -> (gq, gk, gv)`` and the ``packed_`` forms with
``seqlens`` after ``lse`` / ``v``. Arguments already validated by the op layer (`mcl_kernels._checks`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import input_precision, launch, round_to

LOG2E = math.log2(math.e)
MAX_HEAD_DIM = 128


@triton.jit
def _segment_block(pid, seg_ptr, N, NUM_SEG: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``pid`` -> ``(bh, first row, segment start, segment end)``: programs enumerate, for every
    (image, head) ``bh``, the ``BLOCK``-row blocks that tile each segment separately. One segment (plain
    attention) is ``[0, N)``: no table is read, so no dependent global load delays the program's first tile."""
    if NUM_SEG == 1:
        n_blocks = tl.cdiv(N, BLOCK)
        bh = pid // n_blocks
        start = (pid % n_blocks).to(tl.int32) * BLOCK
        lo = 0
        hi = N
    else:
        n_blocks = 0
        for s in tl.static_range(NUM_SEG):
            n_blocks += tl.cdiv(tl.load(seg_ptr + s + 1) - tl.load(seg_ptr + s), BLOCK)
        bh = pid // n_blocks
        blk = pid % n_blocks
        start = 0
        lo = 0
        hi = 0
        first = 0  # blocks of the segments before s
        for s in tl.static_range(NUM_SEG):
            s_lo = tl.load(seg_ptr + s)
            s_hi = tl.load(seg_ptr + s + 1)
            nb = tl.cdiv(s_hi - s_lo, BLOCK)
            inside = (blk >= first) & (blk < first + nb)
            start = tl.where(inside, s_lo + (blk - first) * BLOCK, start)
            lo = tl.where(inside, s_lo, lo)
            hi = tl.where(inside, s_hi, hi)
            first += nb
    return bh, start, lo, hi


@triton.jit
def _index(x, OFFS64: tl.constexpr):
    """In-tile row/column indices in the width every offset built from them needs: 32-bit (cheaper address
    arithmetic) unless some tensor's in-tile offsets can pass 2^31 (``OFFS64``; per-(image, head) bases are
    64-bit scalars either way)."""
    if OFFS64:
        return x.to(tl.int64)
    else:
        return x.to(tl.int32)


@triton.jit
def _fwd_key_tile(q, k_base, v_base, n0, hi, offs_d, mask_d, sk_n, sk_d, sv_n, sv_d, qk_scale, m_i, l_i, acc,
                  MASK_KEYS: tl.constexpr, OFFS64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                  DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """One step of the forward's online softmax over keys ``[n0, n0 + BLOCK_N)``; keys at or past ``hi`` are
    masked when ``MASK_KEYS`` (a tile that may pass the segment's end), else the tile is known to be full."""
    offs_n = _index(n0 + tl.arange(0, BLOCK_N), OFFS64)
    if MASK_KEYS:
        mask_n = offs_n < hi
        kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d, mask=mask_d[:, None] & mask_n[None, :],
                     other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
    else:
        kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None] * sk_d, mask=mask_d[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=mask_d[None, :], other=0.0)
    if DOT_IN_FP32:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale  # log2-scaled scores
    if MASK_KEYS:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    # The first tile of a segment holds at least one valid key, so m_new is finite from the start.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seg_ptr,
    H, N, HEAD_DIM: tl.constexpr, qk_scale,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_n, so_d,
    NUM_SEG: tl.constexpr, OFFS64: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_TAIL_ONLY: tl.constexpr,
):
    bh, start, lo, hi = _segment_block(tl.program_id(0).to(tl.int64), seg_ptr, N, NUM_SEG, BLOCK_M)
    b = bh // H
    h = bh % H
    offs_m = _index(start + tl.arange(0, BLOCK_M), OFFS64)
    offs_d = _index(tl.arange(0, BLOCK_D), OFFS64)
    mask_m = offs_m < hi
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # Keys of this segment only: the blocks off the diagonal are never loaded. MASK_TAIL_ONLY (an autotuned
    # choice) runs the segment's full key tiles without key masks and masks only its ragged last tile.
    if MASK_TAIL_ONLY:
        hi_full = lo + (hi - lo) // BLOCK_N * BLOCK_N
    else:
        hi_full = lo
    for n0 in range(lo, hi_full, BLOCK_N):
        m_i, l_i, acc = _fwd_key_tile(q, k_base, v_base, n0, hi, offs_d, mask_d, sk_n, sk_d, sv_n, sv_d, qk_scale,
                                      m_i, l_i, acc, False, OFFS64, INPUT_PRECISION, DOT_IN_FP32, BLOCK_N)
    for n0 in range(hi_full, hi, BLOCK_N):
        m_i, l_i, acc = _fwd_key_tile(q, k_base, v_base, n0, hi, offs_d, mask_d, sk_n, sk_d, sv_n, sv_d, qk_scale,
                                      m_i, l_i, acc, True, OFFS64, INPUT_PRECISION, DOT_IN_FP32, BLOCK_N)

    out = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d,
             round_to(out, o_ptr.dtype.element_ty, BF16_RTNE), mask=mask_m[:, None] & mask_d[None, :])
    # lse in natural-log units (the reference's): log2-sum-exp2 / log2(e).
    tl.store(lse_ptr + bh * N + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, g_ptr, delta_ptr, H, N, HEAD_DIM: tl.constexpr,
                           so_b, so_h, so_n, so_d, sg_b, sg_h, sg_n, sg_d,
                           OFFS64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # δ[b, h, n] = Σ_d dO·O, per row (segments do not matter here). One flat grid axis: B·H may pass 65535.
    pid = tl.program_id(0).to(tl.int64)
    row_blk = pid % tl.cdiv(N, BLOCK_M)
    bh = pid // tl.cdiv(N, BLOCK_M)
    b = bh // H
    h = bh % H
    offs_m = _index(row_blk * BLOCK_M + tl.arange(0, BLOCK_M), OFFS64)
    offs_d = _index(tl.arange(0, BLOCK_D), OFFS64)
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d, mask=mask, other=0.0)
    g = tl.load(g_ptr + b * sg_b + h * sg_h + offs_m[:, None] * sg_n + offs_d[None, :] * sg_d, mask=mask, other=0.0)
    tl.store(delta_ptr + bh * N + offs_m, tl.sum(o.to(tl.float32) * g.to(tl.float32), 1), mask=offs_m < N)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seg_ptr,
    H, N, HEAD_DIM: tl.constexpr, qk_scale, scale,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sg_b, sg_h, sg_n, sg_d,
    sdk_b, sdk_h, sdk_n, sdk_d, sdv_b, sdv_h, sdv_n, sdv_d,
    NUM_SEG: tl.constexpr, OFFS64: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_N keys of one (image, head); dK and dV accumulate over the query blocks of their segment.
    bh, start, lo, hi = _segment_block(tl.program_id(0).to(tl.int64), seg_ptr, N, NUM_SEG, BLOCK_N)
    b = bh // H
    h = bh % H
    offs_n = _index(start + tl.arange(0, BLOCK_N), OFFS64)
    offs_d = _index(tl.arange(0, BLOCK_D), OFFS64)
    mask_n = offs_n < hi
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=mask_nd, other=0.0)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=mask_nd, other=0.0)
    if DOT_IN_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = q_ptr + b * sq_b + h * sq_h
    g_base = g_ptr + b * sg_b + h * sg_h

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = _index(m0 + tl.arange(0, BLOCK_M), OFFS64)
        mask_m = offs_m < hi
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d, mask=mask_md, other=0.0)
        do = tl.load(g_base + offs_m[:, None] * sg_n + offs_d[None, :] * sg_d, mask=mask_md, other=0.0)
        if DOT_IN_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
        # P^T [BLOCK_N, BLOCK_M], recomputed from lse; rows outside the segment contribute nothing.
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale - lse2[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)

    tl.store(dk_ptr + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_d,
             round_to(dk * scale, dk_ptr.dtype.element_ty, BF16_RTNE), mask=mask_nd)
    tl.store(dv_ptr + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :] * sdv_d,
             round_to(dv, dv_ptr.dtype.element_ty, BF16_RTNE), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, dq_ptr, seg_ptr,
    H, N, HEAD_DIM: tl.constexpr, qk_scale, scale,
    sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sg_b, sg_h, sg_n, sg_d,
    sdq_b, sdq_h, sdq_n, sdq_d,
    NUM_SEG: tl.constexpr, OFFS64: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_M queries of one (image, head); dQ accumulates over the key blocks of their segment.
    bh, start, lo, hi = _segment_block(tl.program_id(0).to(tl.int64), seg_ptr, N, NUM_SEG, BLOCK_M)
    b = bh // H
    h = bh % H
    offs_m = _index(start + tl.arange(0, BLOCK_M), OFFS64)
    offs_d = _index(tl.arange(0, BLOCK_D), OFFS64)
    mask_m = offs_m < hi
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d, mask=mask_md, other=0.0)
    do = tl.load(g_ptr + b * sg_b + h * sg_h + offs_m[:, None] * sg_n + offs_d[None, :] * sg_d, mask=mask_md, other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(lse_ptr + bh * N + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + bh * N + offs_m, mask=mask_m, other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = _index(n0 + tl.arange(0, BLOCK_N), OFFS64)
        mask_n = offs_n < hi
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d, mask=mask_nd, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d, mask=mask_nd, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # keys past the segment's end (zero-filled tiles) get no weight
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)

    tl.store(dq_ptr + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :] * sdq_d,
             round_to(dq * scale, dq_ptr.dtype.element_ty, BF16_RTNE), mask=mask_md)


# GPUs (H100 first): MCL deploys short sequences (50 tokens at 224/32, 197 at /16; packed training rows
# 2·197 + 50), so the tilings favour one or a few key tiles per segment. Tuned per (N, head dim, segments).
def _configs(pairs, warps_stages, **extra):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **extra}, num_warps=w, num_stages=s)
            for m, n in pairs for w, s in warps_stages]


# 128-wide key tiles: 197 keys in 2 steps instead of 4 (added after the first H100 run: the forward reached 0.63x
# SDPA at 197 tokens with 64-wide ones at most).
# Key masks on the ragged last tile only (MASK_TAIL_ONLY): added without a GPU to measure it (197 keys: 6 full
# 32-wide tiles and one of 5), so the autotuner decides; offered for the tilings that won or came close on the H100.
_FWD_SHORT = ([(64, 64), (128, 64), (64, 32), (128, 32)], [(4, 2), (4, 3), (8, 3)])
_FWD_CONFIGS = (_configs(*_FWD_SHORT, MASK_TAIL_ONLY=False)
                + _configs([(64, 128), (128, 128)], [(4, 2), (8, 2), (8, 3)], MASK_TAIL_ONLY=False)
                + _configs(*_FWD_SHORT, MASK_TAIL_ONLY=True))
_DKDV_CONFIGS = _configs([(32, 64), (32, 128), (64, 64), (16, 64)], [(4, 2), (4, 3), (8, 3)])
_DQ_CONFIGS = _configs([(64, 32), (128, 32), (64, 64), (32, 32)], [(4, 2), (4, 3), (8, 3)])
_attn_fwd_autotuned = triton.autotune(configs=_FWD_CONFIGS, key=["N", "HEAD_DIM", "NUM_SEG"])(_attn_fwd_kernel)
_attn_bwd_dkdv_autotuned = triton.autotune(configs=_DKDV_CONFIGS, key=["N", "HEAD_DIM", "NUM_SEG"])(
    _attn_bwd_dkdv_kernel)
_attn_bwd_dq_autotuned = triton.autotune(configs=_DQ_CONFIGS, key=["N", "HEAD_DIM", "NUM_SEG"])(_attn_bwd_dq_kernel)

# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1): small fixed tiles, so test-sized segments already
# span several (ragged) blocks.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_INTERPRETER_FWD = {"MASK_TAIL_ONLY": True}  # the forward's key-mask choice there (tests run both)
_DELTA_BLOCK_M = 64

_SEGMENT_TABLES: Dict[Tuple[Tuple[int, ...], torch.device], Tensor] = {}


def _segment_table(seqlens: Sequence[int], device: torch.device) -> Tensor:
    """The int32 segment boundaries ``[0, n0, n0 + n1, ...]`` on ``device`` (cached: one upload per packing)."""
    key = (tuple(int(n) for n in seqlens), device)
    table = _SEGMENT_TABLES.get(key)
    if table is None:
        bounds = [0]
        for n in key[0]:
            bounds.append(bounds[-1] + n)
        table = torch.tensor(bounds, dtype=torch.int32, device=device)
        _SEGMENT_TABLES[key] = table
    return table


def _n_blocks(seqlens: Sequence[int], block: int) -> int:
    return sum(triton.cdiv(int(n), block) for n in seqlens)


def _check_supported(q: Tensor) -> None:
    if q.dtype == torch.float64:
        raise TypeError("the Triton attention kernels run float32, bfloat16 and float16, got float64; "
                        "use backend='reference' for float64")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernels support head dims up to {MAX_HEAD_DIM}, got "
                         f"{q.shape[-1]}; use backend='reference' (or 'auto') for larger heads")


# The largest row/key tile any launch uses: masked rows past a segment's end still form offsets.
_MAX_BLOCK = max([c.kwargs[b] for c in _FWD_CONFIGS + _DKDV_CONFIGS + _DQ_CONFIGS for b in ("BLOCK_M", "BLOCK_N")]
                 + list(_INTERPRETER_BLOCKS.values()) + [_DELTA_BLOCK_M])


def _block_d(head_dim: int) -> int:
    """The head-dim tile: the head dim padded to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def _offsets_64(*tensors: Tensor) -> bool:
    """Whether some in-tile offset ``row·stride_n + col·stride_d`` (rows up to ``N`` plus one tile, columns up to
    the padded head dim) of a ``[B, H, N, Dh]`` tensor can pass 2^31: then indices are 64-bit (``OFFS64``)."""
    for t in tensors:
        if (t.shape[2] + _MAX_BLOCK) * t.stride(2) + _block_d(t.shape[3]) * t.stride(3) >= 2 ** 31:
            return True
    return False


def _flags(q: Tensor) -> dict:
    # Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton-lang/triton#11584):
    # there tiles go through the dot as fp32, and fp32 -> bf16 casts (which it truncates) round on the bits.
    on_gpu = q.device.type == "cuda"
    dot_in_fp32 = not on_gpu and q.dtype == torch.bfloat16
    return dict(INPUT_PRECISION="ieee" if dot_in_fp32 else input_precision(q.dtype), DOT_IN_FP32=dot_in_fp32,
                BF16_RTNE=dot_in_fp32, BLOCK_D=_block_d(q.shape[-1]))


def _launch(kernel, autotuned, seqlens, block_key, BH, args, flags, interpreter_flags=None):
    """One program per (image·head, block of ``block_key`` rows within a segment)."""
    if BH == 0 or sum(seqlens) == 0:
        return
    if flags.pop("_on_gpu"):
        def grid(meta):
            return (BH * _n_blocks(seqlens, meta[block_key]),)
        launch(autotuned)[grid](*args, **flags)
    else:
        blocks = _INTERPRETER_BLOCKS
        launch(kernel)[(BH * _n_blocks(seqlens, blocks[block_key]),)](*args, **flags, **blocks,
                                                                      **(interpreter_flags or {}))


def packed_attention(q: Tensor, k: Tensor, v: Tensor, seqlens: Sequence[int], scale: float) -> Tuple[Tensor, Tensor]:
    """``q, k, v [B, H, N, Dh]`` (any strides), ``seqlens`` summing to ``N`` -> ``(out [B, H, N, Dh]`` contiguous
    in ``q.dtype``, ``lse [B, H, N]`` fp32``)``: exactly :func:`mcl_kernels.reference.attention_forward`."""
    _check_supported(q)
    B, H, N, Dh = q.shape
    out = torch.empty((B, H, N, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    seg = _segment_table(seqlens, q.device)
    args = (q, k, v, out, lse, seg, H, N, Dh, float(scale) * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride())
    flags = dict(NUM_SEG=len(seqlens), OFFS64=_offsets_64(q, k, v, out), _on_gpu=q.device.type == "cuda",
                 **_flags(q))
    _launch(_attn_fwd_kernel, _attn_fwd_autotuned, seqlens, "BLOCK_M", B * H, args, flags, _INTERPRETER_FWD)
    return out, lse


def packed_attention_backward(g_out: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              seqlens: Sequence[int], scale: float, needs: Sequence[bool]
                              ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(gq, gk, gv)`` (each ``[B, H, N, Dh]`` contiguous in ``q.dtype``, None unless ``needs`` asks)
    of :func:`packed_attention` from ``g_out`` (any strides; None counts as zero), given its ``out`` and ``lse``."""
    _check_supported(q)
    B, H, N, Dh = q.shape
    needs = [bool(n) for n in needs]
    grads = [torch.empty((B, H, N, Dh), dtype=q.dtype, device=q.device) if n else None for n in needs]
    if g_out is None:
        return tuple(None if g is None else g.zero_() for g in grads)
    if B * H == 0 or N == 0 or not any(needs):
        return tuple(grads)
    on_gpu = q.device.type == "cuda"
    flags = _flags(q)
    offs64 = _offsets_64(q, k, v, out, g_out, *(g for g in grads if g is not None))
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    launch(_attn_bwd_delta_kernel)[(triton.cdiv(N, _DELTA_BLOCK_M) * B * H,)](
        out, g_out, delta, H, N, Dh, *out.stride(), *g_out.stride(), OFFS64=offs64, BLOCK_M=_DELTA_BLOCK_M,
        BLOCK_D=flags["BLOCK_D"])
    seg = _segment_table(seqlens, q.device)
    common = (H, N, Dh, float(scale) * LOG2E, float(scale), *q.stride(), *k.stride(), *v.stride(), *g_out.stride())
    gq, gk, gv = grads
    if needs[1] or needs[2]:
        # dK and dV come out of the same pass; a gradient not asked for still needs a buffer to land in.
        dk = gk if gk is not None else torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = gv if gv is not None else torch.empty_like(v, memory_format=torch.contiguous_format)
        args = (q, k, v, g_out, lse, delta, dk, dv, seg, *common, *dk.stride(), *dv.stride())
        _launch(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_autotuned, seqlens, "BLOCK_N", B * H, args,
                dict(NUM_SEG=len(seqlens), OFFS64=offs64, _on_gpu=on_gpu, **flags))
    if needs[0]:
        args = (q, k, v, g_out, lse, delta, gq, seg, *common, *gq.stride())
        _launch(_attn_bwd_dq_kernel, _attn_bwd_dq_autotuned, seqlens, "BLOCK_M", B * H, args,
                dict(NUM_SEG=len(seqlens), OFFS64=offs64, _on_gpu=on_gpu, **flags))
    return gq, gk, gv


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Plain self-attention: the one-segment case of :func:`packed_attention`."""
    return packed_attention(q, k, v, (q.shape[2],), scale)


def attention_backward(g_out: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float, needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of :func:`attention`: the one-segment case of :func:`packed_attention_backward`."""
    return packed_attention_backward(g_out, q, k, v, out, lse, (q.shape[2],), scale, needs)
