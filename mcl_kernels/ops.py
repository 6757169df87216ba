"""The PyTorch ops (`torch.library` custom ops): schema, fake implementation, autograd, dispatch.

Each op validates its arguments (`_checks`), then runs the implementation the backend registry
(`backends.resolve`) picks for the op, the backend name and the tensors' device. Fake
implementations give shapes only, so `torch.compile(fullgraph=True)` and `torch.export` trace through
without graph breaks; the backward of each op is an op of its own, so compiled training graphs keep
it opaque too and a backend can provide a fused backward kernel.

Custom ops cannot return None, so an absent result (no decompression, a gradient not asked for)
travels as an empty tensor and becomes None again here.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _checks, backends

_EMPTY = (0,)


def _absent(like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY)


def _own(t: Optional[Tensor], like: Tensor, inputs: Sequence[Optional[Tensor]]) -> Tensor:
    """A contiguous result that shares no memory with any input, as custom ops require (a vjp may hand
    back an upstream gradient itself, e.g. the gradient of an added position embedding)."""
    if t is None:
        return _absent(like)
    t = t.contiguous()
    if any(i is not None and torch._C._is_alias_of(t, i) for i in inputs):
        t = t.clone()
    return t


def _grads_to_none(grads: Sequence[Tensor], needs: Sequence[bool]) -> List[Optional[Tensor]]:
    return [g if need else None for g, need in zip(grads, needs)]


def _size(x: Tensor, proj_w: Tensor) -> Tuple[int, int]:
    """(patches, width) of an embedding call, the patches at the weight's patch size (a training embedding's small
    tokens): what backends.AUTO_MIN_TOKENS is measured in."""
    p = proj_w.shape[-1]
    return x.shape[0] * (x.shape[-2] // p) * (x.shape[-1] // p), proj_w.shape[0]


def _fake_grads(tensors: Sequence[Optional[Tensor]], needs: Sequence[bool], like: Tensor) -> List[Tensor]:
    # Contiguous, like the real results (`_own`): empty_like would keep a channels_last or permuted input's
    # strides, and compiled graphs check the real strides against these.
    return [t.new_empty(t.shape) if need and t is not None else _absent(like) for t, need in zip(tensors, needs)]


# --- training embedding: pixels -> (S, L, R) -------------------------------------------------------

@torch.library.custom_op("mcl_kernels::mcl_embed", mutates_args=())
def mcl_embed(x: Tensor, proj_w: Tensor, proj_b: Optional[Tensor], comp_w: Tensor, comp_b: Optional[Tensor],
              decomp_w: Optional[Tensor], decomp_b: Optional[Tensor], k: int, backend: str
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """Small tokens ``S``, large tokens ``L`` and reconstructed small tokens ``R`` (empty without decompression)."""
    _checks.check_mcl_embed(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k)
    inputs = (x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b)
    tiles = backends.on_amx_tiles("mcl_embed", x, proj_w.shape[-1])
    s, l, r = backends.resolve("mcl_embed", backend, x.device, x.dtype, _size(x, proj_w), amx_tiles=tiles)(*inputs, k)
    return _own(s, x, inputs), _own(l, x, inputs), _own(r, x, inputs)


@mcl_embed.register_fake
def _(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k, backend):
    hs, ws = _checks.check_mcl_embed(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k)
    B, D = x.shape[0], proj_w.shape[0]
    small = x.new_empty((B, hs * ws, D))
    large = x.new_empty((B, (hs // k) * (ws // k), D))
    recon = x.new_empty((B, hs * ws, D)) if decomp_w is not None else _absent(x)
    return small, large, recon


@torch.library.custom_op("mcl_kernels::mcl_embed_backward", mutates_args=())
def mcl_embed_backward(g_small: Optional[Tensor], g_large: Optional[Tensor], g_recon: Optional[Tensor], x: Tensor,
                       proj_w: Tensor, proj_b: Optional[Tensor], comp_w: Tensor, comp_b: Optional[Tensor],
                       decomp_w: Optional[Tensor], decomp_b: Optional[Tensor], small: Tensor, large: Tensor, k: int,
                       needs: List[bool], backend: str) -> List[Tensor]:
    """Gradients of :func:`mcl_embed` for ``(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b)``;
    ``small`` and ``large`` are the forward's outputs (saved, so the reference need not recompute them)."""
    inputs = (x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b)
    grads_out = (g_small, g_large, g_recon if decomp_w is not None else None)
    fn = backends.resolve("mcl_embed_backward", backend, x.device, x.dtype, _size(x, proj_w))
    grads = fn(*grads_out, *inputs, small, large, k, needs)
    return [_own(g, x, inputs + grads_out + (small, large)) for g in grads]


