"""Kernel benchmark: the fused MCL kernels against the eager reference and torch.compile of it, in one run.

Sections (``--sections``, default all):
- ``fwd``:     the training embedding's forward, pixels -> (S, L, R) (``mcl_kernels.mcl_embed``);
- ``fwdbwd``:  forward + backward of every weight and bias (the image needs no gradient, as in training), with
  the peak memory of one step; on a GPU also replayed from a CUDA graph (``kernel-fwd+bwd-graph``: the GPU's
  time without the host's per-launch overhead);
- ``infer``:   the merged (deployed) embedding with class token and position embedding: timm's ``PatchEmbed``
  (conv2d) + cat + add (the baseline users run today), torch.compile of it, the reference, and
  ``mcl_kernels.embed_tokens``, on the CPU also with its weight packed once ahead of the calls
  (``prepacked``: ``mcl_kernels.pack_embed_weight``, as ``MergedPatchEmbed(prepack=True)`` runs it).
- ``attn`` (GPU only): the fused attention forward (the deployed model's: 50 tokens at 224/32, 197 at /16) and
  forward+backward against ``scaled_dot_product_attention`` (baseline), at head dim 64 and ``D / 64`` heads (the
  forward also replayed from a CUDA graph, ``attn-fwd-graph``: kernel time without per-launch host overhead); and
  the packed attention of MCL's three branches (197 + 50 + 197 tokens) against SDPA run once per branch.
- ``packed`` (GPU only): one MCL-DeiT training step (forward, MCLLoss, backward, AdamW; bf16 under autocast
  for a bfloat16 run) with the branches packed into one pass through the blocks against the same model with
  three separate passes (baseline), timed in turn round by round.
The training sections' baseline is the eager reference (``mcl_kernels.reference``). Kernel rows are the backends
of the device that implement the op (CPU: ``cpu``, the C++ kernels; CUDA: ``triton`` and ``cuda``) and ``auto``
(whatever ``backend="auto"`` picks there); a backend that is not available is skipped with the reason.
The last row of the fwd, fwdbwd and infer cases, ``bound: GEMMs (torch.mm)``, is not an implementation: it is the
case's GEMMs alone through ``torch.mm``, on operands built ahead (patch matrix, grouped tokens, gradients), with
nothing else done. Its ratio is what an implementation whose GEMMs run no faster than torch's own BLAS/cuBLAS on
these shapes could reach at best, so it says how far a target is from the machine's GEMM speed on this very case
(the ``torch.mm`` peak is measured on one large square shape). Its FLOPs are the reference's, counted in the tests.

Each row: median time, GFLOP/s, the fraction of the ``torch.mm`` peak of the same dtype measured in this run,
the ratio baseline-time / time (> 1: faster), and (fwdbwd) peak memory above what existed before the step
(``harness.peak_memory``: CUDA allocator statistics, or on the CPU the profiler's allocation events).
Results go to a table and to JSON (``--json``, default ``benchmarks/results/latest-kernels.json``).

    python benchmarks/kernels.py                                  # DeiT-Ti/S/B widths, batch 1/16/64, fp32+bf16
    python benchmarks/kernels.py --widths 384 --batches 64 --dtypes float32 --sections fwdbwd
    python benchmarks/kernels.py --quick                          # tiny shapes: checks the script runs
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Row  # noqa: E402

import mcl_kernels as mk  # noqa: E402
from mcl_kernels import reference  # noqa: E402

WIDTHS = {192: "DeiT-Ti", 384: "DeiT-S", 768: "DeiT-B"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTION_NAMES = ("fwd", "fwdbwd", "infer", "attn", "packed")
GPU_SECTIONS = ("attn", "packed")  # measured on a CUDA device only: on a CPU the Triton kernels are interpreted
# The row of each case's GEMMs alone on torch.mm (operands laid out ahead): what an implementation multiplying no
# faster than torch's GEMM could reach at best, on this case's shapes. No peak memory for it: its operands are built
# before the step.
BOUND = "bound: GEMMs (torch.mm)"
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest-kernels.json")


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str, allowed: Sequence[str], what: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (the GPU when one is visible)")
    ap.add_argument("--sections", default=",".join(SECTION_NAMES),
                    help="comma-separated: fwd, fwdbwd, infer, attn, packed (the last two: GPU only)")
    ap.add_argument("--widths", default="192,384,768", help="embedding widths D (DeiT-Ti/S/B: 192,384,768)")
    ap.add_argument("--batches", default="1,16,64", help="batch sizes")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16, help="small patch p (the large patch is p * compress)")
    ap.add_argument("--compress", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compiling is slow)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: checks the script runs")
    harness.add_cpu_malloc_argument(ap)
    ap.add_argument("--json", default=DEFAULT_JSON, help="where to write the JSON results")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.batches, args.img_size, args.warmup, args.repeats = "32", "2", 64, 1, 2
    return args


def resolve_device(name: str) -> Optional[torch.device]:
    """The device to measure on; None (with a note) when a GPU is asked for and there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: the GPU rows are skipped", file=sys.stderr)
        return None
    return device


