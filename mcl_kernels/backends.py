"""The backend registry: which implementation runs each op, on which device, and why not.

A backend is a named set of op implementations plus a test of whether it can run on a device.
``backend="auto"`` (or the ``MCL_KERNELS_BACKEND`` environment variable, which sets what "auto"
means) picks, per device type and op, the first available backend in :data:`AUTO_ORDER` (and its
per-op and per-dtype exceptions), or the reference for calls smaller than the measured crossovers in
:data:`AUTO_MIN_TOKENS`; asking for a backend by name either gets exactly that backend or an error
that says why not and how to get it. Backward ops a backend has no kernel for fall back to the reference's
backward: the gradient is defined by the math, not by the forward kernel, so this composition is exact.

Implementation contracts (arguments already validated by `mcl_kernels._checks`; ``needs`` masks
the gradients to compute; absent results are None):

- ``mcl_embed(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k) -> (S, L, R)``
- ``mcl_embed_backward(gS, gL, gR, x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, S, L, k, needs)``
  ``-> 7 gradients`` (``S``, ``L``: the forward's outputs, saved; a kernel may use or recompute them)
- ``mcl_compress(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k) -> (L, R)``
- ``mcl_compress_backward(gL, gR, tokens, comp_w, comp_b, decomp_w, decomp_b, L, grid_h, grid_w, k, needs)``
  ``-> 5 gradients``
- ``embed_tokens(x, weight, bias, cls_token, pos_embed, packed_weight) -> [B, T, D]`` (``packed_weight``: None or
  :func:`mcl_kernels.pack_embed_weight`'s blob of ``weight``, which a backend may read instead of packing the weight
  itself, or ignore)
- ``embed_tokens_backward(g, x, weight, bias, cls_token, pos_embed, needs) -> 5 gradients``
- ``attention(q, k, v, scale) -> (out, lse)``; ``packed_attention(q, k, v, seqlens, scale) -> (out, lse)``
  (``q, k, v [B, H, N, Dh]``; ``lse [B, H, N]`` float32, float64 for float64 inputs)
- ``attention_backward(g_out, q, k, v, out, lse, scale, needs) -> 3 gradients``;
  ``packed_attention_backward(g_out, q, k, v, out, lse, seqlens, scale, needs) -> 3 gradients``
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _extension, reference

ENV_VAR = "MCL_KERNELS_BACKEND"


def _ref_mcl_compress(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k):
    return reference.mcl_level(tokens, (grid_h, grid_w), k, comp_w, comp_b, decomp_w, decomp_b)


def _ref_mcl_compress_backward(g_large, g_recon, tokens, comp_w, comp_b, decomp_w, decomp_b, large, grid_h,
                               grid_w, k, needs):
    return reference.mcl_level_backward(g_large, g_recon, tokens, large, (grid_h, grid_w), k, comp_w, decomp_w,
                                        needs)


def _ref_embed_tokens(x, weight, bias, cls_token, pos_embed, packed_weight):
    return reference.embed_tokens(x, weight, bias, cls_token, pos_embed)


def _ref_attention(q, k, v, scale):
    return reference.attention_forward(q, k, v, (q.shape[2],), scale)


def _ref_attention_backward(g_out, q, k, v, out, lse, scale, needs):
    return reference.attention_backward(g_out, q, k, v, out, lse, (q.shape[2],), scale, needs)


REFERENCE_OPS: Dict[str, Callable] = {
    "mcl_embed": reference.mcl_embed,
    "mcl_embed_backward": reference.mcl_embed_backward,
    "mcl_compress": _ref_mcl_compress,
    "mcl_compress_backward": _ref_mcl_compress_backward,
    "embed_tokens": _ref_embed_tokens,
    "embed_tokens_backward": reference.embed_tokens_backward,
    "attention": _ref_attention,
    "attention_backward": _ref_attention_backward,
    "packed_attention": reference.attention_forward,
    "packed_attention_backward": reference.attention_backward,
}


@dataclass
class Backend:
    """A named set of op implementations and a test of whether they can run on a device."""
    name: str
    ops: Dict[str, Callable]
    unavailable: Callable[[torch.device], Optional[str]]
    """Returns None when the backend runs on the device, else the reason it does not."""
    how_to_get: str
    covers: str = field(default="")


def _native_unavailable(device_type: str) -> Callable[[torch.device], Optional[str]]:
    def check(device: torch.device) -> Optional[str]:
        if _extension._C is None:
            return f"the compiled extension mcl_kernels._C is not loaded ({_extension.IMPORT_ERROR})"
        if device.type != device_type:
            return f"it runs on {device_type} tensors, got tensors on {device}"
        if device_type == "cuda" and not _extension.built_with_cuda():
            return "mcl_kernels._C was built without its CUDA part"
        return None
    return check


def _triton_unavailable(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1, set before import)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on cuda tensors, got tensors on {device}"
    return None


def _native_ops(device_type: str) -> Dict[str, Callable]:
    if _extension._C is None:
        return {}
    C = _extension._C
    ops: Dict[str, Callable] = {
        "embed_tokens": lambda x, w, b, cls, pos, packed: C.embed_tokens(x, w, b, cls, pos, int(w.shape[-1]), packed)}
    # The fused training ops have a C++ kernel for the CPU only (csrc/cpu/mcl_embed.cpp); an extension built
    # before them lacks the functions, and then the reference runs those ops.
    if device_type == "cpu" and hasattr(C, "mcl_embed"):
        ops.update({"mcl_embed": C.mcl_embed, "mcl_embed_backward": C.mcl_embed_backward,
                    "mcl_compress": C.mcl_compress, "mcl_compress_backward": C.mcl_compress_backward})
    return ops


def _triton_ops() -> Dict[str, Callable]:
    # Kernel modules import Triton on first use, not with mcl_kernels: TRITON_INTERPRET=1 (Triton on CPU
    # tensors) only takes effect when set before that import.
    def embed_tokens(x, weight, bias, cls_token, pos_embed, packed_weight):
        from .triton.embed_tokens import embed_tokens as kernel
        return kernel(x, weight, bias, cls_token, pos_embed)

    def mcl_embed(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k):
        from .triton.mcl_embed import mcl_embed as kernel
        return kernel(x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, k)

    def mcl_embed_backward(g_small, g_large, g_recon, x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, small,
                           large, k, needs):
        from .triton.mcl_embed_backward import mcl_embed_backward as kernel
        return kernel(g_small, g_large, g_recon, x, proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b, small, large,
                      k, needs)

    def mcl_compress(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k):
        from .triton.mcl_compress import mcl_compress as kernel
        return kernel(tokens, comp_w, comp_b, decomp_w, decomp_b, grid_h, grid_w, k)

    def mcl_compress_backward(g_large, g_recon, tokens, comp_w, comp_b, decomp_w, decomp_b, large, grid_h, grid_w, k,
                              needs):
        from .triton.mcl_compress import mcl_compress_backward as kernel
        return kernel(g_large, g_recon, tokens, comp_w, comp_b, decomp_w, decomp_b, large, grid_h, grid_w, k, needs)

    def attention(q, k, v, scale):
        from .triton.attention import attention as kernel
        return kernel(q, k, v, scale)

    def attention_backward(g_out, q, k, v, out, lse, scale, needs):
        from .triton.attention import attention_backward as kernel
        return kernel(g_out, q, k, v, out, lse, scale, needs)

    def packed_attention(q, k, v, seqlens, scale):
        from .triton.attention import packed_attention as kernel
        return kernel(q, k, v, seqlens, scale)

    def packed_attention_backward(g_out, q, k, v, out, lse, seqlens, scale, needs):
        from .triton.attention import packed_attention_backward as kernel
        return kernel(g_out, q, k, v, out, lse, seqlens, scale, needs)
    return {"embed_tokens": embed_tokens, "mcl_embed": mcl_embed, "mcl_embed_backward": mcl_embed_backward,
            "mcl_compress": mcl_compress, "mcl_compress_backward": mcl_compress_backward,
            "attention": attention, "attention_backward": attention_backward, "packed_attention": packed_attention,
            "packed_attention_backward": packed_attention_backward}


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", REFERENCE_OPS, lambda device: None,
                         "it is always available", "every op, every device (pure PyTorch)"),
    "cpu": Backend("cpu", _native_ops("cpu"), _native_unavailable("cpu"), _extension.BUILD_HINT,
                   "embed_tokens, mcl_embed and mcl_compress forward and backward (C++)"),
    "cuda": Backend("cuda", _native_ops("cuda"), _native_unavailable("cuda"),
                    _extension.BUILD_HINT + " on a machine with nvcc, and run on a CUDA device",
                    "embed_tokens (CUDA C++)"),
    "triton": Backend("triton", _triton_ops(), _triton_unavailable,
                      "pip install triton; on CPU tensors set TRITON_INTERPRET=1 before importing triton",
                      "embed_tokens, mcl_embed and mcl_compress forward and backward, attention and packed "
                      "attention forward and backward (Triton)"),
}

# First available backend that implements the op wins: per device type, with per-op exceptions where a
# measurement says so. CPU, measured with benchmarks/kernels.py (2-core AMD EPYC with AVX-512/AVX512-BF16,
# 224x224, patch 16 x 2, 2 threads; a shared machine, so +-10% noise; the full D x B grid with torch.compile
# rows: benchmarks/results/kernels-cpu-2core-grid.json, and -grid-2.json since the direct patch kernels): the C++
# kernels (tiled; oneDNN brgemm, and csrc/cpu/patch_gemm.cpp's AVX-512 kernels where the input is read from the
# image) against the eager reference, ratio of times (> 1: C++ faster):
#   mcl_embed forward+backward at B = 64, D = 192 / 384 / 768 (runs of 2026-11-24/25): fp32 1.03-1.37 /
#     0.99-1.15 / 0.98-1.31; bf16 (since its vectorized VNNI im2col) 1.17-1.23 / 1.11-1.17 / 1.01-1.08. Small
#     batches at D >= 384 lose: see AUTO_MIN_TOKENS below.
#   mcl_compress forward+backward (one thread, CPU time, 8x8 -> 4x4 grid, D = 384): 1.05-1.15.
#   embed_tokens, every D in 192-768 and B in 1-64, fp32 and bf16: 1.02-2.8 (its tiles are equal runs of
#     patch rows per thread; whole-image tiles had lost at B = 2-16 in fp32); 1.19-3.19 with the direct
#     kernels (grid-2).
# So "auto" runs the C++ kernels on the CPU for every op they cover, except for the small calls in
# AUTO_MIN_TOKENS.
# CUDA, measured with benchmarks/kernels.py on an H100 80GB HBM3 (torch 2.11, Triton 3.6; bf16, D = 384,
# B = 256, 224x224, patch 16 x 2; benchmarks/results/kernels-h100.json, the latest run; -run1.json before this
# order, -run2.json before the backward's larger GEMM tiles), times in ms:
#   mcl_embed forward: triton 0.60, reference 1.99 (eager autograd).
#   mcl_embed forward+backward: the Triton forward with the reference backward 1.39; all-Triton 1.84 (run 2,
#     before the larger tiles, on another machine: 3.84); eager 3.47, torch.compile of it 2.28. The backward's
#     GPU time alone (profiled, one call): Triton 0.77, the reference 0.64 (cuBLAS and elementwise); and the
#     Triton backward's eleven launches (eight since; not re-measured) cost about 0.8 ms of host time per call
#     against 0.3 for the reference's. So auto pairs the Triton forward with the reference backward (the
#     backward op reads only the forward's outputs, whichever backend made them).
#   embed_tokens: triton 0.12, cuda 0.51, reference 3.02 (timm PatchEmbed + cat + add: 3.04).
#   attention: SDPA beat the Triton op per eager call (forward 0.030 / 0.087 ms at 50 / 197 tokens against
#     0.137 / 0.157; fwd+bwd 0.18 / 0.43 against 1.13 / 0.85: the Python launch path, not the kernel, sets
#     those), so plain attention on auto runs SDPA wherever the reference is auto's pick (attention.py), and the
#     plain attention ops stay on the reference. Packed, the Triton kernel beat SDPA once per branch (fwd+bwd
#     197 + 50 + 197 tokens: 1.54 against 2.30).
# float32 (the same machine; benchmarks/results/kernels-h100-fp32-partial.log, a run cut at its time limit): the
# Triton kernels multiply exactly there (tl.dot's "ieee" FMA path, PyTorch's default of no TF32), and lose to
# cuBLAS: mcl_embed forward 7.17 ms against the reference's 2.32. So on CUDA auto runs the reference for float32
# (and float64) inputs, except embed_tokens, where the CUDA C++ kernel won (below).
# float16 (kernels-h100-fp16.json) ranks like bfloat16: mcl_embed forward triton 0.59 ms, reference 2.00;
# fwd+bwd triton forward + reference backward 1.83, all-Triton 2.76, eager 3.48; embed_tokens triton 0.22,
# cuda 0.53, reference 3.04.
# Not measured on a GPU yet, so the reference stays first: mcl_compress (chain levels after the first) and the
# embed_tokens backward.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}
AUTO_ORDER_PER_OP: Dict[Tuple[str, str], Tuple[str, ...]] = {
    ("cuda", "mcl_embed_backward"): ("reference", "triton"),
    ("cuda", "mcl_compress"): ("reference", "triton"),
    ("cuda", "mcl_compress_backward"): ("reference", "triton"),
    ("cuda", "embed_tokens_backward"): ("reference", "cuda", "triton"),
    ("cuda", "attention"): ("reference", "triton"),
    ("cuda", "attention_backward"): ("reference", "triton"),
}
# Per (device type, input dtype), over the two tables above.
AUTO_ORDER_PER_DTYPE: Dict[Tuple[str, torch.dtype], Tuple[str, ...]] = {
    ("cuda", torch.float32): ("reference",),
    ("cuda", torch.float64): ("reference",),
}
# Per (device type, op, input dtype), over all the tables above. embed_tokens in float32 on the H100
# (benchmarks/results/kernels-h100-fp32-infer.log): cuda 1.13 ms, reference 1.62, triton 1.77 (timm: 1.63).
AUTO_ORDER_PER_OP_DTYPE: Dict[Tuple[str, str, torch.dtype], Tuple[str, ...]] = {
    ("cuda", "embed_tokens", torch.float32): ("cuda", "reference"),
}


# By call size, over all the tables above: (device type, op, input dtype) -> ((widest D, fewest small tokens),
# ...), widths ascending; a call of width D takes the first entry with D <= widest D, and below its token count
# auto runs the reference. Measured on the CPU above (benchmarks/kernels.py, B = 1..64 images of 224x224 at patch
# 16, i.e. 196 small tokens each, D = 192/384/768, three runs of fwd and fwd+bwd; backward = fwd+bwd - fwd):
# the C++ kernels pack their weights once per call (transposed, or VNNI pairs in bf16) and keep fp32 weight-
# gradient accumulators, a fixed cost that a few images do not repay once D is large:
#   mcl_embed forward, reference time / C++ time: fp32 D = 384: B = 1 0.95-0.99, B >= 2 1.00-1.21; D = 768: B = 1
#     0.79-0.83, B = 2 0.88-0.96, B = 4 0.92-1.00, B >= 8 0.99-1.13. bf16 D = 384: B = 1-2 0.68-1.10 (median
#     0.87), B >= 4 0.93-1.25; D = 768: B = 1 0.60-0.88, B = 2 0.74-0.86, B = 4 0.93-1.00, B >= 8 1.02-1.12.
#     D = 192 wins at every batch (1.03-1.51).
#   mcl_embed backward, bf16 (after its vectorized VNNI im2col): D = 384: B <= 4 0.87-0.95, B = 8-16 0.97-0.99,
#     B = 32 1.03, B = 64 1.11; D = 768: B = 1 0.56, B = 2 0.74, B = 4 0.80, B = 8-16 0.90-0.94, B = 32 0.97,
#     B = 64 1.07; D = 192: 0.96-1.17. In fp32 the backward is within noise of the reference at D >= 384
#     (0.86-1.14) and wins at D = 192: it stays on the C++ kernel, whose training step holds about half the
#     reference's memory.
#   embed_tokens and mcl_compress have no size rule: embed_tokens beat the reference at every size measured
#     (1.02-2.8x; 1.19-3.19x with the direct kernels), mcl_compress was measured at one size only. The grid
#     after the direct forward (grid-2) agrees with these crossovers: at B = 1 the fp32 forward runs at 0.79x
#     (D = 384) and 0.78x (D = 768) the reference, and auto runs the reference there.
_ANY_WIDTH = 1 << 62
AUTO_MIN_TOKENS: Dict[Tuple[str, str, torch.dtype], Tuple[Tuple[int, int], ...]] = {
    ("cpu", "mcl_embed", torch.float32): ((192, 0), (384, 2 * 196), (_ANY_WIDTH, 8 * 196)),
    ("cpu", "mcl_embed", torch.bfloat16): ((192, 0), (384, 4 * 196), (_ANY_WIDTH, 8 * 196)),
    ("cpu", "mcl_embed_backward", torch.bfloat16): ((192, 0), (384, 8 * 196), (_ANY_WIDTH, 32 * 196)),
}


def check_name(name: str) -> str:
    """Validate a backend name (``"auto"`` or a registered one) early, e.g. at module construction."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    return name


