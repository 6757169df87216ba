"""`FusedMCLEmbed` (training: three token sets) and `MergedPatchEmbed` (deployment: one large-patch
embedding with the interface of timm's ``PatchEmbed``). Thin: the math lives in the ops."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import backends, functional
from .prepack import PackedEmbedWeight

IntPair = Union[int, Tuple[int, int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_img_size(module: nn.Module, x: Tensor, largest_patch: int) -> None:
    """timm's strict image-size rule; other shape rules are the ops' (`_checks`)."""
    if module.strict_img_size and x.dim() == 4 and tuple(x.shape[-2:]) != module.img_size:
        raise ValueError(f"input image size {tuple(x.shape[-2:])} does not match the module's img_size "
                         f"{module.img_size}; pass strict_img_size=False to accept any multiple of {largest_patch}")


def _check_prepack(prepack) -> bool:
    if not isinstance(prepack, bool):
        raise TypeError(f"prepack must be True or False, got {prepack!r}")
    return prepack


class TiedDecompress(nn.Module):
    """Decompression tied to the compression: weight ``compress.weight^T``, own bias ``[k²·D]``."""

    def __init__(self, out_features: int, device=None, dtype=None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))


class MergedPatchEmbed(nn.Module):
    """The re-parameterized MCL embedding: a large-patch embedding with timm ``PatchEmbed``'s interface.

    ``proj = Conv2d(C, D, P, stride=P)``; ``forward(x [B, C, H, W]) -> [B, (H/P)·(W/P), D]``. Its state
    dict (``proj.weight``, ``proj.bias``) loads into ``timm.layers.PatchEmbed(img_size, P, C, D)``.

    ``prepack=True`` (CPU deployment): the weight is packed for the CPU kernels once and reused by every call that
    does not backpropagate into it, instead of packed on each call (batch 1: the call 1.2-1.4x faster in fp32; see
    :mod:`mcl_kernels.prepack`). Packed again by itself after an in-place change (``load_state_dict``,
    ``copy_``); after a change through ``proj.weight.data``, call :meth:`clear_packed`.
    """

    def __init__(self, img_size: Optional[IntPair] = 224, patch_size: int = 32, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True, strict_img_size: bool = True, backend: str = "auto",
                 prepack: bool = False, device=None, dtype=None):
        super().__init__()
        self.prepack = _check_prepack(prepack)
        self._packed = PackedEmbedWeight()
        self.patch_size = _pair(patch_size)
        self.img_size = _pair(img_size) if img_size is not None else None
        self.grid_size = (None if self.img_size is None else
                          (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]))
        self.num_patches = None if self.grid_size is None else self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.strict_img_size = strict_img_size and self.img_size is not None
        self.dynamic_img_pad = False
        self.backend = backends.check_name(backend)
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, bias=bias, device=device,
                              dtype=dtype)
        self.norm = nn.Identity()

    @classmethod
    def from_timm(cls, patch_embed: nn.Module, backend: str = "auto", prepack: bool = False) -> "MergedPatchEmbed":
        """A ``MergedPatchEmbed`` that shares timm ``PatchEmbed``'s ``proj`` (no copy: optimizers and checkpoints keep
        pointing at the same tensors; the state dict keeps its keys), for a deployed timm ViT to run its embedding on
        the fused kernels. Only what this module computes converts: a square, non-overlapping ``Conv2d`` patch
        projection, tokens flattened to ``[B, N, D]``, no norm layer, no dynamic padding."""
        why = _not_convertible(patch_embed)
        if why is not None:
            raise TypeError(f"cannot run this patch embedding as a MergedPatchEmbed: {why}")
        proj = patch_embed.proj
        # Built on the meta device (nothing allocated), then given timm's projection itself.
        new = cls(patch_embed.img_size, proj.kernel_size[0], proj.in_channels, proj.out_channels,
                  bias=proj.bias is not None, strict_img_size=bool(patch_embed.strict_img_size), backend=backend,
                  prepack=prepack, device="meta")
        new.proj = proj
        new.train(patch_embed.training)
        return new

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: Tensor, cls_token: Optional[Tensor] = None, pos_embed: Optional[Tensor] = None) -> Tensor:
        """``[B, N, D]`` tokens; with ``cls_token`` / ``pos_embed`` the ViT input sequence ``[B, T, D]``."""
        _check_img_size(self, x, self.patch_size[0])
        return functional.embed_tokens(x, self.proj.weight, self.proj.bias, cls_token, pos_embed,
                                       backend=self.backend, packed_weight=self.packed_weight())

    def packed_weight(self) -> Optional[Tensor]:
        """The packed ``proj.weight`` the next call would use (``prepack=True``), or None."""
        return self._packed.get(self.proj.weight) if self.prepack else None

    def clear_packed(self) -> None:
        """Pack the weight again on the next call (after changing it through ``proj.weight.data``)."""
        self._packed.clear()


def _timm_patch_embed() -> type:
    try:
        from timm.layers import PatchEmbed
    except ImportError as exc:
        raise ImportError(f"converting timm's PatchEmbed needs timm (pip install timm): {exc}") from exc
    return PatchEmbed


def _not_convertible(patch_embed: nn.Module) -> Optional[str]:
    """Why ``patch_embed`` is not timm's plain ``PatchEmbed`` computation (None when it is)."""
    if type(patch_embed) is not _timm_patch_embed():
        kind = type(patch_embed)
        return f"expected timm.layers.PatchEmbed itself, got {kind.__module__}.{kind.__name__}"
    proj = patch_embed.proj
    if type(proj) is not nn.Conv2d:
        return f"its proj is {type(proj).__name__}, not nn.Conv2d"
    k, stride = tuple(proj.kernel_size), tuple(proj.stride)
    if k[0] != k[1] or stride != k or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1) \
            or proj.groups != 1:
        return (f"its proj is not square, non-overlapping patches (kernel {k}, stride {stride}, padding "
                f"{proj.padding}, dilation {proj.dilation}, groups {proj.groups})")
    if not patch_embed.flatten:
        return "it returns a feature map, not flattened tokens (flatten=False, e.g. a ViT with dynamic_img_size=True)"
    if not isinstance(patch_embed.norm, nn.Identity):
        return f"it has a norm layer ({type(patch_embed.norm).__name__}) after the projection"
    if patch_embed.dynamic_img_pad:
        return "it pads images to a multiple of the patch (dynamic_img_pad=True)"
    return None