@mcl_embed_backward.register_fake
def _(g_small, g_large, g_recon, x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, small, large, k, needs,
      backend):
    return _fake_grads((x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b), needs, x)


def _mcl_embed_setup(ctx, inputs, output):
    *tensors, k, backend = inputs
    ctx.save_for_backward(*tensors, output[0], output[1])
    ctx.k, ctx.backend = k, backend


def _mcl_embed_grad(ctx, g_small, g_large, g_recon):
    needs = [bool(n) for n in ctx.needs_input_grad[:7]]
    grads = mcl_embed_backward(g_small, g_large, g_recon, *ctx.saved_tensors, ctx.k, needs, ctx.backend)
    return (*_grads_to_none(grads, needs), None, None)


mcl_embed.register_autograd(_mcl_embed_grad, setup_context=_mcl_embed_setup)


# --- one token-level compression (chain levels after the first): tokens -> (L, R) -----------------

@torch.library.custom_op("mcl_kernels::mcl_compress", mutates_args=())
def mcl_compress(tokens: Tensor, comp_w: Tensor, comp_b: Optional[Tensor], decomp_w: Optional[Tensor],
                 decomp_b: Optional[Tensor], grid_h: int, grid_w: int, k: int, backend: str
                 ) -> Tuple[Tensor, Tensor]:
    """Large tokens ``L`` and reconstruction ``R`` (empty without decompression) of tokens on a grid."""
    _checks.check_mcl_compress(tokens, grid_h, grid_w, comp_w, comp_b, decomp_w, decomp_b, k)
    inputs = (tokens, comp_w, comp_b, decomp_w, decomp_b)
    l, r = backends.resolve("mcl_compress", backend, tokens.device, tokens.dtype)(*inputs, grid_h, grid_w, k)
    return _own(l, tokens, inputs), _own(r, tokens, inputs)


