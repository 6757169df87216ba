"""Shared test helpers: parameter factories and a comparison that says where and by how much."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor


def extension_or_skip():
    """``mcl_kernels._C``; where it is not built, skips the calling test module. Any other import failure (ABI,
    symbols) is a real error and propagates."""
    try:
        from mcl_kernels import _C
    except ModuleNotFoundError as exc:
        if exc.name != "mcl_kernels._C":
            raise
        pytest.skip("mcl_kernels._C is not built; build it with `pip install --no-build-isolation -e .`",
                    allow_module_level=True)
    return _C


def assert_close(name: str, actual: Optional[Tensor], expected: Optional[Tensor], atol: float, rtol: float = 0.0):
    assert (actual is None) == (expected is None), f"{name}: one side is None ({actual is None}, {expected is None})"
    if actual is None:
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    if not bool((err <= tol).all()):
        idx = tuple(int(i) for i in torch.nonzero(err > tol)[0])
        worst = int(err.argmax())
        raise AssertionError(f"{name}: {int((err > tol).sum())}/{err.numel()} elements off; first at {idx}: "
                             f"{a[idx].item():.6g} vs {e[idx].item():.6g}; max abs error {err.max().item():.3g} "
                             f"at flat index {worst} (atol={atol}, rtol={rtol})")


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Max abs error over max abs value: one number for 'relative' error of a whole tensor."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def mcl_params(C: int, D: int, p: int, ks, *, decompress: bool = True, tied: bool = False, bias: bool = True,
               dtype=torch.float32, requires_grad: bool = False, scale: float = 0.1):
    """Random weights for a chain of levels: ``(proj_w, proj_b, [(k, cw, cb, dw, db), ...])``."""
    def r(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)

    proj_w, proj_b = r(D, C, p, p), (r(D) if bias else None)
    levels = []
    for k in ks:
        cw = r(D, k * k * D)
        cb = r(D) if bias else None
        dw = None if not decompress or tied else r(k * k * D, D)
        db = r(k * k * D) if decompress and bias else None
        levels.append((k, cw, cb, dw, db))
    return proj_w, proj_b, levels


def resolve_tied(levels, tied: bool):
    """The reference's view of a level list: tied decompression becomes ``W_d = W_c^T``."""
    return [(k, cw, cb, cw.t() if tied else dw, db) for k, cw, cb, dw, db in levels]


def rand(*size, scale: float = 1.0, dtype=torch.float32, device="cpu") -> Tensor:
    """Drawn in float64, then rounded to ``dtype``: every dtype sees the same values up to its rounding."""
    return (torch.randn(*size, dtype=torch.float64) * scale).to(dtype).to(device)


def make_image(B: int, C: int, H: int, W: int, layout: str = "contiguous", dtype=torch.float32,
               device="cpu") -> Tensor:
    """An image batch in one of the layouts every kernel must accept: contiguous, channels_last, or
    "sliced" (every other column of a twice-as-wide image: non-contiguous, strided)."""
    if layout == "sliced":
        return rand(B, C, H, 2 * W, dtype=dtype, device=device)[..., ::2]
    x = rand(B, C, H, W, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def mcl_embed_inputs(shape, variant: str = "untied", layout: str = "contiguous", dtype=torch.float32, device="cpu"):
    """Inputs of the training embedding for a shape ``(B, C, H, W, p, k, D)``: ``(x, proj_w, proj_b, comp_w,
    comp_b, decomp_w, decomp_b, k)`` drawn in float64 and rounded to ``dtype``, weights scaled so every output
    is O(1). ``variant``: ``untied``, ``tied`` (decompression ``comp_w.t()``, a strided view), ``nodecomp`` or
    ``nobias``; ``layout`` as :func:`make_image`."""
    B, C, H, W, p, k, D = shape

    def r(*size, scale=1.0):
        return rand(*size, scale=scale, dtype=dtype, device=device)

    x = make_image(B, C, H, W, layout, dtype, device)
    bias = variant != "nobias"
    pw = r(D, C, p, p, scale=(C * p * p) ** -0.5)
    pb = r(D) if bias else None
    cw = r(D, k * k * D, scale=(k * k * D) ** -0.5)
    cb = r(D) if bias else None
    dw = None if variant == "nodecomp" else cw.t() if variant == "tied" else r(k * k * D, D, scale=D ** -0.5)
    db = r(k * k * D) if bias and variant != "nodecomp" else None
    return x, pw, pb, cw, cb, dw, db, k