def requested(name: str) -> str:
    """The backend a call asks for once the environment is taken into account."""
    check_name(name)
    if name == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            if env != "auto" and env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} names an unknown backend; expected 'auto' or one of "
                                 f"{sorted(BACKENDS)}")
            return env
    return name


def _below_min_tokens(op: str, device: torch.device, dtype: Optional[torch.dtype],
                      size: Optional[Tuple[int, int]], amx: bool, avx2: bool = False) -> bool:
    """Whether a call of ``size = (tokens, width)`` is below the size where a kernel measured faster than the
    reference (:data:`AUTO_MIN_TOKENS`, or on an AMX CPU :data:`AUTO_MIN_TOKENS_AMX` and on an AVX2 CPU
    :data:`AUTO_MIN_TOKENS_AVX2` where it has an entry; an AVX2 CPU's entry may be empty: no size rule)."""
    if size is None:
        return False
    rule = AUTO_MIN_TOKENS_AMX.get((op, dtype)) if amx else AUTO_MIN_TOKENS_AVX2.get((op, dtype)) if avx2 else None
    if rule is None:
        rule = AUTO_MIN_TOKENS.get((device.type, op, dtype))
    if rule is None:
        return False
    tokens, width = size
    for widest, fewest in rule:
        if width <= widest:
            return tokens < fewest
    return False