@mcl_compress.register_fake
def _(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k, backend):
    _checks.check_mcl_compress(tokens, grid_h, grid_w, comp_w, comp_b, decomp_w, decomp_b, k)
    B, N, D = tokens.shape
    large = tokens.new_empty((B, (grid_h // k) * (grid_w // k), D))
    recon = tokens.new_empty((B, N, D)) if decomp_w is not None else _absent(tokens)
    return large, recon


@torch.library.custom_op("mcl_kernels::mcl_compress_backward", mutates_args=())
def mcl_compress_backward(g_large: Optional[Tensor], g_recon: Optional[Tensor], tokens: Tensor, comp_w: Tensor,
                          comp_b: Optional[Tensor], decomp_w: Optional[Tensor], decomp_b: Optional[Tensor],
                          large: Tensor, grid_h: int, grid_w: int, k: int, needs: List[bool], backend: str
                          ) -> List[Tensor]:
    """Gradients of :func:`mcl_compress` for ``(tokens, comp_w, comp_b, decomp_w, decomp_b)``;
    ``large`` is the forward's output."""
    inputs = (tokens, comp_w, comp_b, decomp_w, decomp_b)
    grads_out = (g_large, g_recon if decomp_w is not None else None)
    fn = backends.resolve("mcl_compress_backward", backend, tokens.device, tokens.dtype)
    grads = fn(*grads_out, *inputs, large, grid_h, grid_w, k, needs)
    return [_own(g, tokens, inputs + grads_out + (large,)) for g in grads]


@mcl_compress_backward.register_fake
def _(g_large, g_recon, tokens, comp_w, comp_b, decomp_w, decomp_b, large, grid_h, grid_w, k, needs, backend):
    return _fake_grads((tokens, comp_w, comp_b, decomp_w, decomp_b), needs, tokens)


def _mcl_compress_setup(ctx, inputs, output):
    *tensors, grid_h, grid_w, k, backend = inputs
    ctx.save_for_backward(*tensors, output[0])
    ctx.grid, ctx.k, ctx.backend = (grid_h, grid_w), k, backend


def _mcl_compress_grad(ctx, g_large, g_recon):
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = mcl_compress_backward(g_large, g_recon, *ctx.saved_tensors, *ctx.grid, ctx.k, needs, ctx.backend)
    return (*_grads_to_none(grads, needs), None, None, None, None)


mcl_compress.register_autograd(_mcl_compress_grad, setup_context=_mcl_compress_setup)


# --- inference embedding: pixels -> [B, T, D] with class token and position embedding --------------

@torch.library.custom_op("mcl_kernels::embed_tokens", mutates_args=())
def embed_tokens(x: Tensor, weight: Tensor, bias: Optional[Tensor], cls_token: Optional[Tensor],
                 pos_embed: Optional[Tensor], backend: str, packed_weight: Optional[Tensor] = None) -> Tensor:
    """Patch embedding with class token and position embedding written into one ``[B, T, D]`` buffer.
    ``packed_weight``: None, or the weight as ``mcl_kernels.pack_embed_weight`` packed it (a speed-up only: a
    backend reads it where it holds this weight unchanged, else ignores it)."""
    _checks.check_embed_tokens(x, weight, bias, cls_token, pos_embed)
    _checks.check_packed_weight(packed_weight)
    inputs = (x, weight, bias, cls_token, pos_embed)
    tiles = backends.on_amx_tiles("embed_tokens", x, weight.shape[-1])
    fn = backends.resolve("embed_tokens", backend, x.device, x.dtype, _size(x, weight), amx_tiles=tiles)
    return _own(fn(*inputs, packed_weight), x, inputs + (packed_weight,))


@embed_tokens.register_fake
def _(x, weight, bias, cls_token, pos_embed, backend, packed_weight=None):
    T, D = _checks.check_embed_tokens(x, weight, bias, cls_token, pos_embed)
    _checks.check_packed_weight(packed_weight)
    return x.new_empty((x.shape[0], T, D))


@torch.library.custom_op("mcl_kernels::embed_tokens_backward", mutates_args=())
def embed_tokens_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          cls_token: Optional[Tensor], pos_embed: Optional[Tensor], needs: List[bool],
                          backend: str) -> List[Tensor]:
    """Gradients of :func:`embed_tokens` for ``(x, weight, bias, cls_token, pos_embed)``."""
    inputs = (x, weight, bias, cls_token, pos_embed)
    grads = backends.resolve("embed_tokens_backward", backend, x.device, x.dtype)(grad, *inputs, needs)
    return [_own(g, x, inputs + (grad,)) for g in grads]


@embed_tokens_backward.register_fake
def _(grad, x, weight, bias, cls_token, pos_embed, needs, backend):
    return _fake_grads((x, weight, bias, cls_token, pos_embed), needs, x)


def _embed_tokens_setup(ctx, inputs, output):
    *tensors, backend, _packed_weight = inputs  # the backward reads the weight itself
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _embed_tokens_grad(ctx, grad):
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = embed_tokens_backward(grad, *ctx.saved_tensors, needs, ctx.backend)
    return (*_grads_to_none(grads, needs), None, None)


embed_tokens.register_autograd(_embed_tokens_grad, setup_context=_embed_tokens_setup)
