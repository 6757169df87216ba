"""The inference embedding's weight packed once for the CPU kernels, instead of on every call.

The CPU ``embed_tokens`` kernels multiply by the weight in a packed layout (panels of its transpose) and pack it
afresh on every call. At batch 1 that copy (bf16: and the conversion to fp32 on AVX2 CPUs) is a large part of the
call: packed once instead, the call ran 1.22-1.42x faster in fp32 and 1.75-2.12x in bf16 (patch 32, D = 192-768,
2 threads, AMD EPYC Zen 3; ``csrc/cpu/embed_prepack.h``), and 1.0-1.1x from batch 16 up. A deployed model's
weight does not change between calls, so it can be packed once: :func:`pack_embed_weight` makes the blob and
``embed_tokens(..., packed_weight=blob)`` reads the weight from it. :class:`PackedEmbedWeight` keeps the blob for
a module (``MergedPatchEmbed(prepack=True)``), packing again whenever the weight is another tensor or was changed
in place.

A blob is only ever a shortcut: the kernel checks that it holds this weight (sizes, data pointer, version counter)
in the layout the call's path reads on this CPU, and packs the weight itself otherwise. The one change it cannot
see is one made through a tensor that does not share the weight's version counter (``weight.data.copy_(...)``):
pack again (:meth:`PackedEmbedWeight.clear`) after editing weights that way.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from . import _extension


def pack_embed_weight(weight: Tensor) -> Optional[Tensor]:
    """``weight [D, C, P, P]`` packed for the CPU ``embed_tokens`` kernels as they read it for contiguous images of
    its dtype on this CPU: a 1-D uint8 tensor to pass as ``packed_weight``. None where a blob would not be used: a
    weight not on the CPU, no compiled extension, a path that packs nothing (float16 and float64 run through
    patch-matrix tiles), or an inference tensor (made under ``torch.inference_mode``: no version counter to tell a
    change by)."""
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"expected a patch embedding weight [D, C, P, P], got {got}")
    C = _extension._C
    if weight.device.type != "cpu" or C is None or not hasattr(C, "embed_tokens_pack"):
        return None
    with torch.no_grad():
        blob = C.embed_tokens_pack(weight.detach())  # detach: the same memory and version counter
    return blob if blob.numel() else None


class PackedEmbedWeight:
    """A module's embedding weight, packed once: :meth:`get` returns the blob for ``weight``, packed on first use and
    again when ``weight`` is another tensor than last time or its version counter moved on (an in-place change:
    ``load_state_dict``, an optimizer step, ``copy_`` under ``no_grad``).

    It packs only where packing ahead can pay: CPU weights in eager calls that will not backpropagate into the weight
    (evaluation and deployment); elsewhere (a training forward, ``torch.compile`` / ``torch.export`` tracing, other
    devices) it returns None and the kernel packs per call as without it. Not part of the state dict; dropped when
    pickled (packed again on first use).
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget the blob (pack again on the next call): after changing the weight through ``weight.data``."""
        self._weight: Optional[weakref.ReferenceType] = None
        self._version: Optional[int] = None
        self._blob: Optional[Tensor] = None

    def get(self, weight: Tensor) -> Optional[Tensor]:
        if (weight.device.type != "cpu" or torch.compiler.is_compiling() or weight.is_inference()
                or (weight.requires_grad and torch.is_grad_enabled())):
            return None
        # The weak reference: a new weight tensor is never taken for the old one, even at the same address.
        if self._weight is None or self._weight() is not weight or self._version != weight._version:
            self._blob = pack_embed_weight(weight)
            self._weight, self._version = weakref.ref(weight), weight._version
        return self._blob

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()

    def __repr__(self) -> str:
        held = "empty" if self._blob is None else f"{self._blob.numel()} bytes"
        return f"PackedEmbedWeight({held})"