def kernel_backends(device: torch.device, op: str) -> List[str]:
    """The backends whose kernel for `op` can run on `device` (reference excluded), then "auto"."""
    names = []
    for name, backend in mk.backends.BACKENDS.items():
        if name == "reference" or op not in backend.ops:
            continue
        why = backend.unavailable(device)
        if why is None:
            names.append(name)
        else:
            print(f"  backend {name!r} skipped for {op}: {why}", file=sys.stderr)
    return names + ["auto"]


class Runner:
    """Times the implementations of one case; the first one that runs is the baseline of the ratios."""

    def __init__(self, args: argparse.Namespace, device: torch.device, rows: List[Row]):
        self.args, self.device, self.rows = args, device, rows

    def case(self, section: str, case: str, dtype: str, peak: float, flops: float, shape: Dict[str, int],
             impls: Sequence[Tuple[str, Callable[[], object]]], memory: bool = False) -> None:
        harness.time_case(self.rows, self.device, self.args.warmup, self.args.repeats, section, case, dtype, peak,
                          flops, shape, impls, memory, no_memory=(BOUND,))


def _compiled(fn: Callable, args: argparse.Namespace) -> Optional[Callable]:
    return harness.compiled(fn, args.no_compile)


def token_counts(H: int, W: int, p: int, k: int) -> Tuple[int, int]:
    """Small and large tokens per image of the training embedding."""
    return (H // p) * (W // p), (H // (p * k)) * (W // (p * k))


def training_gemms(D: int, C: int, H: int, W: int, p: int, k: int) -> Dict[str, int]:
    """Multiply-adds per image of the training embedding's three GEMMs (S, L and R)."""
    ns, nl = token_counts(H, W, p, k)
    return {"embed": ns * D * C * p * p, "compress": nl * D * k * k * D, "decompress": nl * k * k * D * D}


def training_flops(B: int, gemm: Dict[str, int]) -> Tuple[float, float]:
    """FLOPs of the training embedding's forward and forward + backward at batch B, from :func:`training_gemms`:
    the backward has every weight gradient (the forward's FLOPs again) and the token gradients through
    decompression and compression (the image needs none)."""
    fwd = 2.0 * B * sum(gemm.values())
    return fwd, 2 * fwd + 2.0 * B * (gemm["compress"] + gemm["decompress"])


def training_inputs(B: int, D: int, C: int, H: int, W: int, p: int, k: int, dtype: torch.dtype,
                    device: torch.device) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Seeded image and (proj_w, proj_b, comp_w, comp_b, decomp_w, decomp_b), each weight scaled by its fan-in."""
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)

    def param(*shape, fan_in):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * fan_in ** -0.5).to(dtype)

    return x, [param(D, C, p, p, fan_in=C * p * p), param(D, fan_in=1), param(D, k * k * D, fan_in=k * k * D),
               param(D, fan_in=1), param(k * k * D, D, fan_in=D), param(k * k * D, fan_in=1)]


def training_gemm_bound(B: int, D: int, C: int, p: int, k: int, ns: int, nl: int, dtype: torch.dtype,
                        device: torch.device) -> Tuple[Callable[[], object], Callable[[], object]]:
    """The training embedding's GEMMs alone, through ``torch.mm`` on operands laid out ahead (the patch matrix, the
    grouped tokens and the gradients already built): (forward, forward + backward). Nothing else is done, no
    patchify, grouping, bias or sum, so its time bounds any implementation whose GEMMs run no faster than torch's
    own on these shapes; its FLOPs are the case's (tests count them)."""
    gen = torch.Generator(device).manual_seed(1)  # its own: the callers' seeded inputs stay as they were

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    cpp, kd = C * p * p, k * k * D
    patches, emb_w = rand(B * ns, cpp), rand(D, cpp)  # im2col(x); proj.weight as [D, C*p*p]
    grouped, comp_w, decomp_w = rand(B * nl, kd), rand(D, kd), rand(kd, D)  # group(S); W_c; W_d
    g_small, g_large, g_recon = rand(B * ns, D), rand(B * nl, D), rand(B * nl, kd)  # gS, gL, group(gR)

    def forward():
        small = patches @ emb_w.t()
        large = grouped @ comp_w.t()
        return small, large, large @ decomp_w.t()

    def forward_backward():
        small, large, recon = forward()
        g_large_all = torch.addmm(g_large, g_recon, decomp_w)  # gL + group(gR) W_d
        return (small, recon, g_recon.t() @ large,  # dW_d
                g_large_all.t() @ grouped,  # dW_c
                g_large_all @ comp_w,  # group(gS') from the compression
                g_small.t() @ patches)  # dE

    return forward, forward_backward


