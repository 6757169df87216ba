"""mcl_kernels: fused kernels and modules for Multi-scale Cooperative Learning (MCL) vision transformers.

Train with :class:`FusedMCLEmbed` (small, compressed-large and reconstructed tokens through one shared
transformer), deploy its merged large-patch embedding (:meth:`FusedMCLEmbed.fuse`) as a plain ViT-/32.
"""
from . import _extension  # noqa: F401  (loads mcl_kernels._C, or warns once why not)
from . import backends, ops, reference  # noqa: F401
from .functional import MCLTokens, embed_tokens, mcl_embed, merge_weights
from .modules import FusedMCLEmbed, MergedPatchEmbed
from . import attention, attention_ops  # noqa: F401  (the attention ops and the drop-in ViT attention)
from .attention import MCLAttention, packed_segments, swap_attention

__version__ = "0.1.0"

__all__ = ["FusedMCLEmbed", "MergedPatchEmbed", "MCLTokens", "mcl_embed", "merge_weights", "embed_tokens",
           "MCLAttention", "swap_attention", "packed_segments", "attention",
           "backends", "ops", "reference"]