# On CPUs with AMX (Intel Xeon 4th gen and later) the measurements above do not hold, and these tables replace
# them (per op and dtype; a missing entry falls through to the tables above). oneDNN runs the reference's bf16
# GEMMs and convolutions on the AMX tiles, while the C++ kernels' AVX512-BF16 dot products run at about the fp32
# FMA rate there. Measured on a 2-core Intel Xeon VM with AMX-BF16 (benchmarks/results/kernels-cpu-2core-intel-
# amx-grid.json, one run of the full grid, and -1.json, -2.json at D = 384, B = 64; the bf16 grid again with the
# AMX tile kernels: -bf16-tiles.json; 224x224, patch 16 x 2), time of the reference / time of the C++ kernel
# (backward = fwd+bwd - fwd):
#   bf16: embed_tokens 0.30-0.46 (B >= 16) with its AVX512-BF16 kernel, 1.57-2.39 with its AMX tile kernel (bf16,
#     unit W stride, patch a multiple of 16: cpu/amx_patch_gemm.h; B = 1..64, patch 32; patch 16, B = 64: 3.8x
#     timm), so auto runs it where those tiles do (`amx_tiles`), else the reference. mcl_embed forward 0.47-0.56
#     (B >= 16) with its AVX512-BF16 small-token GEMM, 1.00-1.51 with that GEMM on the AMX tiles (the inputs
#     embed_tokens takes there), except D = 768, B = 1 (0.57); backward 0.99-2.17 (all nine D x B, with the tiles;
#     before them 1.29-2.37, except D = 768, B = 1: 0.89). fwd+bwd with the tiles 1.26-1.93x the eager reference
#     (0.88x at D = 768, B = 1), 1.46-2.48x its torch.compile. Without the tiles, the reference forward with the
#     C++ backward (the backward reads only the forward's outputs, whichever backend made them): fwd+bwd
#     1.19-1.80x the eager reference at B >= 16, against 0.94-1.23x all-C++.
#   fp32: mcl_embed forward D = 192 0.98-1.21, D = 384 B = 1 0.64, B >= 16 1.03-1.11, D = 768 0.48-0.77; backward
#     D <= 384 0.99-1.23, D = 768 0.74-0.81; at D = 768 fwd+bwd 0.64-0.85 even with the GEMMs' B rows padded off
#     4 KiB strides (kernels-cpu-2core-intel-d768-padded.json). embed_tokens fp32 1.07-1.26 at every size: it stays
#     on the C++ kernel.
AUTO_ORDER_AMX: Dict[Tuple[str, torch.dtype], Tuple[str, ...]] = {
    ("embed_tokens", torch.bfloat16): ("reference",),
    ("mcl_embed", torch.bfloat16): ("reference",),
}
AUTO_MIN_TOKENS_AMX: Dict[Tuple[str, torch.dtype], Tuple[Tuple[int, int], ...]] = {
    ("mcl_embed", torch.float32): ((192, 0), (384, 16 * 196), (_ANY_WIDTH, _ANY_WIDTH)),
    ("mcl_embed", torch.bfloat16): ((384, 0), (_ANY_WIDTH, 16 * 196)),
    ("mcl_embed_backward", torch.float32): ((384, 0), (_ANY_WIDTH, _ANY_WIDTH)),
    ("mcl_embed_backward", torch.bfloat16): ((384, 0), (_ANY_WIDTH, 16 * 196)),
}


