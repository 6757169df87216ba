"""One compression level on tokens (a chain's levels after the first, DESIGN §2) in Triton, forward and backward,
as gathered GEMMs (`gathered_gemm.py`): ``group`` and ``ungroup`` are addressing modes of the GEMM operands,
never passes over memory, and biases and upstream gradients are added in the GEMM epilogue.

Forward, tokens ``T [B, Hs·Ws, D]`` on grid ``(Hs, Ws)``:

- ``L = group(T) @ W_c^T + b_c``            ``[B·Hl·Wl, k²D] @ [k²D, D]``
- ``R = ungroup(L @ W_d^T + b_d)``          ``[B·Hl·Wl, D] @ [D, k²D]``, stored in ``T``'s token order

Backward (:func:`level_backward`, shared with the training embedding's backward, whose level this is), with
``Gr = group(gR)``:

====  =====================================================  =============================================
 1    ``gLt = gL + Gr @ W_d``             ``[B·Nl, D]``       the total gradient reaching ``L``
 2    ``gT  = ungroup(gLt @ W_c)`` (+ ``gS``)   ``[B·Ns, D]``   the gradient reaching ``T``
 3    ``gW_c = gLt^T @ group(T)``,  ``gb_c = Σ_rows gLt``   ``[D, k²D]``, ``[D]``
 4    ``gW_d = Gr^T @ L``,   ``gb_d = Σ_rows Gr``           ``[k²D, D]``, ``[k²D]``
====  =====================================================  =============================================

Weight gradients reduce through the deterministic per-split partials of :func:`gathered_gemm.weight_grad`.
``W_d`` is read through its strides, so the tied ``W_c^T`` view costs no copy. Every GEMM accumulates in fp32
(fp64 for float64) and rounds once to the tokens' dtype; ``gLt`` is stored in that dtype (the rounding
point of PyTorch's autograd) before it feeds steps 2 and 3.

Contracts (backends.py): ``mcl_compress(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k) -> (L, R)``
and ``mcl_compress_backward(gL, gR, tokens, comp_w, comp_b, decomp_w, decomp_b, L, grid_h, grid_w, k, needs)
-> 5 gradients``, arguments validated by the op layer (`mcl_kernels._checks.check_mcl_compress`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .gathered_gemm import Geometry, broadcast_row, gemm, grouped, level_geometry, plain, weight_grad


def decompress(recon: Tensor, large: Tensor, decomp_w: Tensor, decomp_b: Optional[Tensor], geo: Geometry) -> None:
    """``recon [B, Ns, D] = ungroup(large [B, Nl, D] @ decomp_w^T + decomp_b)``, ``decomp_w [k²D, D]`` (any strides).
    Reads the stored (rounded) ``large``, as the reference's decompression does."""
    D = geo.DW
    gemm(plain(large), plain(decomp_w, tok=1), grouped(recon), large.shape[0] * large.shape[1], geo.KF ** 2 * D, D,
         geo, add=broadcast_row(decomp_b) if decomp_b is not None else None)


def mcl_compress(tokens: Tensor, comp_w: Tensor, comp_b: Optional[Tensor], decomp_w: Optional[Tensor],
                 decomp_b: Optional[Tensor], grid_h: int, grid_w: int, k: int) -> Tuple[Tensor, Optional[Tensor]]:
    """``tokens [B, Hs·Ws, D]`` (any strides), ``comp_w [D, k²D]``, ``decomp_w [k²D, D]`` -> contiguous
    ``(L [B, Hl·Wl, D], R [B, Hs·Ws, D] or None)`` in ``tokens.dtype``, exactly
    :func:`mcl_kernels.reference.mcl_level`."""
    B, N, D = tokens.shape
    k = int(k)
    geo = level_geometry(int(grid_h), int(grid_w), D, k)
    large = torch.empty((B, geo.NL, D), dtype=tokens.dtype, device=tokens.device)
    recon = torch.empty((B, N, D), dtype=tokens.dtype, device=tokens.device) if decomp_w is not None else None
    gemm(grouped(tokens), plain(comp_w, tok=1), plain(large), B * geo.NL, D, k * k * D, geo,
         add=broadcast_row(comp_b) if comp_b is not None else None)
    if recon is not None:
        decompress(recon, large, decomp_w, decomp_b, geo)
    return large, recon


