"""Attention for the ViT blocks: functional forms of the attention ops and :class:`MCLAttention`, a drop-in for
timm's ``Attention`` (same constructor, same parameter names, so state dicts load either way).

Packed attention runs MCL's branches of one image through a block as one sequence: the tokens of the small,
large and reconstructed branches are concatenated per image (``[B, Ns + Nl + Ns, D]``, each branch with its
class token) and each branch attends only to itself (``seqlens=(Ns, Nl, Ns)``), which equals running the
branches separately -- in one pass, with no work spent on the cross-branch blocks. Everything else in a ViT
block (LayerNorm, MLP, residuals) is per token, so a whole transformer runs packed if its attention does:
:func:`packed_segments` sets the packing on every :class:`MCLAttention` of a model for the duration of a call.
"""
import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, attention_ops, backends


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _auto_runs_sdpa(q: Tensor, backend: str, op: str) -> bool:
    """Whether this call runs PyTorch's fused ``scaled_dot_product_attention`` (once per segment for packed
    attention) instead of ``op``: on ``"auto"`` (and no backend named by the environment) wherever auto's
    measured order (backends.py) picks the reference implementation of ``op``, since SDPA computes the same
    function faster than the reference's math: on the 2-core CPU, forward 0.06 / 0.68 ms against 0.61 / 0.99 at
    50 / 197 tokens, fwd+bwd 0.45 / 1.48 against 1.46 / 4.10, packed 197 + 50 + 197 fwd+bwd 3.35 against 5.62."""
    return (backends.requested(backend) == "auto"
            and backends.resolve(op, "auto", q.device, q.dtype) is backends.REFERENCE_OPS[op])


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *, backend: str = "auto") -> Tensor:
    """Self-attention ``softmax(q k^T · scale) v``: ``q, k, v [B, H, N, Dh]`` (any strides) -> ``[B, H, N, Dh]``;
    ``scale`` defaults to ``Dh^-0.5``. Differentiable in ``q, k, v``. ``"auto"`` runs PyTorch's fused
    ``scaled_dot_product_attention`` wherever auto's order picks the reference (everywhere today: measured
    faster than the attention kernels, see backends.py); a backend named here (or by ``MCL_KERNELS_BACKEND``)
    runs the ``mcl_kernels::attention`` op."""
    backends.check_name(backend)
    _checks.check_attention(q, k, v, 1.0 if scale is None else scale)
    if _auto_runs_sdpa(q, backend, "attention"):
        return _sdpa(q, k, v, None, None, False, 0.0, _scale(q, scale))
    return attention_ops.attention(q, k, v, _scale(q, scale), backend)[0]


def packed_attention(q: Tensor, k: Tensor, v: Tensor, seqlens: Sequence[int], scale: Optional[float] = None, *,
                     backend: str = "auto") -> Tensor:
    """Block-diagonal self-attention: ``q, k, v [B, H, N, Dh]`` whose ``N`` rows (per image) are segments of
    lengths ``seqlens`` (summing to ``N``); each segment attends only to itself. Equals :func:`attention` on
    every segment separately, concatenated along ``N``. Differentiable in ``q, k, v``. ``"auto"``: the kernel
    auto's order picks (the Triton one for bf16/fp16 CUDA tensors), else SDPA once per segment; a named backend
    runs the ``mcl_kernels::packed_attention`` op."""
    backends.check_name(backend)
    seqlens = list(seqlens) if not isinstance(seqlens, (int, Tensor)) else seqlens
    _checks.check_packed_attention(q, k, v, seqlens, 1.0 if scale is None else scale)
    if _auto_runs_sdpa(q, backend, "packed_attention"):
        return _sdpa(q, k, v, seqlens, None, False, 0.0, _scale(q, scale))
    return attention_ops.packed_attention(q, k, v, seqlens, _scale(q, scale), backend)[0]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, seqlens: Optional[Sequence[int]], attn_mask: Optional[Tensor],
          is_causal: bool, dropout_p: float, scale: float) -> Tensor:
    """PyTorch's attention for what the fused ops do not cover (attention masks, causal, attention dropout);
    with ``seqlens``, once per segment."""
    if seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    if attn_mask is not None or is_causal:
        raise ValueError("packed attention (seqlens) cannot be combined with attn_mask or is_causal: the packing "
                         "already is the mask; pass one or the other")
    from .reference import segments
    return torch.cat([F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s], dropout_p=dropout_p,
                                                     scale=scale) for s in segments(seqlens)], dim=2)


