"""The CPU kernels' GEMM calls with operands in L2 against operands streamed from L3, one thread, on each path.

``benchmarks/cpu_phases.py`` reports the training kernel's GEMM phases at 90-95% of the machine's FMA limit in a
step. This measures the same single-threaded calls (``csrc/cpu/tile_gemm.h``: oneDNN brgemm, and where the CPU has
AVX2 ``csrc/cpu/gemm_avx2.h``'s kernel, which the kernels use on AVX2-only CPUs) at the shapes the
fp32 training step makes at DeiT-S width (D = 384, 224², patch 16 x 2, tiles of 64 large tokens, rounds of two
tiles), twice each: cycling through one set of operands (they stay in L2) and through enough separate sets that
each call streams its operands from L3. The ratio of the two is what memory residency costs a GEMM here.

    python benchmarks/gemm_cache.py                   # builds benchmarks/gemm_cache.cpp (about a minute), runs
    python benchmarks/gemm_cache.py --fma-limit 117.0 # and relates each rate to one core's FMA limit
    python benchmarks/gemm_cache.py --quick           # small shapes and few calls: checks the tool runs
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(HERE, "results", "latest-gemm-cache.json")

# (what, M, N, K) of one call, D = 384: token gradients (phase A, per tile) and one 64-row job of each
# weight gradient per round (phase B), as csrc/cpu/mcl_embed.cpp issues them. The dE job is the im2col path's
# (channels_last or bf16 images, patches not a multiple of 16); fp32 images with unit W stride compute dE with
# patch_gemm's own kernel, which reads the pixels from x.
SHAPES = [
    ("gl = gRg W_d (tile)", 64, 384, 1536),
    ("gS' += gl W_c (tile)", 64, 1536, 384),
    ("dW_d job (round)", 64, 384, 128),
    ("dW_c job (round)", 64, 1536, 128),
    ("dE job (round)", 64, 768, 512),
    # On AVX2 CPUs (gemm_avx2) the backward's tiles hold 128 large tokens and a round's weight-gradient job is one
    # call over both tiles (Gemm::k_split_exact): K = 256.
    ("dW_d job (AVX2 round)", 64, 384, 256),
    ("dW_c job (AVX2 round)", 64, 1536, 256),
]
QUICK_SHAPES = [("quick", 16, 64, 32)]


def build(verbose: bool = False):
    from torch.utils.cpp_extension import load
    build_dir = os.path.join(tempfile.gettempdir(), "mcl_kernels_gemm_cache")
    os.makedirs(build_dir, exist_ok=True)
    cpu = os.path.join(ROOT, "csrc", "cpu")
    sources = [os.path.join(HERE, "gemm_cache.cpp")] + [
        os.path.join(cpu, f) for f in ("simd.cpp", "tile_gemm.cpp", "gemm_avx2.cpp", "patch_gemm.cpp",
                                       "patch_gemm_avx2.cpp")]
    return load("mcl_gemm_cache", sources,
                extra_include_paths=[os.path.join(ROOT, "csrc", "cpu")], extra_cflags=["-O3"],
                build_directory=build_dir, verbose=verbose)


def sets_beyond_l2(M: int, N: int, K: int, l3_bytes: int) -> int:
    """Operand sets that together exceed any L2 (> 8 MiB) and still fit in `l3_bytes` where they can."""
    per_set = 4 * (M * K + K * N + M * N)
    want = max(2, -(-8 * 2**20 // per_set))
    fit = max(2, int(0.75 * l3_bytes) // per_set)
    return min(want * 2, max(want, fit))


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200, help="calls timed per measurement")
    ap.add_argument("--tries", type=int, default=3, help="measurements per case; the best is kept")
    ap.add_argument("--l3-mib", type=float, default=32.0, help="L3 size, to size the streamed case")
    ap.add_argument("--fma-limit", type=float, default=None, help="one core's FMA limit, GFLOP/s (fma_peak.cpp)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ext = build()
    shapes, reps, tries = (QUICK_SHAPES, 4, 1) if args.quick else (SHAPES, args.reps, args.tries)
    rows = []
    paths = ["brgemm"] + (["avx2"] if ext.has_avx2() else [])
    head = f"{'call':<24} {'M x N x K':>18} {'path':>7} {'in L2':>8} {'from L3':>8} {'L3/L2':>6}"
    if args.fma_limit:
        head += f" {'L2 %FMA':>8} {'L3 %FMA':>8}"
    print(f"Gemm<float>::run, one thread, GFLOP/s, best of {tries}; the paths' calls alternate\n{head}\n"
          f"{'-' * len(head)}")
    for what, M, N, K in shapes:
        many = sets_beyond_l2(M, N, K, int(args.l3_mib * 2**20))
        hot = {p: 0.0 for p in paths}
        cold = dict(hot)
        for _ in range(tries):  # the paths in turn, so a drift of the host's speed hits both
            for p in paths:
                hot[p] = max(hot[p], ext.rate(M, N, K, 1, reps, p))
                cold[p] = max(cold[p], ext.rate(M, N, K, many, reps, p))
        for p in paths:
            row = {"call": what, "M": M, "N": N, "K": K, "path": p, "sets_streamed": many, "gflops_l2": hot[p],
                   "gflops_l3": cold[p]}
            line = f"{what:<24} {f'{M} x {N} x {K}':>18} {p:>7} {hot[p]:8.1f} {cold[p]:8.1f} {cold[p] / hot[p]:6.2f}"
            if args.fma_limit:
                row.update(fma_fraction_l2=hot[p] / args.fma_limit, fma_fraction_l3=cold[p] / args.fma_limit)
                line += f" {100 * hot[p] / args.fma_limit:7.1f}% {100 * cold[p] / args.fma_limit:7.1f}%"
            print(line)
            rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
