"""Plain, differentiable PyTorch for everything `mcl_kernels` computes: the ground truth.

Every kernel is tested against these functions (forward and every gradient) and they are the
fallback wherever no kernel applies. The math and the layouts are DESIGN.md §2:

- small tokens ``S = conv2d(x, E_s, b_s, stride=p)`` flattened row-major, ``[B, Hs·Ws, D]``;
- grouping: large token ``(i, j)`` gathers small tokens ``(i·k+u, j·k+v)`` concatenated at
  ``(u·k + v)·D + d``, ``[B, Hl·Wl, k²·D]``;
- compression ``L = G @ W_c^T + b_c`` with ``W_c [D, k²·D]``;
- decompression ``R = ungroup(L @ W_d^T + b_d)`` with ``W_d [k²·D, D]`` (tied: ``W_d = W_c^T``);
- re-parameterization: ``E_l`` / ``b_l`` such that ``conv2d(x, E_l, b_l, stride=k·p) == L``.

Functions here do no input validation beyond what PyTorch does itself: the op layer validates
(`mcl_kernels._checks`) before anything reaches a backend, this module included.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Patch embedding: ``x [B, C, H, W]``, ``weight [D, C, p, p]`` -> tokens ``[B, (H/p)·(W/p), D]``."""
    p = weight.shape[-1]
    return F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)


def group(tokens: Tensor, grid: Tuple[int, int], k: int) -> Tensor:
    """``[B, Hs·Ws, D]`` on grid ``(Hs, Ws)`` -> ``[B, (Hs/k)·(Ws/k), k²·D]`` in DESIGN §2 order."""
    B, _, D = tokens.shape
    hs, ws = grid
    hl, wl = hs // k, ws // k
    g = tokens.reshape(B, hl, k, wl, k, D).permute(0, 1, 3, 2, 4, 5)
    return g.reshape(B, hl * wl, k * k * D)


def ungroup(grouped: Tensor, grid: Tuple[int, int], k: int) -> Tensor:
    """Inverse of :func:`group`: ``[B, Hl·Wl, k²·D]`` -> ``[B, Hs·Ws, D]`` on small grid ``(Hs, Ws)``."""
    B = grouped.shape[0]
    hs, ws = grid
    hl, wl = hs // k, ws // k
    D = grouped.shape[-1] // (k * k)
    t = grouped.reshape(B, hl, wl, k, k, D).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(B, hs * ws, D)


def compress(tokens: Tensor, grid: Tuple[int, int], k: int, weight: Tensor,
             bias: Optional[Tensor]) -> Tensor:
    """Combine each k×k group of small tokens into one large token: ``L [B, Hl·Wl, D]``."""
    return F.linear(group(tokens, grid, k), weight, bias)


def decompress(large: Tensor, grid: Tuple[int, int], k: int, weight: Tensor,
               bias: Optional[Tensor]) -> Tensor:
    """Transpose projection back to small tokens on ``grid`` (the small grid): ``R [B, Hs·Ws, D]``."""
    return ungroup(F.linear(large, weight, bias), grid, k)