def level_backward(g_large: Optional[Tensor], g_recon: Optional[Tensor], tokens: Tensor, large: Tensor,
                   comp_w: Tensor, comp_b: Optional[Tensor], decomp_w: Optional[Tensor], decomp_b: Optional[Tensor],
                   geo: Geometry, needs: Sequence[bool], g_tokens_add: Optional[Tensor] = None
                   ) -> Tuple[Optional[Tensor], ...]:
    """Gradients ``(gT [B, Ns, D], g_comp_w, g_comp_b, g_decomp_w, g_decomp_b)`` of one level (module docstring)
    for ``needs = (tokens, comp_w, comp_b, decomp_w, decomp_b)``. ``gT`` includes ``g_tokens_add`` (the training
    embedding's ``gS``) and is None when nothing reaches the tokens (zero); the others are None unless needed
    (and their parameter exists). Absent upstream gradients count as zero."""
    B, NS, D = tokens.shape
    ML, KK = B * geo.NL, geo.KF ** 2 * D
    dtype, device = tokens.dtype, tokens.device
    with_recon = decomp_w is not None and g_recon is not None

    # 1: gLt = gL + group(gR) @ W_d, the whole gradient reaching L (None: zero).
    g_lt = g_large
    if with_recon and (needs[0] or needs[1] or needs[2]):
        g_lt = torch.empty((B, geo.NL, D), dtype=dtype, device=device)
        gemm(grouped(g_recon), plain(decomp_w), plain(g_lt), ML, D, KK, geo,
             add=plain(g_large) if g_large is not None else None)

    # 2: gT = ungroup(gLt @ W_c) (+ gS).
    g_tok = g_tokens_add
    if needs[0] and g_lt is not None:
        g_tok = torch.empty((B, NS, D), dtype=dtype, device=device)
        gemm(plain(g_lt), plain(comp_w), grouped(g_tok), ML, KK, D, geo,
             add=grouped(g_tokens_add) if g_tokens_add is not None else None)

    # 3, 4: weight and bias gradients, reduced over the large tokens through per-split partials.
    g_cw = g_cb = g_dw = g_db = None
    if needs[1] or needs[2]:
        if g_lt is None:
            g_cw, g_cb = torch.zeros((D, KK), dtype=dtype, device=device), torch.zeros(D, dtype=dtype, device=device)
        else:
            g_cw, g_cb = weight_grad(plain(g_lt, tok=1), grouped(tokens), D, KK, ML, geo, needs[1], needs[2], dtype)
    if decomp_w is not None and (needs[3] or needs[4]):
        if g_recon is None:
            g_dw, g_db = torch.zeros((KK, D), dtype=dtype, device=device), torch.zeros(KK, dtype=dtype, device=device)
        else:
            g_dw, g_db = weight_grad(grouped(g_recon, tok=1), plain(large), KK, D, ML, geo, needs[3], needs[4],
                                     dtype)
    return (g_tok if needs[0] else None, g_cw if needs[1] else None,
            g_cb if needs[2] and comp_b is not None else None, g_dw if needs[3] else None,
            g_db if needs[4] and decomp_b is not None else None)


def mcl_compress_backward(g_large: Optional[Tensor], g_recon: Optional[Tensor], tokens: Tensor, comp_w: Tensor,
                          comp_b: Optional[Tensor], decomp_w: Optional[Tensor], decomp_b: Optional[Tensor],
                          large: Tensor, grid_h: int, grid_w: int, k: int, needs: Sequence[bool]
                          ) -> Tuple[Optional[Tensor], ...]:
    """Gradients ``(g_tokens [B, Hs·Ws, D], g_comp_w [D, k²D], g_comp_b [D], g_decomp_w [k²D, D],
    g_decomp_b [k²D])`` of :func:`mcl_kernels.reference.mcl_level`, each None unless ``needs`` asks for it; ``g_large``/``g_recon``
    any strides (None counts as zero), ``large`` the forward's output. Results are contiguous, in
    ``tokens.dtype``."""
    needs = [bool(n) for n in needs]
    geo = level_geometry(int(grid_h), int(grid_w), tokens.shape[2], int(k))
    grads = list(level_backward(g_large, g_recon, tokens, large, comp_w, comp_b, decomp_w, decomp_b, geo, needs))
    if needs[0] and grads[0] is None:  # no upstream gradient reaches the tokens
        grads[0] = torch.zeros(tokens.shape, dtype=tokens.dtype, device=tokens.device)
    return tuple(grads)