def infer_gemm_bound(B: int, n: int, weight: torch.Tensor) -> Callable[[], object]:
    """The inference embedding's GEMM alone, through ``torch.mm`` on a patch matrix built ahead (as
    :func:`training_gemm_bound`): ``[B * n, C * P * P] @ weight.reshape(D, -1).t()``."""
    gen = torch.Generator(weight.device).manual_seed(1)
    w_t = weight.detach().reshape(weight.shape[0], -1).t()
    patches = torch.randn(B * n, w_t.shape[0], device=weight.device, dtype=weight.dtype, generator=gen)
    return lambda: patches @ w_t


def bound_runs(device: torch.device, dtype: torch.dtype, peak: float, case: str) -> bool:
    """Whether a case gets its :data:`BOUND` row: not where torch's own mm in this dtype runs at under half the peak
    the rows are held to, since there torch's GEMM is not the fast path (bf16 on CPUs without bf16 arithmetic, where
    the peak is float32's) and bounds nothing (said on stderr). Asked before the bound's operands are built."""
    rate = harness.own_mm_rate(device, dtype)
    if rate < peak / 2:
        print(f"  [{case}] {BOUND}: skipped, torch.mm in {dtype} runs at {rate:.1f} GFLOP/s here, under half the "
              f"{peak:.1f} the rows are held to", file=sys.stderr)
        return False
    return True


def training_sections(runner: Runner, sections: Sequence[str], dtype_name: str, peak: float) -> None:
    args, dev, dtype = runner.args, runner.device, DTYPES[dtype_name]
    p, k, C = args.patch, args.compress, 3
    H = W = args.img_size
    ns, nl = token_counts(H, W, p, k)
    backends = kernel_backends(dev, "mcl_embed")
    for D in _ints(args.widths):
        gemm = training_gemms(D, C, H, W, p, k)
        for B in _ints(args.batches):
            x, params = training_inputs(B, D, C, H, W, p, k, dtype, dev)
            leaves = [t.requires_grad_(True) for t in params]
            fwd_flops, train_flops = training_flops(B, gemm)
            shape = {"B": B, "H": H, "W": W, "D": D, "p": p, "k": k}
            case = f"{WIDTHS.get(D, '')} D={D} B={B} {H}x{W}".strip()

            def ref_fwd():
                return reference.mcl_embed(x, *leaves, k)

            def kernel_fwd(backend):
                def run():
                    return tuple(mk.mcl_embed(x, *leaves, compress=k, backend=backend))
                return run

            bound = None  # (forward, forward + backward) of the case's GEMMs alone
            if bound_runs(dev, dtype, peak, case):
                bound = training_gemm_bound(B, D, C, p, k, ns, nl, dtype, dev)

            if "fwd" in sections:
                impls = [("reference (eager)", ref_fwd), ("reference (compile)", _compiled(ref_fwd, args))]
                impls += [(f"mcl_embed ({b})", kernel_fwd(b)) for b in backends]
                if bound is not None:
                    impls.append((BOUND, bound[0]))
                with torch.no_grad():
                    runner.case("kernel-fwd", case, dtype_name, peak, fwd_flops, shape,
                                [i for i in impls if i[1] is not None])

            if "fwdbwd" in sections:
                ups = [torch.randn(B, ns, D, device=dev, dtype=dtype), torch.randn(B, nl, D, device=dev, dtype=dtype),
                       torch.randn(B, ns, D, device=dev, dtype=dtype)]

                def train(fwd):
                    def step():
                        outs = [o for o in fwd() if o is not None]
                        torch.autograd.backward(outs, ups[:len(outs)])
                        for t in leaves:
                            t.grad = None
                    return step

                impls = [("reference (eager)", train(ref_fwd))]
                compiled = _compiled(ref_fwd, args)  # its own callable: one traced under no_grad has no backward
                if compiled is not None:
                    impls.append(("reference (compile)", train(compiled)))
                impls += [(f"mcl_embed ({b})", train(kernel_fwd(b))) for b in backends]
                if bound is not None:
                    impls.append((BOUND, bound[1]))
                runner.case("kernel-fwd+bwd", case, dtype_name, peak, train_flops, shape, impls, memory=True)
                if dev.type == "cuda":
                    # The same steps replayed from a CUDA graph: the GPU's time alone. A step here is about a
                    # millisecond of GPU work, so the host's launch path can set the eager time (the same code on
                    # two lent H100 machines: 1.39 and 2.50 ms).
                    runner.case("kernel-fwd+bwd-graph", case, dtype_name, peak, train_flops, shape,
                                [(name, harness.cuda_graphed(fn)) for name, fn in impls])