class MCLAttention(nn.Module):
    """Multi-head self-attention with the interface of timm's ``Attention`` on the fused attention ops.

    ``forward(x [B, N, C], attn_mask=None, is_causal=False, seqlens=None) -> [B, N, dim_out]``. With
    ``seqlens`` (or the attribute ``self.seqlens``, see :func:`packed_segments`) every image's ``N`` tokens are
    packed segments that attend only within themselves. Parameters and submodules carry timm's names
    (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``), so the state
    dicts of both load into each other; :meth:`from_timm` / :func:`swap_attention` convert in place.

    Attention masks, ``is_causal`` and attention dropout while training (``attn_drop > 0``) are not fused:
    those calls run PyTorch's ``scaled_dot_product_attention`` instead, as timm would.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0., norm_layer=None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; pass attn_head_dim")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("qk_norm / scale_norm need a norm_layer (e.g. nn.LayerNorm)")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.backend = backends.check_name(backend)
        self.seqlens: Optional[Sequence[int]] = None
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, attn: nn.Module, backend: str = "auto") -> "MCLAttention":
        """An ``MCLAttention`` that shares ``attn``'s submodules and parameters (no copy: optimizers and
        checkpoints keep pointing at the same tensors). ``attn`` must be timm's ``Attention`` itself (its
        subclasses may change the math, e.g. rotary embeddings)."""
        timm_attention = _timm_attention_classes()
        if type(attn) not in timm_attention:
            names = ", ".join(f"{c.__module__}.{c.__name__}" for c in timm_attention)
            raise TypeError(f"expected timm's Attention ({names}), got {type(attn).__module__}.{type(attn).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = attn.num_heads, attn.head_dim
        new.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        new.scale = attn.scale
        new.backend = backends.check_name(backend)
        new.seqlens = None
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            module = getattr(attn, name, None)  # older timm has no `norm`
            setattr(new, name, module if module is not None else nn.Identity())
        new.gate = getattr(attn, "gate", None)
        new.train(attn.training)
        return new

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                seqlens: Optional[Sequence[int]] = None) -> Tensor:
        B, N, _ = x.shape
        seqlens = self.seqlens if seqlens is None else seqlens
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if attn_mask is not None or is_causal or dropout_p > 0:
            x = _sdpa(q, k, v, seqlens, attn_mask, is_causal, dropout_p, self.scale)
        elif seqlens is not None:
            x = packed_attention(q, k, v, seqlens, self.scale, backend=self.backend)
        else:
            x = attention(q, k, v, self.scale, backend=self.backend)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"


def _timm_attention_classes():
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"converting timm attention needs timm (pip install timm): {exc}") from exc
    classes = []
    try:
        from timm.layers.attention import Attention
        classes.append(Attention)
    except ImportError:
        pass
    from timm.models import vision_transformer
    if getattr(vision_transformer, "Attention", None) is not None and vision_transformer.Attention not in classes:
        classes.append(vision_transformer.Attention)
    return tuple(classes)


def swap_attention(model: nn.Module, backend: str = "auto") -> int:
    """Replace, in place, every timm ``Attention`` inside ``model`` by an :class:`MCLAttention` sharing its
    parameters; returns how many were replaced. The state dict is unchanged (same names, same tensors)."""
    classes = _timm_attention_classes()
    targets = [(name, m) for name, m in model.named_modules() if type(m) in classes]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, MCLAttention.from_timm(m, backend))
    return len(targets)


@contextlib.contextmanager
def packed_segments(model: nn.Module, seqlens: Sequence[int]) -> Iterator[int]:
    """Within the ``with`` block every :class:`MCLAttention` of ``model`` attends within the packed segments
    ``seqlens`` (e.g. ``(Ns, Nl, Ns)``: the three MCL branches of one image concatenated along the tokens).
    Yields the number of attention modules it set; restores their previous packing on exit."""
    modules = [m for m in model.modules() if isinstance(m, MCLAttention)]
    previous = [m.seqlens for m in modules]
    try:
        for m in modules:
            m.seqlens = tuple(int(n) for n in seqlens)
        yield len(modules)
    finally:
        for m, p in zip(modules, previous):
            m.seqlens = p
