"""The MCL training loss: classification on every branch plus token reconstruction (DESIGN §1).

    loss = w_large·CE(large) + w_small·CE(small) + w_recon·CE(recon) + recon_weight·dist(recon_tokens, small_tokens)

The paper's page names these terms but not their weights, distance or gradient flow. Our reading, each an
option: weight 1 per branch, reconstruction weight 1, mean squared error over all token elements, and the
target (the small tokens) *not* detached, so the reconstruction term also trains the small-patch
embedding. ``CE`` takes hard labels (with optional label smoothing) or soft targets ``[B, classes]`` such
as timm's ``Mixup`` produces (smoothing is then already in the targets and is not applied again).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RECON_LOSSES = ("mse", "l1", "smooth_l1", "cosine")
BRANCHES = ("large", "small", "recon")


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``sum_c -target[b, c] · log_softmax(logits)[b, c]``; ``logits, target [B, C]``."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def recon_distance(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    """Distance between token sets ``[B, N, D]``: ``mse`` / ``l1`` / ``smooth_l1`` (mean over every element)
    or ``cosine`` (mean over tokens of ``1 - cos(recon, target)`` along ``D``)."""
    if kind == "mse":
        return F.mse_loss(recon, target)
    if kind == "l1":
        return F.l1_loss(recon, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(recon, target)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(recon, target, dim=-1)).mean()
    raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {kind!r}")


class MCLLoss(nn.Module):
    """``loss_fn(out, target) -> (loss, parts)``.

    ``out``: an :class:`~mcl_kernels.models.MCLOutput` (or anything with its fields ``large``, ``small``,
    ``recon``, ``small_tokens``, ``recon_tokens``). ``target``: int64 class ids ``[B]`` or float soft targets
    ``[B, classes]``. ``loss``: a float32 scalar. ``parts``: detached float32 scalars ``large``, ``small``,
    ``recon`` (each branch's cross-entropy, unweighted) and ``recon_<distance>`` (e.g. ``recon_mse``, the
    unweighted reconstruction distance). Without decompression (``out.recon is None``) the recon branch and the
    reconstruction term are absent from both.

    Computed in float32 whatever the logits' dtype (autocast), as timm's losses are.
    """

    def __init__(self, label_smoothing: float = 0.0, branch_weights: Sequence[float] = (1.0, 1.0, 1.0),
                 recon_weight: float = 1.0, recon_loss: str = "mse", detach_recon_target: bool = False):
        super().__init__()
        weights = tuple(float(w) for w in branch_weights)
        if len(weights) != 3:
            raise ValueError(f"branch_weights takes 3 weights (large, small, recon branch), got {len(weights)}: "
                             f"{tuple(branch_weights)}")
        if any(w < 0 for w in weights) or recon_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got branch_weights={weights}, recon_weight={recon_weight}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        self.label_smoothing = float(label_smoothing)
        self.branch_weights = weights
        self.recon_weight = float(recon_weight)
        self.recon_loss = recon_loss
        self.detach_recon_target = bool(detach_recon_target)

    def classification(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy of ``logits [B, C]`` against hard ``[B]`` or soft ``[B, C]`` targets (float32)."""
        logits = logits.float()
        if target.dim() == 1:
            if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
                raise TypeError(f"hard targets must be integer class ids [B], got dtype {target.dtype}")
            if target.shape[0] != logits.shape[0]:
                raise ValueError(f"targets [B] have B={target.shape[0]} but the logits are {tuple(logits.shape)}")
            return F.cross_entropy(logits, target.long(), label_smoothing=self.label_smoothing)
        if target.dim() == 2:
            if target.shape != logits.shape:
                raise ValueError(f"soft targets must match the logits [B, classes]: got {tuple(target.shape)} "
                                 f"vs {tuple(logits.shape)}")
            if not target.is_floating_point():
                raise TypeError(f"soft targets [B, classes] must be floating point, got dtype {target.dtype}")
            return soft_cross_entropy(logits, target.float())
        raise ValueError(f"targets must be class ids [B] or soft targets [B, classes], got shape {tuple(target.shape)}")

    def forward(self, out, target: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        parts: Dict[str, Tensor] = {}
        total = None
        for name, weight in zip(BRANCHES, self.branch_weights):
            logits = getattr(out, name)
            if logits is None:
                if name != "recon":
                    raise ValueError(f"the model output has no {name} logits")
                continue
            ce = self.classification(logits, target)
            parts[name] = ce.detach()
            total = weight * ce if total is None else total + weight * ce
        if out.recon_tokens is not None:
            small = out.small_tokens.detach() if self.detach_recon_target else out.small_tokens
            if small.shape != out.recon_tokens.shape:
                raise ValueError(f"small_tokens {tuple(small.shape)} and recon_tokens "
                                 f"{tuple(out.recon_tokens.shape)} must have the same shape [B, N, D]")
            dist = recon_distance(out.recon_tokens.float(), small.float(), self.recon_loss)
            parts[f"recon_{self.recon_loss}"] = dist.detach()
            total = total + self.recon_weight * dist
        return total, parts

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, branch_weights={self.branch_weights}, "
                f"recon_weight={self.recon_weight}, recon_loss={self.recon_loss!r}, "
                f"detach_recon_target={self.detach_recon_target}")


__all__ = ["MCLLoss", "soft_cross_entropy", "recon_distance", "RECON_LOSSES"]
