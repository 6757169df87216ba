"""MCL vision transformers: named presets, the generic timm wrapper, deployment and export.

    from mcl_kernels.models import create_model
    model = create_model("mcl_deit_small_patch32_224", num_classes=10)      # MCLViT, small patch 16 -> 32
    out = model(x)                                   # MCLOutput(large, small, recon, small_tokens, recon_tokens)
    fast = model.deploy("fast")                      # timm ViT-S/32: the large branch
    accurate = model.deploy("accurate")              # timm DeiT-S/16: the small branch

timm is required (``pip install timm``); :mod:`mcl_kernels` itself imports without it.
"""
from __future__ import annotations

from typing import Dict, List

from .mcl_vit import MODES, POS_EMBED_INITS, MCLOutput, MCLViT

# name -> timm model trained (built at the large patch), timm names of the deployed fast / accurate models.
# DeiT and ViT of one size share the architecture; timm registers ViT-/32 for S and B but not for Ti, whose
# fast model is therefore timm's vit_tiny_patch16_224 built with patch_size=32 (deploy_config says so).
_PRESETS: Dict[str, Dict[str, str]] = {
    "mcl_deit_tiny_patch32_224": {"base": "deit_tiny_patch16_224", "fast": "vit_tiny_patch16_224",
                                  "accurate": "deit_tiny_patch16_224"},
    "mcl_deit_small_patch32_224": {"base": "deit_small_patch16_224", "fast": "vit_small_patch32_224",
                                   "accurate": "deit_small_patch16_224"},
    "mcl_deit_base_patch32_224": {"base": "deit_base_patch16_224", "fast": "vit_base_patch32_224",
                                  "accurate": "deit_base_patch16_224"},
    "mcl_convit_tiny_patch32_224": {"base": "convit_tiny", "fast": "convit_tiny", "accurate": "convit_tiny"},
    "mcl_convit_small_patch32_224": {"base": "convit_small", "fast": "convit_small", "accurate": "convit_small"},
    "mcl_convit_base_patch32_224": {"base": "convit_base", "fast": "convit_base", "accurate": "convit_base"},
}
_MCL_KWARGS = ("small_patch", "compress", "decompress", "tied_decompress", "pos_embed_init", "packed")


def list_models() -> List[str]:
    """Names :func:`create_model` accepts."""
    return sorted(_PRESETS)


def create_model(name: str, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3,
                 backend: str = "auto", **kwargs) -> MCLViT:
    """A freshly initialised :class:`MCLViT` by preset name (see :func:`list_models`).

    The preset fixes the timm architecture (DeiT-Ti/S/B widths, or ConViT-Ti/S/B) at small patch 16 compressed
    ×2 to 32. MCL options (``small_patch``, ``compress``, ``decompress``, ``tied_decompress``,
    ``pos_embed_init``, default ``"trunc_normal"``: both position embeddings drawn as timm draws one; ``packed``,
    default False: all branches through the blocks in one packed pass, DeiT presets only) go to :class:`MCLViT`;
    every other keyword goes to the timm constructor (``drop_path_rate``, ``embed_dim``, ``depth``,
    ``num_heads``, ``global_pool``, ...). No weights are downloaded: to start from pretrained timm
    weights, build that model yourself and wrap it with :meth:`MCLViT.from_timm`.
    """
    import timm

    if name not in _PRESETS:
        raise ValueError(f"unknown MCL model {name!r}; expected one of {list_models()}")
    if kwargs.pop("pretrained", False):
        raise ValueError("create_model builds untrained MCL models (nothing is downloaded); for pretrained weights "
                         "use MCLViT.from_timm(timm.create_model(<name>, pretrained=True), ...)")
    mcl = {k: kwargs.pop(k) for k in _MCL_KWARGS if k in kwargs}
    mcl.setdefault("pos_embed_init", "trunc_normal")
    small_patch, compress = int(mcl.pop("small_patch", 16)), int(mcl.pop("compress", 2))
    preset = _PRESETS[name]
    vit = timm.create_model(preset["base"], pretrained=False, num_classes=num_classes, img_size=img_size,
                            in_chans=in_chans, patch_size=small_patch * compress, **kwargs)
    model = MCLViT.from_timm(vit, small_patch=small_patch, compress=compress, backend=backend, **mcl)
    model._timm_names = {"fast": preset["fast"], "accurate": preset["accurate"]}
    model.mcl_name = name
    return model


__all__ = ["create_model", "list_models", "MCLViT", "MCLOutput", "MODES", "POS_EMBED_INITS"]