# On CPUs whose widest vectors are AVX2 (no AVX-512, so no bf16 dot products either: AMD Zen 1-3, most Intel client
# cores) neither table above holds, and these replace them (per op and dtype; a missing entry falls through to the
# tables above; AMX CPUs have AVX-512, so the two layers never meet). Measured on a 2-core AMD EPYC (Zen 3, family 25
# model 1; fma_peak.cpp: 101.5 GFLOP/s a core, torch.mm fp32 134 on two) with the AVX2 patch kernels
# (cpu/patch_gemm_avx2.h), 224x224, patch 16 x 2, 2 threads (benchmarks/results/kernels-cpu-2core-zen3-*.json), time
# of the reference / time of the C++ kernel (paired ratios; that VM's speed drifted up to 2x between runs):
#   bf16: torch's bf16 GEMMs and convolutions run at ~1 GFLOP/s there (torch.mm 1.1, against 134 in fp32), while the
#     C++ kernels multiply bf16 at their fp32 rate (brgemm converts; 114-123 GFLOP/s at D = 384, B = 64). mcl_embed
#     forward 19x, forward+backward 28x (21.7x its torch.compile), embed_tokens 30x timm's PatchEmbed (-1.json), and
#     at B = 1 (-bf16-b1.json, D = 192 and 768) 9-16x, 13-18x timm: so bf16 runs the C++ kernels at every size.
#   fp32 (-fp32-grid.json, D = 192/384/768 x B = 1/16/64): mcl_embed forward D = 192 1.03-1.18, D = 384 0.70-0.88
#     (1.16 once at B = 16), D = 768 0.66-0.75; forward+backward D = 192 1.08-1.22, D = 384 0.75-0.86, D = 768
#     0.69-0.75 (the reference's oneDNN GEMMs run at ~98% of torch.mm there): the C++ kernels from D = 192 down, the
#     reference above. Again with the AVX2 tile GEMM, the patch runs across patch rows and dE's packed gradients
#     (-fp32-grid-runs.json): forward D = 192 0.98-1.08, D = 384 0.72-0.99, D = 768 0.64-0.96; forward+backward
#     D = 192 1.00-1.05, D = 384 0.86-0.96, D = 768 0.78-0.89: the same split.
#   embed_tokens fp32 (-fp32-infer-grid-runs.json, -fp32-infer-small-batches-runs.json; patch 32, B = 1..64): with the
#     direct kernel's runs across patch rows, against the reference (conv2d + cat + add), B = 1 0.74-0.85, B = 2
#     0.84-0.95, B = 4 1.04-1.18, B = 8-64 1.03-1.15 (timm's PatchEmbed: 1.03-1.21x from B = 4): the C++ kernel from
#     4 images' patches (4 x 49) up; below, packing the weight for each call cost more than the kernel saved.
#     Before those runs it had lost everywhere (0.85-1.10 of timm, the reference 0.98-1.22). That packing had run
#     the portable transpose loop (cpu/simd.h had no AVX2 path); with AVX2 transposes
#     (-fp32-infer-small-batches-simd.json, B = 1-8, D = 192/384/768): the reference 1.35-1.54 at B = 1, 1.15-1.43 at
#     B = 2-8, timm 1.11-1.72: the C++ kernel at every size.
# No op needs an order of its own on AVX2 CPUs now: the size rules below say where the reference runs.
AUTO_ORDER_AVX2: Dict[Tuple[str, torch.dtype], Tuple[str, ...]] = {}
AUTO_MIN_TOKENS_AVX2: Dict[Tuple[str, torch.dtype], Tuple[Tuple[int, int], ...]] = {
    ("mcl_embed", torch.float32): ((192, 0), (_ANY_WIDTH, _ANY_WIDTH)),
    ("mcl_embed_backward", torch.float32): ((192, 0), (_ANY_WIDTH, _ANY_WIDTH)),
    ("mcl_embed", torch.bfloat16): ((_ANY_WIDTH, 0),),
    ("mcl_embed_backward", torch.bfloat16): ((_ANY_WIDTH, 0),),
}


