"""Where the C++ training kernel's time goes: per-phase thread time of mcl_embed's forward and backward on the CPU.

``benchmarks/kernels.py`` says how fast a training step is against the eager reference; this says why. With the
kernels' phase timers on (``mcl_kernels._C.cpu_phases_enable``), it runs forward+backward steps of the C++ op
(every weight and bias needs a gradient, the image none, as in training) and reports, per phase and per step:

- thread time (each thread's time in the phase, summed over threads) and its share of all threads' time in
  the op;
- for the GEMM phases, the GFLOP they compute and the rate per thread, against the per-thread share of the
  ``torch.mm`` peak measured in the same run and, with ``--fma-limit`` (GFLOP/s on all threads, from
  ``benchmarks/fma_peak.cpp``), against the machine's FMA limit;
- for the backward, the wall time of its rounds' two halves (the tiles' token gradients and operands, and the
  weight-gradient GEMMs).

A GEMM phase running well below the rate its shapes reach on operands in cache points at memory traffic, not
arithmetic; the rest of the time is data movement (gathers, transposes, im2col) and bias sums.

    python benchmarks/cpu_phases.py                                  # DeiT-S width, batch 64, fp32
    python benchmarks/cpu_phases.py --dtype bfloat16 --fma-limit 231.7
    python benchmarks/cpu_phases.py --quick                          # tiny shape: checks the script runs
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from kernels import DTYPES, token_counts, training_gemms, training_inputs  # noqa: E402

import mcl_kernels as mk  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest-cpu-phases.json")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=384, help="embedding width D")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16, help="small patch p")
    ap.add_argument("--compress", type=int, default=2, help="k (the large patch is p * k)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed forward+backward steps")
    ap.add_argument("--fma-limit", type=float, default=None,
                    help="the machine's FMA limit on all threads, GFLOP/s (benchmarks/fma_peak.cpp)")
    ap.add_argument("--quick", action="store_true", help="tiny shape and few steps: checks the script runs")
    ap.add_argument("--json", default=DEFAULT_JSON, help="where to write the JSON results")
    harness.add_cpu_malloc_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.img_size, args.patch, args.warmup, args.steps = 24, 2, 32, 4, 1, 2
    return args


def phase_flops(B: int, D: int, C: int, H: int, W: int, p: int, k: int) -> Dict[str, float]:
    """FLOPs per step of the GEMM phases (2 per multiply-add)."""
    g = training_gemms(D, C, H, W, p, k)
    embed, comp, decomp = (2.0 * B * g[name] for name in ("embed", "compress", "decompress"))
    return {"fwd.small_gemm": embed, "fwd.large_gemm": comp, "fwd.recon_gemm": decomp,
            "bwd.token_gemms": decomp + comp,  # gl = gL + gRg W_d, gS' = gS + gl W_c
            "bwd.weight_gemms": comp + decomp,  # dW_c, dW_d
            "bwd.embed_grad": embed}  # dE


def measure(args: argparse.Namespace) -> Dict[str, object]:
    _C = mk._extension._C
    C, H, W, p, k, B, D = 3, args.img_size, args.img_size, args.patch, args.compress, args.batch, args.width
    dtype = DTYPES[args.dtype]
    x, params = training_inputs(B, D, C, H, W, p, k, dtype, torch.device("cpu"))
    leaves = [t.requires_grad_(True) for t in params]
    ns, nl = token_counts(H, W, p, k)
    ups = [torch.randn(B, ns, D, dtype=dtype), torch.randn(B, nl, D, dtype=dtype), torch.randn(B, ns, D, dtype=dtype)]

    def step():
        outs = mk.mcl_embed(x, *leaves, compress=k, backend="cpu")
        torch.autograd.backward(list(outs), ups)
        for t in leaves:
            t.grad = None

    for _ in range(args.warmup):
        step()
    _C.cpu_phases_take()
    _C.cpu_phases_enable(True)
    try:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_s = (time.perf_counter() - start) / args.steps
    finally:
        _C.cpu_phases_enable(False)
    phases = {name: sec / args.steps for name, sec in _C.cpu_phases_take()}
    return {"step_s": step_s, "phases": phases, "flops": phase_flops(B, D, C, H, W, p, k)}


def report(result: Dict[str, object], threads: int, mm_peak: float, fma_limit: Optional[float]) -> List[Dict]:
    phases: Dict[str, float] = result["phases"]
    flops: Dict[str, float] = result["flops"]
    threaded = {n: s for n, s in phases.items() if not n.startswith("bwd.wall.")}
    total = sum(threaded.values())
    rows = []
    head = f"{'phase':<24} {'thread ms':>10} {'share':>6} {'GFLOP':>7} {'GFLOP/s/thr':>11} {'%mm/thr':>8}"
    if fma_limit:
        head += f" {'%FMA':>6}"
    print(head)
    print("-" * len(head))
    for name, sec in threaded.items():
        row = {"phase": name, "thread_ms": 1e3 * sec, "share": sec / total if total else 0.0}
        line = f"{name:<24} {1e3 * sec:10.2f} {100 * row['share']:5.1f}%"
        if name in flops and sec > 0:
            rate = flops[name] / sec / 1e9
            row.update(gflop=flops[name] / 1e9, gflops_per_thread=rate, mm_fraction=rate / (mm_peak / threads))
            line += f" {flops[name] / 1e9:7.2f} {rate:11.1f} {100 * row['mm_fraction']:7.1f}%"
            if fma_limit:
                row["fma_fraction"] = rate / (fma_limit / threads)
                line += f" {100 * row['fma_fraction']:5.1f}%"
        print(line)
        rows.append(row)
    print(f"{'all threads in the op':<24} {1e3 * total:10.1f}")
    for name in ("bwd.wall.tiles", "bwd.wall.weight_gemms"):
        if name in phases:
            print(f"{name:<24} {1e3 * phases[name]:10.1f} ms wall")
            rows.append({"phase": name, "wall_ms": 1e3 * phases[name]})
    print(f"step (forward + backward, wall): {1e3 * result['step_s']:.1f} ms on {threads} threads")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    why = mk.backends.BACKENDS["cpu"].unavailable(device)
    if why is None and not hasattr(mk._extension._C, "cpu_phases_enable"):
        why = "mcl_kernels._C predates the phase timers: rebuild it (pip install -e . or setup.py build_ext --inplace)"
    if why is not None:
        raise SystemExit(f"cpu_phases: the C++ kernels cannot be profiled here: {why}")
    env = harness.environment(device)
    env["cpu_malloc"] = harness.apply_cpu_malloc(args.cpu_malloc, device)
    mm_peak = harness.measure_mm_peak(device, DTYPES[args.dtype])
    threads = torch.get_num_threads()
    print(f"mcl_embed (C++) phases on {env['device']} | {args.dtype}, D = {args.width}, B = {args.batch}, "
          f"{args.img_size}x{args.img_size}, patch {args.patch} x {args.compress} | torch.mm peak {mm_peak:.1f} "
          f"GFLOP/s ({mm_peak / threads:.1f} per thread) | malloc: {env['cpu_malloc']}", flush=True)
    result = measure(args)
    phases = report(result, threads, mm_peak, args.fma_limit)
    extra = {"step_ms": 1e3 * result["step_s"], "phases": phases}
    harness.write_json(args.json, env, {args.dtype: mm_peak}, [], vars(args), extra)
    print(f"\nwrote {args.json}")
    return extra


if __name__ == "__main__":
    main()