def infer_section(runner: Runner, dtype_name: str, peak: float) -> None:
    args, dev, dtype = runner.args, runner.device, DTYPES[dtype_name]
    P, C = args.patch * args.compress, 3
    H = W = args.img_size
    n = (H // P) * (W // P)
    try:
        from timm.layers import PatchEmbed
    except ImportError:
        PatchEmbed = None
        print("  [infer] timm is not installed: its PatchEmbed rows are skipped (pip install timm)", file=sys.stderr)
    backends = kernel_backends(dev, "embed_tokens")
    for D in _ints(args.widths):
        for B in _ints(args.batches):
            torch.manual_seed(0)
            x = torch.randn(B, C, H, W, device=dev, dtype=dtype)
            weight = (torch.randn(D, C, P, P, device=dev) * (C * P * P) ** -0.5).to(dtype)
            bias = torch.randn(D, device=dev).to(dtype)
            cls = torch.randn(1, 1, D, device=dev).to(dtype)
            pos = torch.randn(1, n + 1, D, device=dev).to(dtype)
            impls = []
            if PatchEmbed is not None:
                pe = PatchEmbed(img_size=H, patch_size=P, in_chans=C, embed_dim=D).to(device=dev, dtype=dtype)
                pe.load_state_dict({"proj.weight": weight, "proj.bias": bias})

                def timm_embed():
                    t = pe(x)
                    return torch.cat([cls.expand(t.shape[0], -1, -1), t], dim=1) + pos

                impls += [("timm PatchEmbed+cat+add", timm_embed), ("timm (compile)", _compiled(timm_embed, args))]
            impls.append(("reference (eager)", lambda: reference.embed_tokens(x, weight, bias, cls, pos)))
            impls += [(f"embed_tokens ({b})",
                       lambda b=b: mk.embed_tokens(x, weight, bias, cls, pos, backend=b)) for b in backends]
            # The weight packed once ahead of the calls (a deployed model's: MergedPatchEmbed(prepack=True)).
            blob = mk.pack_embed_weight(weight) if "cpu" in backends else None
            if blob is not None:
                impls.append(("embed_tokens (cpu, prepacked)",
                              lambda: mk.embed_tokens(x, weight, bias, cls, pos, backend="cpu", packed_weight=blob)))
            shape = {"B": B, "H": H, "W": W, "D": D, "P": P}
            case = f"{WIDTHS.get(D, '')} D={D} B={B} {H}x{W}/{P}".strip()
            flops = 2.0 * B * n * D * C * P * P
            if bound_runs(dev, dtype, peak, case):
                impls.append((BOUND, infer_gemm_bound(B, n, weight)))
            with torch.no_grad():
                runner.case("kernel-infer", case, dtype_name, peak, flops, shape,
                            [i for i in impls if i[1] is not None])


def attention_section(runner: Runner, dtype_name: str, peak: float) -> None:
    import torch.nn.functional as F
    from mcl_kernels.attention import attention, packed_attention
    args, dev, dtype = runner.args, runner.device, DTYPES[dtype_name]
    backends = kernel_backends(dev, "attention")
    # --quick: a few tokens and narrow heads (the script's check, also run through Triton's interpreter)
    Dh = 16 if args.quick else 64
    lengths = ((6,), (9,), (9, 4, 9)) if args.quick else ((50,), (197,), (197, 50, 197))
    for D in _ints(args.widths):
        H = max(1, D // Dh)
        for B in _ints(args.batches):
            for seqlens in lengths:
                N = sum(seqlens)
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, N, Dh, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
                g = torch.randn(B, H, N, Dh, device=dev, dtype=dtype)
                flops = 4.0 * B * H * Dh * sum(n * n for n in seqlens)  # QK^T and PV, no masked work
                shape = {"B": B, "H": H, "N": N, "Dh": Dh}
                packed = len(seqlens) > 1
                if packed:
                    from mcl_kernels.reference import segments
                    segs = list(segments(seqlens))

                    def sdpa():
                        return torch.cat([F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s])
                                          for s in segs], dim=2)
                    impls = [("SDPA per branch", sdpa)]
                    impls += [(f"packed_attention ({b})",
                               lambda b=b: packed_attention(q, k, v, seqlens, backend=b)) for b in backends]
                    case = f"D={D} B={B} N={'+'.join(map(str, seqlens))}"
                else:
                    impls = [("SDPA", lambda: F.scaled_dot_product_attention(q, k, v))]
                    impls += [(f"attention ({b})", lambda b=b: attention(q, k, v, backend=b)) for b in backends]
                    case = f"D={D} B={B} N={N}"
                    with torch.no_grad():
                        runner.case("attn-fwd", case, dtype_name, peak, flops, shape, impls)
                        # The same calls replayed from a CUDA graph: kernel time, without the host overhead
                        # that bounds a Python op's launch at these sizes (tens of microseconds of GPU work).
                        if dev.type == "cuda":
                            runner.case("attn-fwd-graph", case, dtype_name, peak, flops, shape,
                                        [(name, harness.cuda_graphed(fn)) for name, fn in impls if "auto" not in name])

                def train(fn):
                    def step():
                        fn().backward(g)
                        q.grad = k.grad = v.grad = None
                    return step
                # backward: dS = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q (+ recomputed QK^T): 2.5x the forward
                runner.case("attn-fwd+bwd", case, dtype_name, peak, 3.5 * flops, shape,
                            [(name, train(fn)) for name, fn in impls])