def swap_patch_embed(model: nn.Module, backend: str = "auto", prepack: bool = False) -> int:
    """Replace, in place, every timm ``PatchEmbed`` inside ``model`` (a deployed ViT: ``MCLViT.deploy``) by a
    :class:`MergedPatchEmbed` sharing its projection (:meth:`MergedPatchEmbed.from_timm`); returns how many were
    replaced. The state dict is unchanged. ``prepack=True`` packs the weight once for the CPU kernels (CPU
    deployment). One that cannot be converted raises before any is replaced."""
    timm_class = _timm_patch_embed()
    targets = [(name, m) for name, m in model.named_modules() if type(m) is timm_class]
    for name, m in targets:
        why = _not_convertible(m)
        if why is not None:
            raise TypeError(f"cannot run {name or 'the model'} as a MergedPatchEmbed: {why}")
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, MergedPatchEmbed.from_timm(m, backend, prepack))
    return len(targets)


class FusedMCLEmbed(nn.Module):
    """MCL training embedding: patchify + embed + compress (+ decompress), DESIGN §2.

    ``forward(x [B, C, H, W]) -> MCLTokens(small, large, recon)``, each ``[B, N, D]`` (tuples over levels
    for a chain ``scales=(16, 32, 64)``, which overrides ``patch_size`` and ``compress``).

    Parameters: ``proj.weight [D, C, p, p]``, ``proj.bias [D]``, ``compress.weight [D, k²·D]``,
    ``compress.bias [D]``, ``decompress.weight [k²·D, D]``, ``decompress.bias [k²·D]`` (tied: bias only);
    for a chain ``compress`` / ``decompress`` are ``ModuleList`` s with one entry per level.

    timm-style attributes describe the small scale (``patch_size``, ``grid_size``, ``num_patches``);
    ``patch_sizes``, ``grid_sizes`` and ``num_patches_per_scale`` give every scale.
    ``fuse()`` returns the merged :class:`MergedPatchEmbed` (found by ``timm.utils.reparameterize_model``);
    ``reparameterize()`` turns this module into it in place (``forward`` then returns large tokens).
    """

    def __init__(self, img_size: IntPair = 224, patch_size: int = 16, compress: int = 2, in_chans: int = 3,
                 embed_dim: int = 768, decompress: bool = True, tied_decompress: bool = False,
                 backend: str = "auto", scales: Optional[Sequence[int]] = None, bias: bool = True,
                 strict_img_size: bool = True, prepack: bool = False, device=None, dtype=None):
        super().__init__()
        self.prepack = _check_prepack(prepack)  # once fused, as MergedPatchEmbed's
        self._packed = PackedEmbedWeight()
        if scales is None:
            scales = (patch_size, patch_size * compress)
        self.scales = tuple(int(s) for s in scales)
        if len(self.scales) < 2 or any(s <= 0 for s in self.scales) or any(
                b % a or b <= a for a, b in zip(self.scales, self.scales[1:])):
            raise ValueError(f"expected scales as increasing patch sizes, each a multiple of the one before "
                             f"(e.g. (16, 32) or (16, 32, 64)), got {tuple(scales)}")
        self.factors = tuple(b // a for a, b in zip(self.scales, self.scales[1:]))
        self.img_size = _pair(img_size)
        if self.img_size[0] % self.scales[-1] or self.img_size[1] % self.scales[-1]:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the largest patch {self.scales[-1]}")
        if tied_decompress and not decompress:
            raise ValueError("tied_decompress=True needs decompress=True")
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.has_decompress, self.tied_decompress = decompress, tied_decompress
        self.strict_img_size = strict_img_size
        self.backend = backends.check_name(backend)
        self.patch_sizes = tuple((s, s) for s in self.scales)
        self.grid_sizes = tuple((self.img_size[0] // s, self.img_size[1] // s) for s in self.scales)
        self.num_patches_per_scale = tuple(h * w for h, w in self.grid_sizes)
        self.patch_size, self.grid_size, self.num_patches = (self.patch_sizes[0], self.grid_sizes[0],
                                                             self.num_patches_per_scale[0])
        self.fused = False

        dd = {"device": device, "dtype": dtype}
        D = embed_dim
        self.proj = nn.Conv2d(in_chans, D, self.scales[0], stride=self.scales[0], bias=bias, **dd)
        comp = [nn.Linear(k * k * D, D, **dd) for k in self.factors]
        if not decompress:
            decomp = None
        elif tied_decompress:
            decomp = [TiedDecompress(k * k * D, **dd) for k in self.factors]
        else:
            decomp = [nn.Linear(D, k * k * D, **dd) for k in self.factors]
        chain = len(self.factors) > 1
        self.compress = nn.ModuleList(comp) if chain else comp[0]
        self.decompress = None if decomp is None else (nn.ModuleList(decomp) if chain else decomp[0])

    def _levels(self, attr: str) -> list:
        m = getattr(self, attr)
        return [None] * len(self.factors) if m is None else (list(m) if isinstance(m, nn.ModuleList) else [m])

    def forward(self, x: Tensor):
        _check_img_size(self, x, self.scales[-1])
        if self.fused:
            return functional.embed_tokens(x, self.proj.weight, self.proj.bias, backend=self.backend,
                                           packed_weight=self.packed_weight())
        comp, decomp = self._levels("compress"), self._levels("decompress")
        chain = len(comp) > 1
        pick = (lambda xs: xs) if chain else (lambda xs: xs[0])  # noqa: E731
        return functional.mcl_embed(
            x, self.proj.weight, self.proj.bias,
            pick([c.weight for c in comp]), pick([c.bias for c in comp]),
            None if self.tied_decompress or not self.has_decompress else pick([d.weight for d in decomp]),
            None if not self.has_decompress else pick([d.bias for d in decomp]),
            compress=pick(list(self.factors)), tied_decompress=self.tied_decompress, backend=self.backend)

    def merged_weights(self) -> Tuple[Tensor, Tensor]:
        """``(weight [D, C, P, P], bias [D])`` of the merged large-patch embedding (differentiable)."""
        if self.fused:
            return self.proj.weight, self.proj.bias
        comp = self._levels("compress")
        chain = len(comp) > 1
        return functional.merge_weights(
            self.proj.weight, self.proj.bias,
            [c.weight for c in comp] if chain else comp[0].weight,
            [c.bias for c in comp] if chain else comp[0].bias,
            compress=list(self.factors) if chain else self.factors[0])

    @torch.no_grad()
    def fuse(self) -> MergedPatchEmbed:
        """The merged large-patch embedding as a new module (timm ``PatchEmbed`` interface)."""
        weight, bias = self.merged_weights()
        merged = MergedPatchEmbed(self.img_size, self.scales[-1], self.in_chans, self.embed_dim, bias=True,
                                  strict_img_size=self.strict_img_size, backend=self.backend,
                                  prepack=self.prepack, device=weight.device, dtype=weight.dtype)
        merged.proj.weight.copy_(weight)
        merged.proj.bias.copy_(bias)
        merged.train(self.training)
        return merged

    def packed_weight(self) -> Optional[Tensor]:
        """Once fused (:meth:`reparameterize`) with ``prepack=True``: the packed ``proj.weight`` the next call would
        use (see :class:`MergedPatchEmbed`); else None."""
        return self._packed.get(self.proj.weight) if self.prepack and self.fused else None

    def clear_packed(self) -> None:
        """Pack the merged weight again on the next call (after changing it through ``proj.weight.data``)."""
        self._packed.clear()

    @torch.no_grad()
    def reparameterize(self) -> None:
        """In place: become the merged embedding (drop compression/decompression; forward -> ``[B, Nl, D]``)."""
        if self.fused:
            return
        merged = self.fuse()
        self.proj = merged.proj
        self.compress = None
        self.decompress = None
        self.fused = True
        self.patch_size, self.grid_size, self.num_patches = (self.patch_sizes[-1], self.grid_sizes[-1],
                                                             self.num_patches_per_scale[-1])

    def extra_repr(self) -> str:
        return (f"scales={self.scales}, embed_dim={self.embed_dim}, decompress={self.has_decompress}, "
                f"tied_decompress={self.tied_decompress}, fused={self.fused}, backend={self.backend!r}, "
                f"prepack={self.prepack}")