@functools.lru_cache(maxsize=None)
def cpu_avx2_only() -> bool:
    """Whether this CPU's widest vector instructions are AVX2 + FMA (the C++ extension's patch kernels say which the
    CPU has; without the extension auto runs the reference anyway)."""
    C = _extension._C
    return C is not None and hasattr(C, "patch_gemm_best_isa") and C.patch_gemm_best_isa() == "avx2"


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles that PyTorch (and so oneDNN) can use."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def on_amx_tiles(op: str, x: Tensor, patch: int) -> bool:
    """Whether the C++ kernel of ``op`` runs ``x`` on the AMX tiles, where :data:`AUTO_ORDER_AMX` does not apply:
    ``embed_tokens``, and ``mcl_embed``'s small-token GEMM, on bf16 images with unit W stride and a patch that is a
    multiple of 16 (both read the pixels through cpu/amx_patch_gemm.h, so one query answers for both)."""
    C = _extension._C
    return (op in ("embed_tokens", "mcl_embed") and x.device.type == "cpu" and C is not None
            and C.embed_tokens_cpu_amx(x, patch))


def auto_order(op: str, device: torch.device, dtype: Optional[torch.dtype] = None,
               size: Optional[Tuple[int, int]] = None, amx: Optional[bool] = None,
               amx_tiles: bool = False, avx2: Optional[bool] = None) -> Tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on ``device`` with ``dtype`` inputs, first choice first: the
    reference alone for a call of ``size = (tokens, width)`` below :data:`AUTO_MIN_TOKENS` (on an AMX CPU,
    :data:`AUTO_MIN_TOKENS_AMX` where it has the op), else the most specific table that has an entry (on an AMX
    CPU, :data:`AUTO_ORDER_AMX` unless the call runs on the AMX tiles (``amx_tiles``, :func:`on_amx_tiles`);
    on an AVX2 CPU :data:`AUTO_ORDER_AVX2`; then op and dtype, then dtype, then op, then the device type). ``amx``
    and ``avx2`` override the CPU checks (:func:`cpu_has_amx`, :func:`cpu_avx2_only`)."""
    amx = device.type == "cpu" and (cpu_has_amx() if amx is None else amx)
    avx2 = device.type == "cpu" and not amx and (cpu_avx2_only() if avx2 is None else avx2)
    if _below_min_tokens(op, device, dtype, size, amx, avx2):
        return ("reference",)
    if amx and not amx_tiles and (op, dtype) in AUTO_ORDER_AMX:
        return AUTO_ORDER_AMX[(op, dtype)]
    if avx2 and (op, dtype) in AUTO_ORDER_AVX2:
        return AUTO_ORDER_AVX2[(op, dtype)]
    if dtype is not None:
        if (device.type, op, dtype) in AUTO_ORDER_PER_OP_DTYPE:
            return AUTO_ORDER_PER_OP_DTYPE[(device.type, op, dtype)]
        if (device.type, dtype) in AUTO_ORDER_PER_DTYPE:
            return AUTO_ORDER_PER_DTYPE[(device.type, dtype)]
    return AUTO_ORDER_PER_OP.get((device.type, op), AUTO_ORDER.get(device.type, ("reference",)))


def resolve(op: str, name: str, device: torch.device, dtype: Optional[torch.dtype] = None,
            size: Optional[Tuple[int, int]] = None, amx_tiles: bool = False) -> Callable:
    """The implementation of ``op`` that backend ``name`` runs on ``device`` for ``dtype`` inputs (and, for
    ``auto``, a call of ``size = (tokens, width)`` where the op has a size rule), or a clear error."""
    name = requested(name)
    if name == "auto":
        order = auto_order(op, device, dtype, size, amx_tiles=amx_tiles)
        for candidate in order:
            backend = BACKENDS[candidate]
            if op in backend.ops and backend.unavailable(device) is None:
                return backend.ops[op]
        return REFERENCE_OPS[op]
    backend = BACKENDS[name]
    why = backend.unavailable(device)
    if why is not None:
        raise RuntimeError(f"mcl_kernels backend {name!r} is not available: {why}. To get it: {backend.how_to_get}. "
                           f"Or use backend='auto' / 'reference'.")
    if op in backend.ops:
        return backend.ops[op]
    if op.endswith("_backward"):
        return REFERENCE_OPS[op]
    raise NotImplementedError(f"mcl_kernels backend {name!r} has no kernel for {op} yet (it covers: {backend.covers}); "
                              f"use backend='auto' or 'reference' for this op")


def available(device: torch.device) -> Sequence[str]:
    """Names of the backends that can run on ``device``."""
    return [n for n, b in BACKENDS.items() if b.unavailable(device) is None]
