"""Functional forms of the MCL embedding: thin, validated calls into the ops.

Arguments accept one compression level (tensors, ``compress=k``) or a chain of them (sequences of
tensors, ``compress=[k1, k2, ...]`` or one ``k`` for every level). Results for one level are
tensors; for a chain, tuples with one entry per level.
"""
from __future__ import annotations

import contextlib
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _checks, backends, ops, reference

TensorOrSeq = Union[Tensor, Sequence[Tensor]]
OptTensorOrSeq = Union[None, Tensor, Sequence[Optional[Tensor]]]


class MCLTokens(NamedTuple):
    """The training embedding's token sets, each ``[B, N, D]`` in DESIGN §2 token order.

    ``small``: small-patch tokens ``T_N``; ``large``: compressed large-patch tokens ``T_kN``;
    ``recon``: tokens decompressed from ``large`` back to the small grid ``T_N^inv`` (None without
    decompression). For a chain of scales each field is a tuple over levels: level ``i`` compresses
    ``small[i]`` into ``large[i]`` (so ``large[i] is small[i+1]``) and reconstructs ``small[i]`` as ``recon[i]``.
    """
    small: Union[Tensor, Tuple[Tensor, ...]]
    large: Union[Tensor, Tuple[Tensor, ...]]
    recon: Union[None, Tensor, Tuple[Tensor, ...]]


def _as_list(value, n: int, name: str) -> List:
    """One entry per level: None and ints repeat, a tensor is one level, a sequence must have ``n``."""
    if isinstance(value, Tensor):
        if n != 1:
            raise ValueError(f"expected a sequence of {n} tensors in {name} (one per level of the chain), got one tensor")
        return [value]
    if value is None or isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"expected {n} entries in {name} (one per compression level), got {len(value)}")
    return value


