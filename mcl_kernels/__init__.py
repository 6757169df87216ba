"""mcl_kernels: fused kernels and modules for Multi-scale Cooperative Learning (MCL) vision transformers.

Train with :class:`FusedMCLEmbed` (small, compressed-large and reconstructed tokens through one shared
transformer), deploy its merged large-patch embedding (:meth:`FusedMCLEmbed.fuse`) as a plain ViT-/32.
"""
from . import _extension  # noqa: F401  (loads mcl_kernels._C, or warns once why not)
from . import backends, ops, reference  # noqa: F401
from .functional import MCLTokens, embed_tokens, mcl_embed, merge_weights
from .modules import FusedMCLEmbed, MergedPatchEmbed, swap_patch_embed
from .prepack import PackedEmbedWeight, pack_embed_weight
from . import attention, attention_ops  # noqa: F401  (the attention ops and the drop-in ViT attention)
from .attention import MCLAttention, packed_segments, swap_attention
from .loss import MCLLoss

__version__ = "0.1.0"


def __getattr__(name: str):
    # The models need timm (an optional dependency): imported on first use, not with the package.
    if name in ("models", "create_model", "list_models", "MCLViT", "MCLOutput"):
        import importlib
        models = importlib.import_module(".models", __name__)
        return models if name == "models" else getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FusedMCLEmbed", "MergedPatchEmbed", "MCLTokens", "mcl_embed", "merge_weights", "embed_tokens",
           "pack_embed_weight", "PackedEmbedWeight", "swap_patch_embed",
           "MCLAttention", "swap_attention", "packed_segments", "attention",
           "MCLLoss", "create_model", "list_models", "MCLViT", "MCLOutput",
           "backends", "ops", "reference"]
