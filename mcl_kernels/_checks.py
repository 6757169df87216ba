"""Input validation for every op, in one place.

Called by the ops' real and fake implementations alike (`mcl_kernels.ops`), so eager calls, traced
graphs and every backend see the same contract and the same messages. Each message says what was
expected, what came, and what to do about it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _shape(t: Tensor) -> Tuple[int, ...]:
    # torch.Size is already a tuple of ints (of SymInts under tracing, which compare and print as well); a per-element
    # int() cost ~3 us a call, nine calls per op call.
    return tuple(t.shape)


def check_image(x: Tensor, channels: int, large_patch: int, small_patch: int, k: int = 1) -> Tuple[int, int]:
    """Validate an image batch ``[B, C, H, W]``; returns the small-patch grid ``(H/p, W/p)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the image as a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected an image batch of rank 4 [B, C, H, W], got rank {x.dim()} "
                         f"with shape {_shape(x)}; add a batch dimension with x.unsqueeze(0) for one image")
    if x.dtype not in _FLOATS:
        raise TypeError(f"expected a floating-point image (float32, bfloat16, float16 or float64), got {x.dtype}; "
                        f"convert integer pixels first, e.g. x.float() / 255 followed by normalization")
    B, C, H, W = _shape(x)
    if C != channels:
        raise ValueError(f"expected {channels} input channels (the patch embedding's weight has "
                         f"in_chans={channels}), got an image of shape {_shape(x)} with {C} channels")
    if H % large_patch or W % large_patch:
        if k > 1 and H % small_patch == 0 and W % small_patch == 0:
            raise ValueError(
                f"compress={k} does not divide the small-patch grid {H // small_patch}x{W // small_patch} "
                f"(image {H}x{W}, patch {small_patch}): height and width must be multiples of the large "
                f"patch {large_patch}; resize or pad the image, or pick another compress factor")
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {large_patch}; "
                         f"resize or pad the image to a multiple of {large_patch} in both dimensions")
    return H // small_patch, W // small_patch


def check_param(name: str, t: Optional[Tensor], shape: Sequence[int], like: Tensor,
                required: bool = True) -> None:
    """A weight or bias must have the given shape and the dtype and device of ``like`` (the input)."""
    if t is None:
        if required:
            raise ValueError(f"{name} is required, got None")
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor, got {type(t).__name__}")
    if _shape(t) != tuple(shape):
        raise ValueError(f"expected {name} of shape {tuple(shape)}, got {_shape(t)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the input has dtype {like.dtype}; "
                        f"cast one to the other (e.g. module.to({like.dtype}) or use torch.autocast)")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}; "
                         f"move them to the same device (e.g. module.to(x.device))")


def check_patch_weight(weight: Tensor, name: str = "proj.weight") -> Tuple[int, int, int]:
    """``[D, C, p, p]`` with square patches; returns ``(D, C, p)``."""
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        got = _shape(weight) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"expected {name} of shape [D, C, p, p] (a square Conv2d patch kernel), got {got}")
    D, C, p, _ = _shape(weight)
    return D, C, p


def check_factor(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"expected compress factor k as a positive integer, got {k!r}")


def check_level(dim: int, k: int, comp_w: Tensor, comp_b: Optional[Tensor], decomp_w: Optional[Tensor],
                decomp_b: Optional[Tensor], like: Tensor, prefix: str = "") -> None:
    """Weights of one compression level at width ``dim`` (DESIGN §2 layouts)."""
    check_factor(k)
    kk = k * k * dim
    check_param(prefix + "compress.weight", comp_w, (dim, kk), like)
    check_param(prefix + "compress.bias", comp_b, (dim,), like, required=False)
    check_param(prefix + "decompress.weight", decomp_w, (kk, dim), like, required=False)
    if decomp_w is None and decomp_b is not None:
        raise ValueError(f"{prefix}decompress.bias was given without decompress.weight")
    check_param(prefix + "decompress.bias", decomp_b, (kk,), like, required=False)


def check_mcl_embed(x: Tensor, proj_w: Tensor, proj_b: Optional[Tensor], comp_w: Tensor,
                    comp_b: Optional[Tensor], decomp_w: Optional[Tensor], decomp_b: Optional[Tensor],
                    k: int) -> Tuple[int, int]:
    """Validate the training embedding's arguments; returns the small grid ``(Hs, Ws)``."""
    D, C, p = check_patch_weight(proj_w)
    check_factor(k)
    grid = check_image(x, C, p * k, p, k)
    check_param("proj.weight", proj_w, (D, C, p, p), x)
    check_param("proj.bias", proj_b, (D,), x, required=False)
    check_level(D, k, comp_w, comp_b, decomp_w, decomp_b, x)
    return grid