def packed_step_section(runner: Runner, dtype_name: str, peak: float) -> None:
    from torch.utils.flop_counter import FlopCounterMode
    try:
        from mcl_kernels.loss import MCLLoss
        from mcl_kernels.models import create_model
    except ImportError as exc:
        print(f"  [packed] skipped: {exc} (pip install timm)", file=sys.stderr)
        return
    args, dev = runner.args, runner.device
    amp = dtype_name != "float32"
    img = args.img_size
    names = {192: "tiny", 384: "small", 768: "base"}
    for D in _ints(args.widths):
        # --quick: one narrow block on the DeiT-Ti preset (the script's check)
        size = dict(embed_dim=D, depth=1, num_heads=2) if args.quick else {}
        if D not in names and not args.quick:
            print(f"  [packed] no MCL-DeiT preset of width {D}: skipped", file=sys.stderr)
            continue
        for B in _ints(args.batches):
            steps, flops = {}, 0.0
            for label, packed in (("three passes", False), ("packed (one pass)", True)):
                torch.manual_seed(0)
                # Both on the Triton kernels (embedding; the packed model's attention too): the rows differ only in
                # the packing.
                model = create_model(f"mcl_deit_{names.get(D, 'tiny')}_patch32_224", img_size=img, backend="triton",
                                     packed=packed, **size).train().to(dev)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                x = torch.randn(B, 3, img, img, device=dev)
                y = torch.randint(0, 1000, (B,), device=dev)
                loss_fn = MCLLoss()

                def fwd_bwd(model=model, x=x, y=y):
                    with torch.autocast(dev.type, dtype=DTYPES[dtype_name], enabled=amp):
                        loss = loss_fn(model(x), y)[0]
                    loss.backward()

                def step(model=model, opt=opt, fwd_bwd=fwd_bwd):
                    fwd_bwd()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step()
                if not packed:  # the transformer's FLOPs (FlopCounterMode does not see inside the custom ops)
                    with FlopCounterMode(display=False) as fc:
                        fwd_bwd()
                    flops = float(fc.get_total_flops())
                    opt.zero_grad(set_to_none=True)
                steps[label] = step
            secs = harness.interleaved_median_seconds(steps, dev, args.warmup, args.repeats)
            base = secs["three passes"]
            case = f"MCL-DeiT D={D} B={B} {img}x{img}"
            for label, sec in secs.items():
                gflops = flops / sec / 1e9
                r = Row("packed-step", case, label, dtype_name, {"B": B, "D": D, "H": img, "W": img}, sec * 1e3,
                        gflops, gflops / peak, base / sec, "three passes", {"images_per_s": B / sec})
                runner.rows.append(r)
                print(f"  packed-step    {case:<28} {label:<26} {dtype_name:<9} {sec * 1e3:9.3f} ms "
                      f"{gflops:8.1f} GFLOP/s {100 * r.peak_fraction:5.1f}% of peak {r.ratio:6.2f}x", flush=True)
            del steps


