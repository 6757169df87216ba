"""One generic Triton GEMM whose operands are addressed in place (gathered), shared by the MCL kernels:
the training embedding's backward (`mcl_embed_backward.py`), the decompression GEMM of its forward
(`mcl_embed.py`) and the token-level compression, forward and backward (`mcl_compress.py`).

:func:`gemm` computes ``C[M, N] (+)= Σ_r A[m, r]·B[r, n]`` (+ ``add``) with one kernel,
:func:`_gemm_kernel`. An operand is a "token" axis and a "feature" axis, and its mode says how each maps to
memory:

- ``PLAIN``: a strided matrix ``[rows, cols]`` (a ``[B, N, D]`` token tensor flattened to ``[B·N, D]``; a
  bias vector broadcast over tokens is the matrix with token stride 0);
- ``GROUPED``: small tokens ``[B, Hs·Ws, D]`` seen as large-token rows ``[B·Hl·Wl, k²D]`` (token ``(i, j)``,
  feature ``(u·k+v)·D + d`` -> small token ``(i·k+u, j·k+v)``, DESIGN §2); as an output this is ``ungroup``;
- ``IM2COL``: the patch matrix ``[B·Hs·Ws, C·p·p]`` of an image ``[B, C, H, W]``, through the image's strides
  (channels_last and sliced images cost no copy); as an output this is ``unpatchify``;
- ``PATCH_W``: a patch-embedding weight ``[D, C, p, p]`` seen as ``[D, C·p·p]``.

Transposes are the same operand with its token axis on the other side of the tile (``tok=1``). So
``group``, ``ungroup``, ``unpatchify`` and im2col never touch memory as separate passes, every tensor is read
where it lies (any strides), and additions (an upstream gradient, a bias) happen in the GEMM epilogue, in
the fp32 accumulator (fp64 for float64), before the one rounding to the output dtype.

Weight gradients reduce over all ``B·N`` tokens; :func:`weight_grad` does that deterministically by
construction: the token rows are cut into ``SPLIT`` fixed contiguous ranges; program ``(tile, s)`` reduces
range ``s`` for one ``[BLOCK_M, BLOCK_N]`` output tile in a fixed order and writes its fp32 partial to its
own slot of a ``[SPLIT, M, N]`` buffer (no atomics, nothing shared between programs); the bias gradients are
the row sums of the same ``A`` tiles, written by the programs of the first column tile to ``[SPLIT, M]``.
Then :func:`_sum_splits_kernel` adds the ``SPLIT`` partials of each element in order ``0..SPLIT-1`` and
rounds once to the parameter dtype. ``SPLIT`` is chosen from the token count, the output tile count and
the GPU's SM count (enough programs to fill the GPU when the output is small, as ``[D, C·p·p]`` is), so
the same inputs on the same GPU model give the same bits. Deterministic mode
(``torch.use_deterministic_algorithms(True)``) also pins the tiling to one fixed config instead of the
autotuner's choice, which could differ between processes (a different ``BLOCK_R`` changes the order of
the additions): results are then bitwise reproducible across runs and processes on one GPU model.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import dot_flags, launch, patch_offsets, round_to

# Operand modes (how a token index and a feature index map to memory; see the module docstring).
PLAIN, GROUPED, IM2COL, PATCH_W = 0, 1, 2, 3


@triton.jit
def _token_offsets(t, MODE: tl.constexpr, s0, s1, s2, s3, NL, WL, NS, WS, KF: tl.constexpr, P: tl.constexpr):
    """Memory offsets of token rows ``t`` (int64) of an operand in ``MODE``."""
    if MODE == 1:  # GROUPED: large token t = (img, i, j) -> its first small token (i·k, j·k) in [B, Ns, D]
        img = t // NL
        n = t % NL
        off = img * s0 + ((n // WL) * WS + n % WL) * KF * s1
    elif MODE == 2:  # IM2COL: small token t = (img, gi, gj) -> the top-left pixel of its patch in [B, C, H, W]
        img = t // NS
        n = t % NS
        off = img * s0 + (n // WS) * P * s2 + (n % WS) * P * s3
    else:  # PLAIN and PATCH_W: a strided row
        off = t * s0
    return off


@triton.jit
def _feature_offsets(f, MODE: tl.constexpr, s0, s1, s2, s3, WS, DW, KF: tl.constexpr, P: tl.constexpr):
    """Memory offsets of feature columns ``f`` (int64) of an operand in ``MODE``, relative to its token row."""
    if MODE == 1:  # GROUPED: feature (u·k + v)·D + d -> small token (u, v) of the group, channel d
        uv = f // DW
        off = ((uv // KF) * WS + uv % KF) * s1 + (f % DW) * s2
    elif MODE == 0:
        off = f * s1
    else:  # IM2COL and PATCH_W: pixel (c, a, b) of a patch, flattened like weight.reshape(D, C·p·p)
        off = patch_offsets(f, P, s1, s2, s3)
    return off


@triton.jit
def tile_offsets(i0, i1, MODE: tl.constexpr, TOK_AXIS: tl.constexpr, s0, s1, s2, s3, NL, WL, NS, WS, DW,
                 KF: tl.constexpr, P: tl.constexpr):
    """2-D offsets of the tile ``(i0, i1)`` of an operand whose token axis is tile axis ``TOK_AXIS``."""
    if TOK_AXIS == 0:
        off = (_token_offsets(i0, MODE, s0, s1, s2, s3, NL, WL, NS, WS, KF, P)[:, None]
               + _feature_offsets(i1, MODE, s0, s1, s2, s3, WS, DW, KF, P)[None, :])
    else:
        off = (_feature_offsets(i0, MODE, s0, s1, s2, s3, WS, DW, KF, P)[:, None]
               + _token_offsets(i1, MODE, s0, s1, s2, s3, NL, WL, NS, WS, KF, P)[None, :])
    return off


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, add_ptr, rsum_ptr,
    M, N, R, ROWS_PER_SPLIT,
    sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3, sd0, sd1, sd2, sd3, s_c_split,
    NL, WL, NS, WS, DW,
    A_MODE: tl.constexpr, A_TOK: tl.constexpr, B_MODE: tl.constexpr, B_TOK: tl.constexpr, C_MODE: tl.constexpr,
    ADD_MODE: tl.constexpr, KF: tl.constexpr, P: tl.constexpr,
    HAS_DOT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_RSUM: tl.constexpr,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Program (tile, split): output tile [BLOCK_M, BLOCK_N], reduced over rows [split·RPS, (split+1)·RPS) ∩ [0, R).
    # The N tiles of one M tile are neighbours, so they run together and share the A rows through L2.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    if HAS_DOT:
        num_pid_n = tl.cdiv(N, BLOCK_N)
    else:
        num_pid_n = 1  # row sums only: one program per M tile, no output columns
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    r_start = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for i in range(0, tl.cdiv(r_end - r_start, BLOCK_R)):
        offs_r = r_start + i * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = offs_r < r_end
        a = tl.load(a_ptr + tile_offsets(offs_m, offs_r, A_MODE, A_TOK, sa0, sa1, sa2, sa3, NL, WL, NS, WS, DW,
                                         KF, P),
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if HAS_RSUM:
            row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)
        if HAS_DOT:
            b = tl.load(b_ptr + tile_offsets(offs_r, offs_n, B_MODE, B_TOK, sb0, sb1, sb2, sb3, NL, WL, NS, WS,
                                             DW, KF, P),
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if DOT_IN_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_RSUM:
        # Row sums of A (bias gradients): one partial per (M tile, split), from the first column tile; the
        # splits s_c_split apart, like C's (weight_grad keeps both in one buffer, summed by one launch).
        tl.store(rsum_ptr + split * s_c_split + offs_m, row_sum, mask=mask_m & (pid_n == 0))
    if HAS_DOT:
        mask_mn = mask_m[:, None] & mask_n[None, :]
        if HAS_ADD:
            acc += tl.load(add_ptr + tile_offsets(offs_m, offs_n, ADD_MODE, 0, sd0, sd1, sd2, sd3, NL, WL, NS, WS,
                                                  DW, KF, P), mask=mask_mn, other=0.0).to(ACC_DTYPE)
        c_off = tile_offsets(offs_m, offs_n, C_MODE, 0, sc0, sc1, sc2, sc3, NL, WL, NS, WS, DW, KF, P)
        tl.store(c_ptr + split * s_c_split + c_off, round_to(acc, c_ptr.dtype.element_ty, BF16_RTNE), mask=mask_mn)


@triton.jit
def _sum_splits_kernel(p_ptr, out_ptr, out2_ptr, numel, first, SPLIT, ACC_DTYPE: tl.constexpr,
                       BF16_RTNE: tl.constexpr, BLOCK: tl.constexpr):
    # The fixed-order end of the weight-gradient reduction: v[e] = Σ_{s = 0..SPLIT-1} partial[s, e], elements
    # [0, first) into out and [first, numel) into out2 (a weight gradient and its bias: one launch for both).
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    ptrs = p_ptr + offs
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel  # pointer arithmetic is 64-bit: no int32 product split·numel
    v = round_to(acc, out_ptr.dtype.element_ty, BF16_RTNE)
    tl.store(out_ptr + offs, v, mask=offs < first)
    tl.store(out2_ptr + (offs - first), v, mask=mask & (offs >= first))


# GPUs: GEMM tilings, tuned once per problem (sizes, rows per split and operand modes). The data GEMMs (forward
# decompression, data gradients) have short reductions (D or k²D) and tall outputs; the weight-gradient ones
# the opposite. A tiling too large for a GPU's shared memory fails to compile and the autotuner skips it.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_R": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_R": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 64}, num_warps=4, num_stages=4),
    # Added after profiling the training embedding's backward on an H100 (bf16, D = 384, B = 256): the tall
    # data GEMMs (gLt, gT, the forward's decompression) picked 128x256 tiles, two weight gradients 64x128.
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_R": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 64}, num_warps=4, num_stages=4),
]
_TUNE_KEY = ["M", "N", "R", "ROWS_PER_SPLIT", "A_MODE", "A_TOK", "B_MODE", "B_TOK", "C_MODE", "HAS_DOT"]
_gemm_autotuned = triton.autotune(configs=_GPU_CONFIGS, key=_TUNE_KEY)(_gemm_kernel)
# Deterministic mode on a GPU: one fixed tiling, so the order of additions never depends on a timing.
_DETERMINISTIC_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32, "num_warps": 4, "num_stages": 3}

# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1): one small tiling, and short row ranges per split so
# that test-sized problems already reduce over several splits (with a ragged last one).
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_R": 16}
INTERPRETER_ROWS_PER_SPLIT = 40
_SUM_BLOCK = {"gpu": 1024, "interpreter": 256}


class Operand(NamedTuple):
    """A GEMM operand addressed in place: tensor, mode, which tile axis is its token axis, four strides."""
    t: Tensor
    mode: int
    tok: int
    strides: Tuple[int, int, int, int]


def plain(t: Tensor, tok: int = 0) -> Operand:
    """A matrix ``[rows, cols]`` (any strides; ``[B, N, D]`` token tensors flattened to ``[B·N, D]``) whose
    rows sit on tile axis ``tok``."""
    m = t.reshape(-1, t.shape[-1])  # a view unless the strides cannot merge (e.g. an expanded gradient)
    return Operand(m, PLAIN, tok, (m.stride(0), m.stride(1), 0, 0))


def broadcast_row(v: Tensor) -> Operand:
    """A vector ``[N]`` (a bias) as a ``PLAIN`` matrix whose every row is ``v``: token stride 0."""
    return Operand(v, PLAIN, 0, (0, v.stride(0), 0, 0))


def grouped(t: Tensor, tok: int = 0) -> Operand:
    """Small tokens ``[B, Ns, D]`` seen as grouped ``[B·Nl, k²D]`` rows."""
    return Operand(t, GROUPED, tok, (t.stride(0), t.stride(1), t.stride(2), 0))


def image(x: Tensor) -> Operand:
    """An image ``[B, C, H, W]`` seen as its patch matrix ``[B·Ns, C·p·p]``."""
    return Operand(x, IM2COL, 0, tuple(x.stride()))


def patch_weight(w: Tensor) -> Operand:
    """A patch-embedding weight ``[D, C, p, p]`` seen as ``[D, C·p·p]``."""
    return Operand(w, PATCH_W, 0, tuple(w.stride()))


class Geometry(NamedTuple):
    """The token grids the gathered modes address: large grid ``NL = Hl·Wl`` tokens, ``WL`` wide; small
    grid ``NS``, ``WS``; width ``DW``, factor ``KF``, patch ``P`` (1 when no image is involved)."""
    NL: int
    WL: int
    NS: int
    WS: int
    DW: int
    KF: int
    P: int


def level_geometry(grid_h: int, grid_w: int, D: int, k: int, p: int = 1) -> Geometry:
    """The geometry of one compression level of small grid ``grid_h x grid_w``."""
    return Geometry(NL=(grid_h // k) * (grid_w // k), WL=grid_w // k, NS=grid_h * grid_w, WS=grid_w, DW=D, KF=k,
                    P=p)


def on_gpu(t: Tensor) -> bool:
    return t.device.type == "cuda"


def gemm(a: Operand, b: Optional[Operand], c: Optional[Operand], M: int, N: int, R: int, geo: Geometry, *,
         add: Optional[Operand] = None, row_sums: Optional[Tensor] = None, split: int = 1,
         rows_per_split: Optional[int] = None, s_c_split: int = 0) -> None:
    """``c = A @ B (+ add)`` over ``R`` reduction rows (``c`` rounded once to its dtype), and/or the row sums of
    ``A`` into ``row_sums`` (``c`` None: row sums only). With ``split > 1`` the reduction is cut into ranges
    of ``rows_per_split`` rows, range ``s`` written at ``c + s·s_c_split`` and its row sums at
    ``row_sums + s·s_c_split`` (:func:`weight_grad`)."""
    gpu = on_gpu(a.t)
    has_dot = c is not None
    if M == 0 or (has_dot and N == 0):
        return
    dummy = a.t  # stands in for absent operands; never read (HAS_* is False)
    b = b if b is not None else a
    args = (a.t, b.t, c.t if has_dot else dummy, add.t if add is not None else dummy,
            row_sums if row_sums is not None else dummy,
            M, N, R, R if rows_per_split is None else rows_per_split,
            *a.strides, *b.strides, *(c.strides if has_dot else (0,) * 4),
            *(add.strides if add is not None else (0,) * 4), s_c_split,
            geo.NL, geo.WL, geo.NS, geo.WS, geo.DW)
    out_dtype = c.t.dtype if has_dot else torch.float32
    flags = dict(A_MODE=a.mode, A_TOK=a.tok, B_MODE=b.mode, B_TOK=b.tok,
                 C_MODE=c.mode if has_dot else PLAIN, ADD_MODE=add.mode if add is not None else PLAIN,
                 KF=geo.KF, P=geo.P, HAS_DOT=has_dot, HAS_ADD=add is not None, HAS_RSUM=row_sums is not None,
                 **dot_flags(a.t.dtype, out_dtype, gpu))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * (triton.cdiv(N, meta["BLOCK_N"]) if has_dot else 1), split)

    if not gpu:
        launch(_gemm_kernel)[grid(_INTERPRETER_BLOCKS)](*args, **flags, **_INTERPRETER_BLOCKS)
    elif torch.are_deterministic_algorithms_enabled():
        launch(_gemm_kernel)[grid(_DETERMINISTIC_CONFIG)](*args, **flags, **_DETERMINISTIC_CONFIG)
    else:
        launch(_gemm_autotuned)[grid](*args, **flags)


def plan_splits(rows: int, M: int, N: int, device: torch.device) -> Tuple[int, int]:
    """``(SPLIT, rows_per_split)`` for a weight-gradient GEMM reducing ``rows`` token rows into ``[M, N]``.

    GPU: enough (tile, split) programs to give every SM two when the tiles are 128x128 (smaller tiles give
    more), but no more splits than started 256-row blocks, so each program amortizes its partial store.
    Counting 64x64 tiles left the GPU half idle whenever the autotuner chose larger ones; measured on an H100
    (bf16, D = 384, B = 256) the backward's GEMMs took 0.74 ms instead of 0.91, the larger partials costing
    20 µs more to sum. Interpreter: a short fixed range, so test-sized problems reduce over several splits."""
    if rows <= 0:
        return 1, 0
    if device.type != "cuda":
        per = INTERPRETER_ROWS_PER_SPLIT
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = triton.cdiv(M, 128) * triton.cdiv(max(N, 1), 128)
        split = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(rows, 256)))
        per = triton.cdiv(rows, split)
    return triton.cdiv(rows, per), per


def weight_grad(a: Operand, b: Optional[Operand], M: int, N: int, rows: int, geo: Geometry, want_w: bool,
                want_b: bool, dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(A @ B [M, N], Σ_r A [M])`` reduced over ``rows`` through per-split partials (module docstring), each
    rounded once to ``dtype``; None where not wanted."""
    if not (want_w or want_b):
        return None, None
    device = a.t.device
    split, per = plan_splits(rows, M, N, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Split s of the weight's partial and of the bias's side by side in one row, so one launch sums both (each
    # Triton launch costs ~70 µs of host time in eager mode, more than this sum's GPU time).
    nw, nb = (M * N if want_w else 0), (M if want_b else 0)
    part = torch.empty((split, nw + nb), dtype=acc, device=device)
    gemm(a, b if want_w else None, Operand(part, PLAIN, 0, (N, 1, 0, 0)) if want_w else None, M, N, rows, geo,
         row_sums=part[:, nw:] if want_b else None, split=split, rows_per_split=per, s_c_split=nw + nb)
    g_w, g_b = sum_splits(part, dtype, nw)
    return (g_w.view(M, N) if want_w else None), (g_b if want_b else None)


def sum_splits(partial: Tensor, dtype: torch.dtype, first: int) -> Tuple[Tensor, Tensor]:
    """``partial [SPLIT, n]`` summed over splits in order, rounded once to ``dtype``, as two vectors: elements
    ``[0, first)`` and ``[first, n)``."""
    n = partial.shape[1]
    out = torch.empty(first, dtype=dtype, device=partial.device)
    out2 = torch.empty(n - first, dtype=dtype, device=partial.device)
    if n == 0:
        return out, out2
    gpu = on_gpu(partial)
    block = _SUM_BLOCK["gpu" if gpu else "interpreter"]
    launch(_sum_splits_kernel)[(triton.cdiv(n, block),)](
        partial, out if first > 0 else out2, out2 if n > first else out, n, first, partial.shape[0],
        ACC_DTYPE=tl.float64 if partial.dtype == torch.float64 else tl.float32,
        BF16_RTNE=not gpu and dtype == torch.bfloat16, BLOCK=block)
    return out, out2