def check_mcl_compress(tokens: Tensor, grid_h: int, grid_w: int, comp_w: Tensor, comp_b: Optional[Tensor],
                       decomp_w: Optional[Tensor], decomp_b: Optional[Tensor], k: int) -> None:
    """Validate one token-level compression (a chain's levels after the first)."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        got = _shape(tokens) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"expected tokens of shape [B, N, D], got {got}")
    if tokens.dtype not in _FLOATS:
        raise TypeError(f"expected floating-point tokens, got {tokens.dtype}")
    if tokens.shape[1] != grid_h * grid_w:
        raise ValueError(f"expected {grid_h}x{grid_w}={grid_h * grid_w} tokens, got {tokens.shape[1]}")
    check_factor(k)
    if grid_h % k or grid_w % k:
        raise ValueError(f"compress={k} does not divide the token grid {grid_h}x{grid_w}; image height and "
                         f"width must be multiples of the largest patch of the chain")
    check_level(int(tokens.shape[2]), k, comp_w, comp_b, decomp_w, decomp_b, tokens)


def check_packed_weight(packed_weight: Optional[Tensor]) -> None:
    """``embed_tokens``' optional prepacked weight: what ``pack_embed_weight`` returns, a 1-D uint8 tensor."""
    if packed_weight is None:
        return
    if not isinstance(packed_weight, Tensor) or packed_weight.dtype != torch.uint8 or packed_weight.dim() != 1:
        got = (f"a {packed_weight.dtype} tensor of shape {_shape(packed_weight)}" if isinstance(packed_weight, Tensor)
               else type(packed_weight).__name__)
        raise TypeError(f"expected packed_weight as the 1-D uint8 tensor mcl_kernels.pack_embed_weight returns "
                        f"(or None), got {got}")


def check_embed_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
                       pos_embed: Optional[Tensor]) -> Tuple[int, int]:
    """Validate the inference embedding; returns ``(T, D)``, the output's sequence length and width."""
    D, C, P = check_patch_weight(weight, "patch embedding weight")
    hs, ws = check_image(x, C, P, P)
    check_param("patch embedding weight", weight, (D, C, P, P), x)
    check_param("patch embedding bias", bias, (D,), x, required=False)
    T = hs * ws
    if cls_token is not None:
        if not isinstance(cls_token, Tensor) or cls_token.numel() != D:
            got = _shape(cls_token) if isinstance(cls_token, Tensor) else type(cls_token).__name__
            raise ValueError(f"expected cls_token with {D} elements ([D] or [1, 1, D]), got {got}")
        check_param("cls_token", cls_token, _shape(cls_token), x)
        T += 1
    if pos_embed is not None:
        if not isinstance(pos_embed, Tensor) or _shape(pos_embed) not in ((T, D), (1, T, D)):
            got = _shape(pos_embed) if isinstance(pos_embed, Tensor) else type(pos_embed).__name__
            raise ValueError(f"expected pos_embed of shape [{T}, {D}] or [1, {T}, {D}] "
                             f"({hs}x{ws} patches{' + class token' if cls_token is not None else ''}), got {got}")
        check_param("pos_embed", pos_embed, _shape(pos_embed), x)
    return T, D


def check_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[int, int, int, int]:
    """Self-attention operands ``q, k, v [B, H, N, Dh]`` (equal shapes, one dtype and device) and a finite
    ``scale``; returns ``(B, H, N, Dh)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"expected {name} as a torch.Tensor [B, H, N, Dh], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"expected {name} of rank 4 [B, H, N, Dh] (batch, heads, tokens, head dim), got "
                             f"shape {_shape(t)}; split heads first, e.g. x.reshape(B, N, H, Dh).transpose(1, 2)")
        if t.dtype not in _FLOATS:
            raise TypeError(f"expected floating-point {name} (float32, bfloat16, float16 or float64), got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if _shape(t) != _shape(q):
            raise ValueError(f"self-attention expects {name} of the same shape as q {_shape(q)}, got {_shape(t)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move them to the same device")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"expected scale as a finite number (default head_dim ** -0.5), got {scale!r}")
    B, H, N, Dh = _shape(q)
    return B, H, N, Dh


def check_packed_attention(q: Tensor, k: Tensor, v: Tensor, seqlens: Sequence[int], scale: float
                           ) -> Tuple[int, int, int, int]:
    """:func:`check_attention` plus the packing: ``seqlens`` positive ints summing to ``N``."""
    B, H, N, Dh = check_attention(q, k, v, scale)
    if isinstance(seqlens, (int, Tensor)) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                     for n in seqlens) or len(seqlens) == 0:
        raise ValueError(f"expected seqlens as a non-empty sequence of positive ints (the lengths of the packed "
                         f"segments, e.g. (Ns, Nl, Ns) for MCL's three branches), got {seqlens!r}")
    if sum(seqlens) != N:
        raise ValueError(f"seqlens {tuple(seqlens)} sum to {sum(seqlens)}, but q, k, v have N={N} tokens; the "
                         f"segments must tile the token axis exactly")
    return B, H, N, Dh