def _normalize(compress_weight: TensorOrSeq, compress_bias: OptTensorOrSeq, decompress_weight: OptTensorOrSeq,
               decompress_bias: OptTensorOrSeq, compress: Union[int, Sequence[int]], tied_decompress: bool
               ) -> Tuple[bool, List[reference.Level]]:
    chain = not isinstance(compress_weight, Tensor)
    n = 1 if not chain else len(list(compress_weight))
    if n == 0:
        raise ValueError("expected at least one compression level, got an empty compress_weight sequence")
    ws = _as_list(compress_weight, n, "compress_weight")
    ks = _as_list(compress, n, "compress")
    bs = _as_list(compress_bias, n, "compress_bias")
    dws = _as_list(decompress_weight, n, "decompress_weight")
    dbs = _as_list(decompress_bias, n, "decompress_bias")
    if tied_decompress:
        if any(w is not None for w in dws):
            raise ValueError("tied_decompress=True uses compress_weight^T as the decompression weight; "
                             "do not pass decompress_weight as well")
        dws = [w.t() for w in ws]
    return chain, [(k, w, b, dw, db) for k, w, b, dw, db in zip(ks, ws, bs, dws, dbs)]


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes in on ``x``'s device, or None outside autocast.

    Custom ops are opaque to autocast: their kernels would run with autocast still on (the reference
    backend's convolutions then return autocast-dtype tokens while the saved weights stay float32, and the
    backward mixes dtypes). The functional forms therefore do what autocast does for a linear layer: cast
    the floating inputs to the autocast dtype (differentiably: gradients reach the float32 weights) and run
    the op with autocast off.
    """
    device = x.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _cast(value, dtype: torch.dtype):
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def mcl_embed(x: Tensor, proj_weight: Tensor, proj_bias: Optional[Tensor], compress_weight: TensorOrSeq,
              compress_bias: OptTensorOrSeq = None, decompress_weight: OptTensorOrSeq = None,
              decompress_bias: OptTensorOrSeq = None, *, compress: Union[int, Sequence[int]] = 2,
              tied_decompress: bool = False, backend: str = "auto") -> MCLTokens:
    """MCL training embedding of ``x [B, C, H, W]``: small, large and reconstructed tokens.

    ``proj_weight [D, C, p, p]``, ``compress_weight [D, k²·D]``, ``decompress_weight [k²·D, D]`` (or
    ``tied_decompress=True`` to use ``compress_weight^T``; or neither for no reconstruction).
    """
    backends.check_name(backend)
    amp = _autocast_dtype(x)
    if amp is not None:
        with torch.autocast(x.device.type, enabled=False):
            return mcl_embed(*_cast((x, proj_weight, proj_bias, compress_weight, compress_bias, decompress_weight,
                                     decompress_bias), amp), compress=compress, tied_decompress=tied_decompress,
                             backend=backend)
    chain, levels = _normalize(compress_weight, compress_bias, decompress_weight, decompress_bias, compress,
                               tied_decompress)
    k, cw, cb, dw, db = levels[0]
    small, large, recon = ops.mcl_embed(x, proj_weight, proj_bias, cw, cb, dw, db, k, backend)
    smalls, larges, recons = [small], [large], [recon if dw is not None else None]
    grid = (x.shape[-2] // proj_weight.shape[-1] // k, x.shape[-1] // proj_weight.shape[-1] // k)
    for k, cw, cb, dw, db in levels[1:]:
        large, recon = ops.mcl_compress(larges[-1], cw, cb, dw, db, grid[0], grid[1], k, backend)
        smalls.append(larges[-1])
        larges.append(large)
        recons.append(recon if dw is not None else None)
        grid = (grid[0] // k, grid[1] // k)
    no_recon = all(r is None for r in recons)
    if not chain:
        return MCLTokens(smalls[0], larges[0], recons[0])
    return MCLTokens(tuple(smalls), tuple(larges), None if no_recon else tuple(recons))


def merge_weights(proj_weight: Tensor, proj_bias: Optional[Tensor], compress_weight: TensorOrSeq,
                  compress_bias: OptTensorOrSeq = None, *, compress: Union[int, Sequence[int]] = 2
                  ) -> Tuple[Tensor, Tensor]:
    """Re-parameterize: one patch embedding ``(weight [D, C, P, P], bias [D])`` with ``P = p·Πk``.

    ``conv2d(x, weight, bias, stride=P)`` gives the large tokens of :func:`mcl_embed` up to rounding.
    Differentiable; computed in (at least) float32 and returned in the weights' dtype.
    """
    _, levels = _normalize(compress_weight, compress_bias, None, None, compress, False)
    D, C, p = _checks.check_patch_weight(proj_weight)
    _checks.check_param("proj.bias", proj_bias, (D,), proj_weight, required=False)
    for i, (k, cw, cb, _, _) in enumerate(levels):
        prefix = f"level {i}: " if len(levels) > 1 else ""
        _checks.check_level(D, k, cw, cb, None, None, proj_weight, prefix)
    dtype = proj_weight.dtype
    work = torch.promote_types(dtype, torch.float32)
    cast = lambda t: None if t is None else t.to(work)  # noqa: E731
    # The promised precision also under autocast (which would run the merge's matmuls in its dtype).
    no_amp = (torch.autocast(proj_weight.device.type, enabled=False) if _autocast_dtype(proj_weight) is not None
              else contextlib.nullcontext())
    with no_amp:
        weight, bias = reference.merge_weights(cast(proj_weight), cast(proj_bias),
                                               [(k, cast(cw), cast(cb)) for k, cw, cb, _, _ in levels])
    return weight.to(dtype), bias.to(dtype)


def embed_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, cls_token: Optional[Tensor] = None,
                 pos_embed: Optional[Tensor] = None, *, backend: str = "auto",
                 packed_weight: Optional[Tensor] = None) -> Tensor:
    """Inference embedding: ``conv2d(x, weight, bias, stride=P)`` as tokens, class token first, position
    embedding added, written into one ``[B, T, D]`` buffer (``T = N`` or ``1 + N``).

    ``packed_weight``: :func:`mcl_kernels.pack_embed_weight` of ``weight``, made once ahead of the calls, which the
    CPU kernels then read instead of packing the weight on every call (``mcl_kernels.prepack``); unused (the same
    result, at the usual speed) where it does not hold this weight, unchanged, for this call's kernel."""
    backends.check_name(backend)
    amp = _autocast_dtype(x)
    if amp is not None:
        with torch.autocast(x.device.type, enabled=False):
            return ops.embed_tokens(*_cast((x, weight, bias, cls_token, pos_embed), amp), backend, packed_weight)
    return ops.embed_tokens(x, weight, bias, cls_token, pos_embed, backend, packed_weight)
