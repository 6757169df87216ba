"""MCL training embedding, backward: every gradient of ``mcl_embed`` (DESIGN §2) as gathered GEMMs in Triton.

With ``G = group(S)``, ``Gr = group(gR)`` (``[B·Hl·Wl, k²D]``) and ``X`` the patch matrix of ``x``
(``[B·Hs·Ws, C·p·p]``), the gradients are six GEMMs and three column sums:

====  =====================================================  =============================================
 1    ``gLt = gL + Gr @ W_d``             ``[B·Nl, D]``       the total gradient reaching ``L``
 2    ``gT  = gS + ungroup(gLt @ W_c)``   ``[B·Ns, D]``       the total gradient reaching ``S``
 3    ``gx  = unpatchify(gT @ E_s)``      ``[B, C, H, W]``
 4    ``gE_s = gT^T @ X``,   ``gb_s = Σ_rows gT``           ``[D, C, p, p]``, ``[D]``
 5    ``gW_c = gLt^T @ G``,  ``gb_c = Σ_rows gLt``          ``[D, k²D]``, ``[D]``
 6    ``gW_d = Gr^T @ L``,   ``gb_d = Σ_rows Gr``           ``[k²D, D]``, ``[k²D]``
====  =====================================================  =============================================

Steps 1, 2, 5 and 6 are the backward of the compression level on ``S``, shared with the token-level op
(:func:`mcl_compress.level_backward`, ``gS`` added in step 2's epilogue); steps 3 and 4 are the patch
embedding's. All six GEMMs run through the one gathered GEMM of `gathered_gemm.py`, whose operand modes
address ``group``/``ungroup``, im2col/``unpatchify`` and the patch weight in place (no copies; upstream
gradients read through their strides) and whose weight-gradient reduction is deterministic by construction
(per-split partials summed in a fixed order; one fixed tiling under ``torch.use_deterministic_algorithms``).

Rounding: intermediate gradients ``gLt`` and ``gT`` are stored in the input dtype (bf16 MMA operands for
the weight-gradient GEMMs on a GPU; the same rounding points as PyTorch's autograd); every GEMM
accumulates in fp32 (fp64 for float64).

Contract (backends.py): ``mcl_embed_backward(gS, gL, gR, x, proj_w, proj_b, comp_w, comp_b, decomp_w,
decomp_b, S, L, k, needs) -> 7 gradients`` (``needs`` masks them; None where not needed). ``S`` and ``L``
are the forward's saved outputs (``G`` and GEMM 6 read them). An absent upstream gradient counts as zero.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .gathered_gemm import gemm, image, level_geometry, patch_weight, plain, weight_grad
from .mcl_compress import level_backward


def mcl_embed_backward(g_small: Optional[Tensor], g_large: Optional[Tensor], g_recon: Optional[Tensor], x: Tensor,
                       proj_w: Tensor, proj_b: Optional[Tensor], comp_w: Tensor, comp_b: Optional[Tensor],
                       decomp_w: Optional[Tensor], decomp_b: Optional[Tensor], small: Tensor, large: Tensor, k: int,
                       needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients ``(gx [B, C, H, W], g_proj_w [D, C, p, p], g_proj_b [D], g_comp_w [D, k²D], g_comp_b [D],
    g_decomp_w [k²D, D], g_decomp_b [k²D])`` of :func:`mcl_kernels.reference.mcl_embed`, each None unless
    ``needs`` asks for it; ``g_small``/``g_recon`` ``[B, Hs·Ws, D]``, ``g_large`` ``[B, Hl·Wl, D]`` (any
    strides; None counts as zero), ``small``/``large`` the forward's outputs. Results are contiguous, in
    ``x.dtype``."""
    B, C, H, W = x.shape
    D, p = proj_w.shape[0], proj_w.shape[-1]
    k = int(k)
    geo = level_geometry(H // p, W // p, D, k, p)
    MS, K = B * geo.NS, C * p * p
    dtype, device = x.dtype, x.device
    needs = [bool(n) for n in needs]
    want_tokens = any(needs[:3])

    # 1, 2, 5, 6: the compression level's backward; g_tok = gT, the whole gradient reaching S (None: zero).
    g_tok, g_cw, g_cb, g_dw, g_db = level_backward(g_large, g_recon, small, large, comp_w, comp_b, decomp_w,
                                                   decomp_b, geo, (want_tokens, *needs[3:]), g_tokens_add=g_small)

    # 3: gx = unpatchify(gT @ E_s); patches tile the image (H, W are multiples of p), so every pixel is written.
    gx = None
    if needs[0]:
        if g_tok is None:
            gx = torch.zeros_like(x, memory_format=torch.contiguous_format)
        else:
            gx = torch.empty(x.shape, dtype=dtype, device=device)
            gemm(plain(g_tok), patch_weight(proj_w), image(gx), MS, K, D, geo)

    # 4: patch-embedding weight and bias gradients, reduced over the small tokens through per-split partials.
    g_pw = g_pb = None
    if needs[1] or needs[2]:
        if g_tok is None:
            g_pw, g_pb = torch.zeros((D, K), dtype=dtype, device=device), torch.zeros(D, dtype=dtype, device=device)
        else:
            g_pw, g_pb = weight_grad(plain(g_tok, tok=1), image(x), D, K, MS, geo, needs[1], needs[2], dtype)
        g_pw = g_pw.reshape(proj_w.shape) if needs[1] else None
        g_pb = g_pb if needs[2] and proj_b is not None else None
    return gx, g_pw, g_pb, g_cw, g_cb, g_dw, g_db