def mcl_level(tokens: Tensor, grid: Tuple[int, int], k: int, comp_w: Tensor, comp_b: Optional[Tensor],
              decomp_w: Optional[Tensor], decomp_b: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """One level of the chain on tokens: ``(L, R)``; ``R`` is None without decompression."""
    large = compress(tokens, grid, k, comp_w, comp_b)
    recon = None if decomp_w is None else decompress(large, grid, k, decomp_w, decomp_b)
    return large, recon


def mcl_embed(x: Tensor, proj_w: Tensor, proj_b: Optional[Tensor], comp_w: Tensor, comp_b: Optional[Tensor],
              decomp_w: Optional[Tensor], decomp_b: Optional[Tensor], k: int
              ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Training embedding of two scales from pixels: ``(S, L, R)``, each ``[B, N, D]`` (R may be None)."""
    p = proj_w.shape[-1]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    small = patch_tokens(x, proj_w, proj_b)
    large, recon = mcl_level(small, grid, k, comp_w, comp_b, decomp_w, decomp_b)
    return small, large, recon


Level = Tuple[int, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]
"""One compression level of a chain: ``(k, comp_w, comp_b, decomp_w, decomp_b)``."""


def mcl_embed_chain(x: Tensor, proj_w: Tensor, proj_b: Optional[Tensor], levels: Sequence[Level]
                    ) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """A chain of scales (e.g. 16→32→64): tokens of every scale and the reconstruction of every level.

    Level ``i`` compresses the tokens of scale ``i`` into scale ``i+1`` and (optionally) reconstructs
    scale ``i`` from them. Returns ``(tokens, recons)`` with ``len(levels)+1`` and ``len(levels)`` items.
    """
    p = proj_w.shape[-1]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    tokens = [patch_tokens(x, proj_w, proj_b)]
    recons: List[Optional[Tensor]] = []
    for k, cw, cb, dw, db in levels:
        large, recon = mcl_level(tokens[-1], grid, k, cw, cb, dw, db)
        tokens.append(large)
        recons.append(recon)
        grid = (grid[0] // k, grid[1] // k)
    return tokens, recons


def merge_level(weight: Tensor, bias: Optional[Tensor], comp_w: Tensor, comp_b: Optional[Tensor],
                k: int) -> Tuple[Tensor, Tensor]:
    """Fold one compression into a patch embedding: ``E [D, C, p, p]`` -> ``E_l [D, C, k·p, k·p]``.

    ``E_l[d, c, u·p + a, v·p + b] = Σ_d' W_c[d, (u·k+v)·D + d'] · E[d', c, a, b]`` and
    ``b_l = b_c + Σ_{u,v} W_c[:, (u·k+v)·D : (u·k+v+1)·D] @ b`` (DESIGN §2).
    """
    D_in, C, p, _ = weight.shape
    D = comp_w.shape[0]
    wc = comp_w.reshape(D, k, k, D_in)
    merged = torch.einsum("duve,ecab->dcuavb", wc, weight).reshape(D, C, k * p, k * p)
    merged_b = comp_b if comp_b is not None else comp_w.new_zeros(D)
    if bias is not None:
        merged_b = merged_b + torch.einsum("duve,e->d", wc, bias)
    return merged, merged_b


def merge_weights(proj_w: Tensor, proj_b: Optional[Tensor],
                  compress: Sequence[Tuple[int, Tensor, Optional[Tensor]]]) -> Tuple[Tensor, Tensor]:
    """Merge the patch embedding and a chain of compressions ``[(k, W_c, b_c), ...]`` into one."""
    weight, bias = proj_w, proj_b
    for k, cw, cb in compress:
        weight, bias = merge_level(weight, bias, cw, cb, k)
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return weight, bias


def embed_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
                 pos_embed: Optional[Tensor]) -> Tensor:
    """Inference embedding: patch tokens, class token in front, position embedding added.

    ``cls_token`` has ``D`` elements (``[D]`` or ``[1, 1, D]``); ``pos_embed`` is ``[T, D]`` or
    ``[1, T, D]`` with ``T = N + (1 if cls_token is not None else 0)``. Returns ``[B, T, D]``.
    """
    tokens = patch_tokens(x, weight, bias)
    if cls_token is not None:
        cls = cls_token.reshape(1, 1, -1).expand(tokens.shape[0], 1, tokens.shape[-1])
        tokens = torch.cat([cls, tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed.reshape(1, -1, tokens.shape[-1])
    return tokens


# --- explicit backward formulas ------------------------------------------------------------------
# The gradients of the functions above, written out (tests check them against autograd). They are the
# reference backend's backward ops: plain tensor ops, so they also run under any dispatch mode.
# ``needs`` flags say which gradients to compute; the others come back as None.

def patch_tokens_backward(grad: Tensor, x: Tensor, weight: Tensor, needs: Sequence[bool]
                          ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`patch_tokens` for ``(x, weight, bias)`` from ``grad [B, N, D]``.

    The convolution's own backward, as autograd runs it for :func:`patch_tokens`: the weight gradient as a
    product of ``grad`` and the image's patch matrix would build that matrix (``B·N × C·p·p``, twice the
    tokens' bytes at p = 16, D = 384), which the convolution's backward does not.
    """
    if not any(needs):
        return None, None, None
    B, D, p = x.shape[0], weight.shape[0], weight.shape[-1]
    g = grad.transpose(1, 2).reshape(B, D, x.shape[-2] // p, x.shape[-1] // p)  # the convolution output's gradient
    gx, gw, gb = torch.ops.aten.convolution_backward(g, x, weight, [D], [p, p], [0, 0], [1, 1], False, [0, 0], 1,
                                                     [bool(n) for n in needs])
    return gx, gw, gb


def mcl_level_backward(g_large: Optional[Tensor], g_recon: Optional[Tensor], tokens: Tensor, large: Tensor,
                       grid: Tuple[int, int], k: int, comp_w: Tensor, decomp_w: Optional[Tensor],
                       needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of :func:`mcl_level` for ``(tokens, comp_w, comp_b, decomp_w, decomp_b)``, given its
    input ``tokens`` and its output ``large`` (saved by the forward, not recomputed)."""
    # Each grouped copy (the size of the tokens) is made where it is used and dropped after: held together, they
    # put a step through the op 30 MiB above autograd's through the reference (D = 384, B = 64).
    D = comp_w.shape[0]
    g_l = g_large if g_large is not None else tokens.new_zeros(large.shape)
    g_dw = g_db = None
    if decomp_w is not None and g_recon is not None:
        g_rg = group(g_recon, grid, k).reshape(-1, decomp_w.shape[0])  # gradient of L @ W_d^T + b_d
        g_dw = g_rg.t() @ large.reshape(-1, D) if needs[3] else None
        g_db = g_rg.sum(0) if needs[4] else None
        g_l = g_l + (g_rg @ decomp_w).reshape(g_l.shape)
        del g_rg
    g_l2 = g_l.reshape(-1, D)
    g_cw = g_l2.t() @ group(tokens, grid, k).flatten(0, 1) if needs[1] else None
    g_cb = g_l2.sum(0) if needs[2] else None
    g_tokens = ungroup(g_l @ comp_w, grid, k) if needs[0] else None
    return g_tokens, g_cw, g_cb, g_dw, g_db


def mcl_embed_backward(g_small: Optional[Tensor], g_large: Optional[Tensor], g_recon: Optional[Tensor], x: Tensor,
                       proj_w: Tensor, proj_b: Optional[Tensor], comp_w: Tensor, comp_b: Optional[Tensor],
                       decomp_w: Optional[Tensor], decomp_b: Optional[Tensor], small: Tensor, large: Tensor,
                       k: int, needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """Gradients of :func:`mcl_embed` for ``(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b)``,
    given the forward's outputs ``small`` and ``large``."""
    p = proj_w.shape[-1]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    level_needs = (any(needs[:3]), needs[3], needs[4], needs[5], needs[6])
    g_tokens, g_cw, g_cb, g_dw, g_db = mcl_level_backward(g_large, g_recon, small, large, grid, k, comp_w,
                                                          decomp_w, level_needs)
    gx = gw = gb = None
    if any(needs[:3]):
        if g_small is not None:
            g_tokens = g_tokens.add_(g_small)  # g_tokens is this function's own product: no second tokens-sized sum
        gx, gw, gb = patch_tokens_backward(g_tokens, x, proj_w, needs[:3])
    return gx, gw, gb, g_cw, g_cb, g_dw, g_db


def embed_tokens_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          cls_token: Optional[Tensor], pos_embed: Optional[Tensor], needs: Sequence[bool]
                          ) -> Tuple[Optional[Tensor], ...]:
    """Gradients of :func:`embed_tokens` for ``(x, weight, bias, cls_token, pos_embed)``."""
    first = 1 if cls_token is not None else 0
    g_cls = grad[:, 0].sum(0).reshape(cls_token.shape) if cls_token is not None and needs[3] else None
    g_pos = grad.sum(0).reshape(pos_embed.shape) if pos_embed is not None and needs[4] else None
    gx, gw, gb = patch_tokens_backward(grad[:, first:], x, weight, needs[:3])
    return gx, gw, gb, g_cls, g_pos


# --- attention: the ViT blocks' multi-head self-attention, plain and packed (block-diagonal) ----------------
# Layout: ``q, k, v [B, H, N, Dh]`` (what timm's Attention makes of its qkv projection). Packed: the token
# rows of every image are the concatenation of segments of lengths ``seqlens`` (MCL: the small, large and
# reconstructed branches of one image, each with its class token), and each segment attends only to itself.

def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Self-attention ``softmax(q k^T · scale) v``: ``q, k, v [B, H, N, Dh]`` -> ``[B, H, N, Dh]``;
    ``scale`` defaults to ``Dh^-0.5``. The math of timm's non-fused path, in the inputs' dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v


def segments(seqlens: Sequence[int]) -> List[slice]:
    """The token slices of packed segments of lengths ``seqlens``."""
    bounds = [0]
    for n in seqlens:
        bounds.append(bounds[-1] + int(n))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def packed_attention(q: Tensor, k: Tensor, v: Tensor, seqlens: Sequence[int], scale: Optional[float] = None
                     ) -> Tensor:
    """Block-diagonal self-attention over packed segments: ``q, k, v [B, H, N, Dh]`` with
    ``N = sum(seqlens)``; rows of segment ``s`` attend only to keys of segment ``s``. By definition
    :func:`attention` on each segment separately, concatenated along ``N``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.cat([attention(q[:, :, s], k[:, :, s], v[:, :, s], scale) for s in segments(seqlens)], dim=2)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, seqlens: Sequence[int], scale: float
                      ) -> Tuple[Tensor, Tensor]:
    """The attention ops' forward: ``(out [B, H, N, Dh], lse [B, H, N])``, ``out`` of
    :func:`packed_attention` (one segment: plain attention) and ``lse`` the log-sum-exp of each row's scaled
    scores over its segment, which the backward uses to recompute the softmax. Computed in float32 (float64
    for float64 inputs) and rounded once: ``out`` in ``q.dtype``, ``lse`` in the accumulation dtype."""
    acc = _accumulation_dtype(q.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    outs, lses = [], []
    for s in segments(seqlens):
        scores = (qa[:, :, s] @ ka[:, :, s].transpose(-2, -1)) * scale
        lse = torch.logsumexp(scores, -1)
        outs.append(torch.exp(scores - lse[..., None]) @ va[:, :, s])
        lses.append(lse)
    B, H, N, Dh = q.shape
    if not outs:  # N = 0
        return q.new_empty((B, H, 0, Dh)), q.new_empty((B, H, 0), dtype=acc)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def attention_backward(g_out: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       seqlens: Sequence[int], scale: float, needs: Sequence[bool]
                       ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`attention_forward`'s ``out`` for ``(q, k, v)`` from ``g_out [B, H, N, Dh]``, given
    the forward's ``out`` and ``lse``. Per segment, with the softmax recomputed as
    ``P = exp(q k^T · scale - lse)`` and ``δ = rowsum(g_out ⊙ out)``:
    ``g_v = P^T g_out``, ``g_P = g_out v^T``, ``g_S = P ⊙ (g_P - δ)``, ``g_q = scale · g_S k``,
    ``g_k = scale · g_S^T q``. Computed in float32 (float64 for float64 inputs), returned in ``q.dtype``.
    ``g_out`` None counts as zero."""
    acc = _accumulation_dtype(q.dtype)
    if g_out is None:
        g_out = torch.zeros_like(out)
    qa, ka, va, ga = q.to(acc), k.to(acc), v.to(acc), g_out.to(acc)
    delta = (ga * out.to(acc)).sum(-1)
    gq, gk, gv = torch.zeros_like(qa), torch.zeros_like(ka), torch.zeros_like(va)
    for s in segments(seqlens):
        p = torch.exp((qa[:, :, s] @ ka[:, :, s].transpose(-2, -1)) * scale - lse[:, :, s, None].to(acc))
        gv[:, :, s] = p.transpose(-2, -1) @ ga[:, :, s]
        gs = p * (ga[:, :, s] @ va[:, :, s].transpose(-2, -1) - delta[:, :, s, None])
        gq[:, :, s] = (gs @ ka[:, :, s]) * scale
        gk[:, :, s] = (gs.transpose(-2, -1) @ qa[:, :, s]) * scale
    return tuple(g.to(q.dtype) if need else None for g, need in zip((gq, gk, gv), needs))
