"""MCL-ViT: a timm vision transformer trained with Multi-scale Cooperative Learning (DESIGN §1, §3).

:class:`MCLViT` wraps a timm ``VisionTransformer`` or ``ConVit`` (``self.vit``): its ``patch_embed`` becomes a
:class:`~mcl_kernels.modules.FusedMCLEmbed` (small patch ``p``, compression ``k``), its ``pos_embed`` stays the
*large*-patch one (so the deployed model's state dict is exactly timm's ViT-/``k·p``), and ``pos_embed_small``
is added for the small scale. The class token (and register tokens) are shared by both scales; everything
else (blocks, norms, pooling, head) is the wrapped timm model's own modules, run by its own code
(``blocks``, ``norm``, ``forward_head``); only the token preparation in front of the blocks is written here.

Training forward: the three token sets of the fused embedding go through the same blocks, one pass per branch.
Small and reconstructed tokens share count and position embedding and could run as one batch of ``2B``; on the
CPU that was measured slower than two passes (a twice-larger activation costs more than twice as much, and the
batch needs a copy), and on a GPU the one-pass path is ``packed=True``.

Packed training (``packed=True``, ViT/DeiT only): the three branches of each image run through the blocks as
ONE sequence ``[B, Ns' + Nl' + Ns', D]`` (small, large, reconstructed; each with its own prefix and position
embedding, ``'`` counting the class/register tokens), one pass instead of two. Every op of a timm block but the
attention acts on each token alone, so the pass is exact once the attention is block-diagonal: the model's
timm ``Attention`` modules are replaced at construction by :class:`~mcl_kernels.attention.MCLAttention`
sharing their parameters (the state dict keeps timm's keys and tensors), which attend within each branch's
segment while :func:`~mcl_kernels.attention.packed_segments` is active. ConViT is rejected: see ``__init__``.

Deployment: :meth:`MCLViT.deploy` returns a plain timm model. ``mode="fast"`` merges the small-patch
embedding and the compression into one patch-``k·p`` embedding (the large branch, the cost of a ViT-/32);
``mode="accurate"`` keeps the small-patch embedding with ``pos_embed_small`` (the small branch, a ViT-/16).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import backends, functional
from ..attention import MCLAttention, packed_segments
from ..modules import FusedMCLEmbed, _check_img_size

try:
    from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
    from timm.models.convit import GPSA, ConVit
    from timm.models.vision_transformer import Block, ParallelThingsBlock, ResPostBlock, VisionTransformer
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError("mcl_kernels.models builds on timm's vision transformers: pip install timm "
                      "(or pip install 'mcl_kernels[timm]')") from exc

try:  # timm >= 1.0.20 records the arguments a model was made with (timm.models.get_model_args)
    from timm.models import get_model_args as _get_model_args
except ImportError:  # pragma: no cover - older timm
    _get_model_args = None

MODES = ("fast", "accurate")
POS_EMBED_INITS = ("resample", "trunc_normal")
_DROP_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate")
# timm ViT blocks whose only token-mixing modules are their ``attn`` attentions (norms, MLPs, layer scale, drop
# path act on each token or each image): with those attentions block-diagonal they run packed branches exactly.
_PACKABLE_BLOCKS = (Block, ResPostBlock, ParallelThingsBlock)


class MCLOutput(NamedTuple):
    """What :meth:`MCLViT.forward` returns, in training and in eval mode.

    ``large``, ``small``, ``recon``: logits ``[B, num_classes]`` of the large-patch (deployed), small-patch and
    reconstructed branches (``recon`` is None without decompression). ``small_tokens [B, Ns, D]`` and
    ``recon_tokens [B, Ns, D]`` (or None) are the embedding's small and reconstructed tokens before the
    position embedding: what the reconstruction loss compares.
    """
    large: Tensor
    small: Tensor
    recon: Optional[Tensor]
    small_tokens: Tensor
    recon_tokens: Optional[Tensor]


def _family(vit: nn.Module) -> str:
    # Exact classes only: a subclass may change the forward (e.g. DeiT's distillation token), which the
    # token preparation below would then silently skip.
    if type(vit) is VisionTransformer:
        return "vit"
    if type(vit) is ConVit:
        return "convit"
    raise TypeError(f"MCLViT wraps timm VisionTransformer or ConVit models, got {type(vit).__module__}."
                    f"{type(vit).__name__}; other models (including subclasses, whose forward may differ) are "
                    f"not supported")


def _square(value, what: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise ValueError(f"MCLViT needs a square {what}, got {tuple(value)}")
    return int(a)


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


class MCLViT(nn.Module):
    """A timm ViT-family model trained with MCL; see the module docstring.

    ``forward(x [B, C, H, W]) -> MCLOutput`` (all three branches, in train and eval mode);
    :meth:`forward_large` / :meth:`forward_small` run one branch (what the deployed models compute);
    :meth:`deploy` returns a plain timm model. Attributes: ``vit`` (the wrapped timm model), ``pos_embed_small``,
    ``num_classes``, ``img_size`` ``(H, W)``, ``in_chans``, ``embed_dim``, ``small_patch``, ``large_patch``,
    ``compress``.

    Construct with :meth:`from_timm` (or :func:`mcl_kernels.models.create_model`). The wrapped model may have
    the large patch (``small_patch·compress``; typical from scratch: its ``pos_embed`` is kept, the small-patch
    embedding and ``pos_embed_small`` are new) or the small patch (e.g. pretrained DeiT-/16 weights: its patch
    embedding becomes the small one and its ``pos_embed`` the small-scale one; the large ``pos_embed`` is new).
    New position embeddings are, per ``pos_embed_init``, resampled from the other scale's (timm's
    ``resample_abs_pos_embed``, bicubic) or drawn like timm's (truncated normal, std 0.02). New
    compression/decompression weights are drawn as timm draws a ViT's ``Linear`` layers (truncated normal,
    std 0.02, zero bias); a new small-patch projection keeps ``Conv2d``'s default initialisation, as timm's
    ``PatchEmbed`` does.

    Supported timm options: class token or none, register tokens, ``no_embed_class``, no position embedding,
    every ``global_pool`` (token, avg, max, map, ...), ``fc_norm``, ``pre_norm`` (then the embedding has no
    biases, like timm's), position/patch dropout, drop path, gradient checkpointing. Rejected with an error:
    ``dynamic_img_size``, ``dynamic_img_pad``, a norm inside the patch embedding, hybrid (CNN) stems, and for
    ConViT non-square token grids (its GPSA attention assumes square ones).

    ``packed=True`` (ViT/DeiT; default False): :meth:`forward` runs the branches as one packed sequence (module
    docstring). The attention modules become :class:`~mcl_kernels.attention.MCLAttention` (same parameters and
    state-dict keys) on ``backend`` where that backend has attention kernels (``reference``, ``triton``), else on
    ``"auto"``; :meth:`forward_large`, :meth:`forward_small` and the re-parameterized model run them unpacked,
    and :meth:`deploy` still returns timm's own modules. Equal to the unpacked forward up to float rounding,
    except for the randomness of regularizers: stochastic depth (``drop_path_rate``) draws one keep/drop per
    packed row, i.e. per image for its three branches together, where the unpacked forward draws one per branch;
    dropout draws from the random stream in a different order. Blocks must be timm's ``Block``, ``ResPostBlock``
    or ``ParallelThingsBlock`` with timm's ``Attention``; other blocks/attentions are rejected with an error.
    ``ConViT`` is rejected too: its GPSA blocks (``local_up_to_layer`` of them, 10 of 12 in the presets) mix
    tokens through a positional attention built for one token grid, so the two grids cannot share a sequence
    there, and packing only the last plain blocks would save little while changing the forward's structure.
    ``model.packed = False`` later runs the unpacked forward with the same (MCLAttention) modules; setting it
    to True on a model built unpacked is refused (its timm attention would attend across the branches).
    """

    def __init__(self, vit: nn.Module, small_patch: int = 16, compress: int = 2, decompress: bool = True,
                 tied_decompress: bool = False, backend: str = "auto", pos_embed_init: str = "resample",
                 packed: bool = False):
        super().__init__()
        family = _family(vit)
        _check_packed(packed)
        if packed and family == "convit":
            raise ValueError("packed=True is not supported for ConViT: its GPSA blocks attend through positional "
                             "scores built for one square token grid, so the small and large branches cannot share "
                             "one packed sequence there; train ConViT with packed=False")
        # Checked (and converted, not yet installed) before the timm model is modified: a rejected model stays
        # as it was.
        packing_plan = self._packing_plan(vit, backend) if packed else []
        if pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f"pos_embed_init must be one of {POS_EMBED_INITS}, got {pos_embed_init!r}")
        small_patch, compress = int(small_patch), int(compress)
        if small_patch < 1 or compress < 2:
            raise ValueError(f"expected small_patch >= 1 and compress >= 2, got small_patch={small_patch}, "
                             f"compress={compress}")
        large_patch = small_patch * compress
        pe = vit.patch_embed
        if type(pe) is not PatchEmbed:
            raise ValueError(f"MCLViT replaces a timm PatchEmbed, but this model's patch_embed is "
                             f"{type(pe).__name__} (hybrid/CNN stems are not supported)")
        if getattr(vit, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False) or not pe.strict_img_size:
            raise ValueError("MCLViT needs a fixed image size: build the timm model without dynamic_img_size / "
                             "dynamic_img_pad (FusedMCLEmbed's position embeddings are per grid)")
        if not isinstance(pe.norm, nn.Identity):
            raise ValueError(f"MCLViT does not support a norm inside the patch embedding ({type(pe.norm).__name__}): "
                             f"it would not re-parameterize into one linear embedding")
        model_patch = _square(pe.patch_size, "patch size")
        if model_patch not in (small_patch, large_patch):
            raise ValueError(f"the timm model's patch size {model_patch} must be the small patch {small_patch} or the "
                             f"large patch {large_patch} (= small_patch {small_patch} x compress {compress})")
        img_size = tuple(int(s) for s in pe.img_size)
        if img_size[0] % large_patch or img_size[1] % large_patch:
            raise ValueError(f"img_size {img_size} must be a multiple of the large patch {large_patch}")
        grid_small = (img_size[0] // small_patch, img_size[1] // small_patch)
        grid_large = (img_size[0] // large_patch, img_size[1] // large_patch)
        if family == "convit" and grid_small[0] != grid_small[1]:
            raise ValueError(f"ConViT's GPSA attention assumes a square token grid; img_size {img_size} gives "
                             f"{grid_small} and {grid_large}")
        # What timm needs to rebuild the wrapped model (read before anything is replaced), for deploy_config.
        timm_args = self._recorded_args(vit)

        proj = pe.proj
        has_bias = proj.bias is not None
        dd = {"device": proj.weight.device, "dtype": proj.weight.dtype}
        embed = FusedMCLEmbed(img_size, small_patch, compress, proj.in_channels, proj.out_channels,
                              decompress=decompress, tied_decompress=tied_decompress, backend=backend,
                              bias=has_bias, **dd)
        with torch.no_grad():
            if model_patch == small_patch:
                embed.proj.load_state_dict(proj.state_dict())
            linears = [embed.compress] + ([embed.decompress] if decompress and not tied_decompress else [])
            for lin in linears:
                trunc_normal_(lin.weight, std=.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            if decompress and tied_decompress:
                nn.init.zeros_(embed.decompress.bias)
            if not has_bias:
                # timm drops the patch-embedding bias (pre_norm models); the merged bias b_c + W_c·b_s must
                # then vanish, so the compression has no bias either.
                embed.compress.bias = None

        # Position embeddings: vit.pos_embed becomes the large-scale one, pos_embed_small the small-scale one.
        pos = getattr(vit, "pos_embed", None)
        prefix = self._pos_prefix(vit, family)
        if pos is not None:
            have, want = (grid_small, grid_large) if model_patch == small_patch else (grid_large, grid_small)
            with torch.no_grad():
                if pos_embed_init == "resample":
                    other = resample_abs_pos_embed(pos.detach(), new_size=list(want), old_size=list(have),
                                                   num_prefix_tokens=prefix)
                else:
                    other = trunc_normal_(torch.empty(1, prefix + want[0] * want[1], pos.shape[-1], **dd), std=.02)
            other = nn.Parameter(other.to(**dd).contiguous(), requires_grad=pos.requires_grad)
            if model_patch == small_patch:
                vit.pos_embed, self.pos_embed_small = other, nn.Parameter(pos.detach().clone(),
                                                                          requires_grad=pos.requires_grad)
            else:
                self.pos_embed_small = other
        else:
            self.pos_embed_small = None
        vit.patch_embed = embed
        if family == "convit":
            vit.num_patches = grid_large[0] * grid_large[1]

        self.vit = vit
        self.family = family
        self.small_patch, self.large_patch, self.compress = small_patch, large_patch, compress
        self.img_size = img_size
        self.in_chans = proj.in_channels
        self.embed_dim = proj.out_channels
        self.has_decompress, self.tied_decompress = decompress, tied_decompress
        self._embed_bias = has_bias
        self.pretrained_cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
        self._timm_name: Optional[str] = self.pretrained_cfg.get("architecture")
        self._timm_names: Dict[str, Optional[str]] = {}  # per deploy mode, set by create_model's presets
        self._timm_args = timm_args
        self._rel_indices: Dict[Tuple, Tensor] = {}
        # Packing is exact only once every attention is an MCLAttention: settable later only on such a model.
        self._packable = packed
        self.packed = packed
        # The replaced timm attention modules (sharing their submodules, hence parameters, with the MCLAttention
        # that took their place), kept outside the module tree (a plain list: no duplicate state-dict entries) so
        # that deploy() can hand out timm's own modules.
        self._timm_attention: List[Tuple[str, nn.Module]] = []
        for parent, attr, original, replacement in packing_plan:
            setattr(parent, attr, replacement)
        if packing_plan:
            paths = {id(m): name for name, m in vit.named_modules()}
            self._timm_attention = [(paths[id(r)], o) for _, _, o, r in packing_plan]

    @classmethod
    def from_timm(cls, timm_model: nn.Module, small_patch: int = 16, compress: int = 2, decompress: bool = True,
                  tied_decompress: bool = False, backend: str = "auto", pos_embed_init: str = "resample",
                  packed: bool = False) -> "MCLViT":
        """Wrap ``timm_model`` (a timm ``VisionTransformer`` or ``ConVit`` with patch ``small_patch`` or
        ``small_patch·compress``) for MCL training. The timm model is taken over, not copied: its
        ``patch_embed`` (and possibly ``pos_embed``, and with ``packed=True`` its attention modules) are replaced
        in place."""
        return cls(timm_model, small_patch=small_patch, compress=compress, decompress=decompress,
                   tied_decompress=tied_decompress, backend=backend, pos_embed_init=pos_embed_init, packed=packed)

    # ---- construction helpers ----

    @staticmethod
    def _pos_prefix(vit: nn.Module, family: str) -> int:
        """Leading (class/register) entries of ``pos_embed``: ConViT adds it before the class token exists."""
        if family == "convit" or getattr(vit, "no_embed_class", False):
            return 0
        return int(vit.num_prefix_tokens)

    @staticmethod
    def _packing_plan(vit: nn.Module, backend: str) -> List[Tuple[nn.Module, str, nn.Module, MCLAttention]]:
        """``(parent, attribute, timm attention, MCLAttention sharing its parameters)`` for every attention in
        ``vit.blocks``, or an error naming the block that cannot run packed."""
        backends.check_name(backend)
        # The embedding's backend runs the attention too where it has attention kernels; the C++ backends have
        # none, and "auto" then picks per device.
        attn_backend = backend if backend == "auto" or "packed_attention" in backends.BACKENDS[backend].ops else "auto"
        plan = []
        for i, blk in enumerate(vit.blocks):
            if type(blk) not in _PACKABLE_BLOCKS:
                raise ValueError(f"packed=True needs timm blocks whose only token mixing is their attention "
                                 f"({', '.join(c.__name__ for c in _PACKABLE_BLOCKS)}); block {i} is "
                                 f"{type(blk).__module__}.{type(blk).__name__}")
            for name, attn in blk.named_modules():
                if name.rpartition(".")[2] != "attn" or isinstance(attn, MCLAttention):
                    continue
                try:
                    new = MCLAttention.from_timm(attn, attn_backend)
                except TypeError as exc:
                    raise ValueError(f"packed=True runs the attention as mcl_kernels.MCLAttention, which replaces "
                                     f"timm's Attention only; blocks.{i}.{name} is {type(attn).__name__}: {exc}"
                                     ) from exc
                parent_name, _, attr = name.rpartition(".")
                plan.append((blk.get_submodule(parent_name) if parent_name else blk, attr, attn, new))
        return plan

    @contextlib.contextmanager
    def _timm_attention_installed(self) -> Iterator[None]:
        """Within the block, the wrapped model holds timm's own attention modules again (see ``__init__``)."""
        swapped = []
        try:
            for path, original in self._timm_attention:
                parent_name, _, attr = path.rpartition(".")
                parent = self.vit.get_submodule(parent_name)
                swapped.append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, original)
            yield
        finally:
            for parent, attr, current in swapped:
                setattr(parent, attr, current)

    @staticmethod
    def _recorded_args(vit: nn.Module) -> Dict[str, Any]:
        if _get_model_args is not None:
            try:
                args = dict(_get_model_args(vit))
            except Exception:  # noqa: BLE001 - a model timm cannot describe: fall back to what it recorded
                args = dict(getattr(vit, "_model_args", {}) or {})
        else:  # pragma: no cover - older timm
            args = dict(getattr(vit, "_model_args", {}) or {})
        # Regularization only matters while training: a deployed model is rebuilt without it.
        return {k: v for k, v in args.items() if k not in _DROP_ARGS and not k.endswith("_drop_rate")}

    # ---- timm-compatible attributes ----

    @property
    def packed(self) -> bool:
        """Whether :meth:`forward` runs the branches as one packed sequence (see the class docstring)."""
        return self._packed

    @packed.setter
    def packed(self, value: bool) -> None:
        _check_packed(value)
        if value and not self._packable:
            # timm's attention would attend across the branches: a silently different model.
            raise ValueError("this MCLViT was built with packed=False, so its attention modules are timm's, which "
                             "attend across the packed branches; build it with packed=True (create_model(..., "
                             "packed=True) or MCLViT.from_timm(..., packed=True))")
        self._packed = value

    @property
    def num_classes(self) -> int:
        return int(self.vit.num_classes)

    @property
    def embedding(self) -> FusedMCLEmbed:
        """The fused MCL embedding (``self.vit.patch_embed``)."""
        return self.vit.patch_embed

    @property
    def is_deployed(self) -> bool:
        """True once the embedding was merged in place (``timm.utils.reparameterize_model``)."""
        pe = self.vit.patch_embed
        return not isinstance(pe, FusedMCLEmbed) or pe.fused

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Position embeddings and prefix tokens are not decayed (timm's ViT recipe), at both scales."""
        own = self.vit.no_weight_decay() if hasattr(self.vit, "no_weight_decay") else set()
        return {"vit." + n for n in own} | {"pos_embed_small"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise learning-rate decay: the embedding stem, then each block."""
        return dict(stem=r"^vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)|^pos_embed_small",
                    blocks=[(r"^vit\.blocks\.(\d+)", None), (r"^vit\.norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.vit.reset_classifier(num_classes, global_pool)

    # ---- forward ----

    def forward(self, x: Tensor):
        """``x [B, C, H, W]`` -> :class:`MCLOutput` (every branch). After an in-place re-parameterization
        (``timm.utils.reparameterize_model``) the model is a deployed one: logits ``[B, num_classes]``."""
        if self.is_deployed:
            return self.vit(x)
        tokens = self.vit.patch_embed(x)
        if self.packed:
            large, small, recon = self._packed_branches(tokens.small, tokens.large, tokens.recon)
            return MCLOutput(large, small, recon, tokens.small, tokens.recon)
        # One pass per branch, not one over 2B sequences for small + reconstructed: DeiT-S's 12 blocks, forward
        # and backward, took 12.7 s on [64, 197, 384] against 2 x 5.5 s on [32, 197, 384] (2-core CPU, fp32),
        # and the 2B batch needs a copy; on a GPU, packed=True is the one-pass path.
        large = self._branch(tokens.large, self.vit.pos_embed if self._has_pos else None)
        small = self._branch(tokens.small, self.pos_embed_small)
        recon = None if tokens.recon is None else self._branch(tokens.recon, self.pos_embed_small)
        return MCLOutput(large, small, recon, tokens.small, tokens.recon)

    def _packed_branches(self, small: Tensor, large: Tensor, recon: Optional[Tensor]
                         ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Patch tokens ``small [B, Ns, D]``, ``large [B, Nl, D]``, ``recon [B, Ns, D]`` (or None) -> their logits
        ``[B, num_classes]``, through the blocks as one packed sequence ``[B, Ns' + Nl' + Ns', D]``."""
        vit = self.vit
        branches = [(small, self.pos_embed_small), (large, vit.pos_embed if self._has_pos else None)]
        if recon is not None:
            branches.append((recon, self.pos_embed_small))
        # Prefix, position embedding and patch dropout per branch (patch dropout keeps a fixed count per branch);
        # the segment lengths are read after it.
        seqs = [vit.patch_drop(self._vit_prefix_and_pos(t, pos)) for t, pos in branches]
        seqlens = [int(s.shape[1]) for s in seqs]
        x = vit.norm_pre(torch.cat(seqs, dim=1))
        if vit.grad_checkpointing and not torch.jit.is_scripting():
            from torch.utils.checkpoint import checkpoint
            # Each block's recomputation in the backward must attend packed too: the packing is set inside the
            # checkpointed function, not around it (it is gone by the time the backward runs).
            for blk in vit.blocks:
                x = checkpoint(_run_packed, blk, x, seqlens, use_reentrant=False)
        else:
            with packed_segments(vit.blocks, seqlens):
                x = vit.blocks(x)
        x = vit.norm(x)
        logits = [vit.forward_head(part) for part in x.split(seqlens, dim=1)]
        return logits[1], logits[0], (logits[2] if recon is not None else None)

    def forward_large(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of the large-patch branch only, computed as the deployed ``fast`` model
        computes them (merged embedding; the cost of a plain ViT-/``large_patch``)."""
        pe = self.vit.patch_embed
        _check_img_size(pe, x, self.large_patch)
        weight, bias = self._merged_weights()
        # Merged in place (is_deployed), the embedding's prepacked weight where it was built with prepack=True.
        tokens = functional.embed_tokens(x, weight, bias, backend=pe.backend, packed_weight=pe.packed_weight())
        return self._branch(tokens, self.vit.pos_embed if self._has_pos else None)

    def _merged_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The large-patch embedding ``(weight [D, C, P, P], bias [D] or None)``, merged or already merged."""
        pe = self.vit.patch_embed
        if isinstance(pe, FusedMCLEmbed):
            weight, bias = pe.merged_weights()
        else:  # MergedPatchEmbed, from timm.utils.reparameterize_model
            weight, bias = pe.proj.weight, pe.proj.bias
        # Without biases (pre_norm models) the merged bias is zeros by construction: timm's embedding has none.
        return weight, (bias if self._embed_bias else None)

    def forward_small(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of the small-patch branch only (what the deployed ``accurate`` model
        computes)."""
        if self.is_deployed:
            raise RuntimeError("this MCLViT was re-parameterized in place: only the large branch is left "
                               "(deploy(mode='accurate') before re-parameterizing to keep the small one)")
        pe = self.vit.patch_embed
        _check_img_size(pe, x, self.large_patch)
        tokens = functional.embed_tokens(x, pe.proj.weight, pe.proj.bias, backend=pe.backend)
        return self._branch(tokens, self.pos_embed_small)

    @property
    def _has_pos(self) -> bool:
        return getattr(self.vit, "pos_embed", None) is not None

    def _branch(self, tokens: Tensor, pos_embed: Optional[Tensor]) -> Tensor:
        """Patch tokens ``[B, N, D]`` of one scale (with that scale's position embedding) -> logits."""
        if self.family == "convit":
            return self._convit_branch(tokens, pos_embed)
        vit = self.vit
        x = self._vit_prefix_and_pos(tokens, pos_embed)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        if vit.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        x = vit.norm(x)
        return vit.forward_head(x)

    def _vit_prefix_and_pos(self, x: Tensor, pos_embed: Optional[Tensor]) -> Tensor:
        """timm ``VisionTransformer._pos_embed`` with this scale's position embedding (fixed image size)."""
        vit = self.vit
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
        if pos_embed is None:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        elif vit.no_embed_class:  # DeiT-3 style: the prefix tokens get no position embedding
            x = x + pos_embed
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:
            x = torch.cat(prefix + [x], dim=1) if prefix else x
            x = x + pos_embed
        return vit.pos_drop(x)

    def _convit_branch(self, tokens: Tensor, pos_embed: Optional[Tensor]) -> Tensor:
        """timm ``ConVit.forward_features`` + ``forward_head`` from patch tokens: position embedding, GPSA
        blocks, then the class token joins for the remaining blocks."""
        vit = self.vit
        x = tokens if pos_embed is None else tokens + pos_embed
        x = vit.pos_drop(x)
        self._set_rel_indices(x.shape[1], x)
        for u, blk in enumerate(vit.blocks):
            if u == vit.local_up_to_layer and vit.cls_token is not None:
                x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = blk(x)
        x = vit.norm(x)
        return vit.forward_head(x)

    def _set_rel_indices(self, n: int, like: Tensor) -> None:
        """GPSA recomputes its relative-position table (on the host) whenever the token count changes; MCL
        alternates two counts every step, so both tables are cached here and handed to every GPSA block."""
        gpsa = [m for m in self.vit.blocks.modules() if isinstance(m, GPSA)]
        if not gpsa:
            return
        key = (n, gpsa[0].qk.weight.device, gpsa[0].qk.weight.dtype)
        table = self._rel_indices.get(key)
        if table is None:
            table = self._rel_indices[key] = gpsa[0].get_rel_indices(n)
        for m in gpsa:
            m.rel_indices = table

    # ---- deployment ----

    def deploy_config(self, mode: str = "fast") -> Dict[str, Any]:
        """``{"timm_name": str or None, "kwargs": dict}`` such that ``timm.create_model(timm_name, **kwargs,
        checkpoint_path=p)`` builds the model :meth:`deploy` returns and loads its saved state dict. The kwargs
        are JSON-serialisable and always include ``patch_size``, ``img_size``, ``in_chans`` and
        ``num_classes``. ``timm_name`` is None when the wrapped model was not made by ``timm.create_model``
        (then build the same class with the same arguments and ``patch_size``)."""
        _check_mode(mode)
        kwargs = dict(self._timm_args)
        kwargs.update(patch_size=self.large_patch if mode == "fast" else self.small_patch,
                      img_size=self.img_size[0] if self.img_size[0] == self.img_size[1] else list(self.img_size),
                      in_chans=self.in_chans, num_classes=self.num_classes)
        if hasattr(self.vit, "global_pool") and "global_pool" in kwargs:
            kwargs["global_pool"] = self.vit.global_pool
        name = self._timm_names.get(mode, self._timm_name)
        return {"timm_name": name, "kwargs": {k: _jsonable(v) for k, v in kwargs.items()}}

    @torch.no_grad()
    def deploy(self, mode: str = "fast") -> nn.Module:
        """A plain timm model of the same family (weights copied, this model untouched).

        ``fast``: patch ``large_patch``, the merged embedding ``E_l`` (DESIGN §2) and the large ``pos_embed``:
        computes :meth:`forward_large`. ``accurate``: patch ``small_patch``, the small-patch projection and
        ``pos_embed_small``: computes :meth:`forward_small`. Its state dict has exactly timm's keys; its
        ``pretrained_cfg["architecture"]`` and recorded arguments are those of :meth:`deploy_config`, so
        timm's own tools (``timm.models.get_model_args``, ``push_to_hf_hub``) describe it correctly.
        The model is returned in this model's train/eval mode.
        """
        _check_mode(mode)
        if self.is_deployed and mode == "accurate":
            raise RuntimeError("this MCLViT was re-parameterized in place: the small-patch branch is gone")
        pe = self.vit.patch_embed
        if mode == "fast":
            weight, bias = self._merged_weights()
            pos, patch = (self.vit.pos_embed if self._has_pos else None), self.large_patch
        else:
            weight, bias, pos, patch = pe.proj.weight, pe.proj.bias, self.pos_embed_small, self.small_patch
        has_bias = self._embed_bias
        # Copy the timm model without the MCL embedding (swapped out for the copy, then put back) and with timm's
        # own attention modules (a packed model's MCLAttention share their parameters).
        self.vit.patch_embed = nn.Identity()
        try:
            with self._timm_attention_installed():
                deployed = copy.deepcopy(self.vit)
        finally:
            self.vit.patch_embed = pe
        new_pe = PatchEmbed(self.img_size, patch, self.in_chans, self.embed_dim, bias=has_bias,
                            device=weight.device, dtype=weight.dtype)
        new_pe.proj.weight.copy_(weight)
        if has_bias:
            new_pe.proj.bias.copy_(bias)
        deployed.patch_embed = new_pe
        if pos is not None:
            deployed.pos_embed = nn.Parameter(pos.detach().clone(), requires_grad=pos.requires_grad)
        if self.family == "convit":
            deployed.num_patches = new_pe.num_patches
            n = new_pe.num_patches
            for m in deployed.modules():
                if isinstance(m, GPSA):
                    m.rel_indices = m.get_rel_indices(n)
        for info in getattr(deployed, "feature_info", None) or []:
            if isinstance(info, dict) and "reduction" in info:
                info["reduction"] = patch
        cfg = self.deploy_config(mode)
        deployed._model_args = dict(cfg["kwargs"])
        deployed.pretrained_cfg = dict(self.pretrained_cfg, architecture=cfg["timm_name"])
        if hasattr(deployed, "default_cfg"):  # timm's older alias of pretrained_cfg
            deployed.default_cfg = deployed.pretrained_cfg
        for p in deployed.parameters():  # deepcopy carries the training model's gradients along
            p.grad = None
        deployed.train(self.training)
        return deployed

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """``deploy("fast")``: lets ``timm.utils.reparameterize_model`` turn a model holding an MCLViT (an EMA
        wrapper, ``nn.Sequential``, ...) into one holding the deployed ViT. On an MCLViT itself timm's function
        merges the embedding in place instead (see :attr:`is_deployed`)."""
        return self.deploy("fast")

    def extra_repr(self) -> str:
        return (f"family={self.family!r}, small_patch={self.small_patch}, large_patch={self.large_patch}, "
                f"img_size={self.img_size}, decompress={self.has_decompress}, tied_decompress={self.tied_decompress}, "
                f"packed={self.packed}")


def _run_packed(blk: nn.Module, x: Tensor, seqlens: Sequence[int]) -> Tensor:
    with packed_segments(blk, seqlens):
        return blk(x)


def _check_packed(packed) -> None:
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be True or False, got {packed!r}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"deploy mode must be one of {MODES} ('fast': large patch, the merged embedding; "
                         f"'accurate': small patch), got {mode!r}")


__all__ = ["MCLViT", "MCLOutput", "MODES", "POS_EMBED_INITS"]