def run(args: argparse.Namespace, device: torch.device, rows: List[Row]) -> Dict[str, float]:
    """Runs the requested sections on `device`, appending rows; returns the torch.mm peak of each dtype."""
    sections = _names(args.sections, SECTION_NAMES, "section(s)")
    dtypes = _names(args.dtypes, list(DTYPES), "dtype(s)")
    if device.type == "cpu" and getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if device.type != "cuda" and any(s in GPU_SECTIONS for s in sections):
        print(f"  sections {', '.join(s for s in sections if s in GPU_SECTIONS)} run on a CUDA device only: "
              "skipped here", file=sys.stderr)
        sections = [s for s in sections if s not in GPU_SECTIONS]
    runner = Runner(args, device, rows)
    peaks: Dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for dtype_name in dtypes:
            peaks[dtype_name] = peak = harness.measure_mm_peak(device, DTYPES[dtype_name])
            print(f"measured torch.mm peak ({dtype_name}): {peak:.1f} GFLOP/s", flush=True)
            if "fwd" in sections or "fwdbwd" in sections:
                training_sections(runner, sections, dtype_name, peak)
            if "infer" in sections:
                infer_section(runner, dtype_name, peak)
            if "attn" in sections:
                attention_section(runner, dtype_name, peak)
            if "packed" in sections:
                packed_step_section(runner, dtype_name, peak)
    return peaks


def print_memory(rows: Sequence[Row]) -> None:
    """Peak memory of the rows that measured it, with the ratio to their case's baseline."""
    measured = [r for r in rows if r.extra.get("peak_memory_bytes") is not None]
    if not measured:
        return
    print(f"\n{'peak memory':<16} {'case':<30} {'impl':<26} {'dtype':<9} {'MiB':>9} {'vs base':>8}")
    base: Dict[Tuple[str, str, str], float] = {}
    for r in measured:
        mib = r.extra["peak_memory_bytes"] / 2**20
        ref = base.setdefault((r.section, r.case, r.dtype), mib)
        print(f"{r.section:<16} {r.case:<30} {r.impl:<26} {r.dtype:<9} {mib:9.1f} {mib / ref if ref else 0:7.2f}x")


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    args = parse_args(argv)
    _names(args.sections, SECTION_NAMES, "section(s)")
    _names(args.dtypes, list(DTYPES), "dtype(s)")
    device = resolve_device(args.device)
    rows: List[Row] = []
    peaks: Dict[str, float] = {}
    env: Dict[str, object] = {"device": None}
    if device is not None:
        if device.type == "cpu" and args.threads:
            torch.set_num_threads(args.threads)  # before harness.environment records the thread count
        env = harness.environment(device)
        env["cpu_malloc"] = harness.apply_cpu_malloc(args.cpu_malloc, device)
        print(f"mcl_kernels {mk.__version__} kernels on {env['device']} | torch {env['torch']} | "
              f"{args.img_size}x{args.img_size}, patch {args.patch} x {args.compress} | malloc: {env['cpu_malloc']}",
              flush=True)
        peaks = run(args, device, rows)
        print()
        harness.print_table(rows)
        print_memory(rows)
    harness.write_json(args.json, env, peaks, rows, vars(args))
    print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
