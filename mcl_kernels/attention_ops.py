"""The attention ops (`torch.library` custom ops): plain and packed self-attention, their backward ops, fake
implementations and autograd. The same pattern as `mcl_kernels.ops` (validation in `_checks`, the
implementation from `backends.resolve`, the backward an op of its own), kept in its own file because
attention is a layer of the transformer, not of the embedding.

- ``mcl_kernels::attention(q, k, v, scale, backend) -> (out, lse)``: ``q, k, v [B, H, N, Dh]``.
- ``mcl_kernels::packed_attention(q, k, v, seqlens, scale, backend) -> (out, lse)``: every image's ``N`` rows
  are segments of lengths ``seqlens`` that attend only within themselves (block-diagonal).

``out [B, H, N, Dh]`` is in the inputs' dtype; ``lse [B, H, N]`` is each row's log-sum-exp of its scaled
scores (float32; float64 for float64 inputs), saved for the backward. ``lse`` is not differentiable.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _checks, backends
from .ops import _fake_grads, _grads_to_none, _own


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def _fake_forward(q: Tensor, B: int, H: int, N: int, Dh: int) -> Tuple[Tensor, Tensor]:
    return q.new_empty((B, H, N, Dh)), q.new_empty((B, H, N), dtype=_lse_dtype(q))


# --- plain self-attention ------------------------------------------------------------------------------------

@torch.library.custom_op("mcl_kernels::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    """``softmax(q k^T · scale) v`` and the rows' log-sum-exp."""
    _checks.check_attention(q, k, v, scale)
    out, lse = backends.resolve("attention", backend, q.device, q.dtype)(q, k, v, scale)
    return _own(out, q, (q, k, v)), _own(lse, q, (q, k, v))


@attention.register_fake
def _(q, k, v, scale, backend):
    return _fake_forward(q, *_checks.check_attention(q, k, v, scale))


@torch.library.custom_op("mcl_kernels::attention_backward", mutates_args=())
def attention_backward(g_out: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       scale: float, needs: List[bool], backend: str) -> List[Tensor]:
    """Gradients of :func:`attention` for ``(q, k, v)``; ``out`` and ``lse`` are its saved outputs."""
    inputs = (g_out, q, k, v, out, lse)
    fn = backends.resolve("attention_backward", backend, q.device, q.dtype)
    grads = fn(g_out, q, k, v, out, lse, scale, needs)
    return [_own(g, q, inputs) for g in grads]


@attention_backward.register_fake
def _(g_out, q, k, v, out, lse, scale, needs, backend):
    return _fake_grads((q, k, v), needs, q)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.scale, ctx.backend = scale, backend


def _attention_grad(ctx, g_out, g_lse):
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = attention_backward(g_out, *ctx.saved_tensors, ctx.scale, needs, ctx.backend)
    return (*_grads_to_none(grads, needs), None, None)


attention.register_autograd(_attention_grad, setup_context=_attention_setup)


# --- packed (block-diagonal) self-attention --------------------------------------------------------------------

@torch.library.custom_op("mcl_kernels::packed_attention", mutates_args=())
def packed_attention(q: Tensor, k: Tensor, v: Tensor, seqlens: List[int], scale: float, backend: str
                     ) -> Tuple[Tensor, Tensor]:
    """Self-attention within each packed segment (lengths ``seqlens``, summing to ``N``) and the rows'
    log-sum-exp over their segment."""
    _checks.check_packed_attention(q, k, v, seqlens, scale)
    out, lse = backends.resolve("packed_attention", backend, q.device, q.dtype)(q, k, v, seqlens, scale)
    return _own(out, q, (q, k, v)), _own(lse, q, (q, k, v))


@packed_attention.register_fake
def _(q, k, v, seqlens, scale, backend):
    return _fake_forward(q, *_checks.check_packed_attention(q, k, v, seqlens, scale))


@torch.library.custom_op("mcl_kernels::packed_attention_backward", mutates_args=())
def packed_attention_backward(g_out: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              seqlens: List[int], scale: float, needs: List[bool], backend: str) -> List[Tensor]:
    """Gradients of :func:`packed_attention` for ``(q, k, v)``; ``out`` and ``lse`` are its saved outputs."""
    inputs = (g_out, q, k, v, out, lse)
    fn = backends.resolve("packed_attention_backward", backend, q.device, q.dtype)
    return [_own(g, q, inputs) for g in fn(g_out, q, k, v, out, lse, seqlens, scale, needs)]


@packed_attention_backward.register_fake
def _(g_out, q, k, v, out, lse, seqlens, scale, needs, backend):
    return _fake_grads((q, k, v), needs, q)


def _packed_setup(ctx, inputs, output):
    q, k, v, seqlens, scale, backend = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.seqlens, ctx.scale, ctx.backend = list(seqlens), scale, backend


def _packed_grad(ctx, g_out, g_lse):
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = packed_attention_backward(g_out, *ctx.saved_tensors, ctx.seqlens, ctx.scale, needs, ctx.backend)
    return (*_grads_to_none(grads, needs), None, None, None)


packed_attention.register_autograd(_packed_grad, setup_context=_packed_setup)
