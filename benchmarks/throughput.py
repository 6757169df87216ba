"""The numbers that prove mcl_kernels: one script, one run, every comparison side by side.

Sections (``--sections``, default all):
- ``embed``:  the MCL training embedding (patchify + embed + compress + decompress), forward and
  forward+backward, at DeiT-Ti/S/B widths: the eager reference (baseline), ``torch.compile`` of it, and
  ``FusedMCLEmbed`` through the ops (``--backend``, default auto).
- ``merged``: the deployed, merged large-patch embedding with class token and position embedding
  (patch 32): timm's ``PatchEmbed`` (conv2d) + concat + add (baseline, what users run today),
  ``torch.compile`` of it, and ``mcl_kernels.embed_tokens`` on every backend available on the device.
- ``kernels``: ``benchmarks/kernels.py`` at this run's widths, batch and dtype: each fused kernel against the
  eager reference and ``torch.compile`` of it (forward, forward+backward with peak memory, inference embed).
Each case of the embed, merged and kernels sections ends with ``bound: GEMMs (torch.mm)``: the case's GEMMs alone
through ``torch.mm`` on operands built ahead, nothing else done; the best an implementation whose GEMMs are no
faster than torch's own could reach on those shapes (``kernels.training_gemm_bound``, ``infer_gemm_bound``).

Each row gives the median time, achieved GFLOP/s, the fraction of this machine's ``torch.mm`` peak
measured in the same run, and the ratio baseline-time ÷ time (> 1: faster than the baseline).
Runs with no data and no GPU; results go to a table and to JSON (``--json``).

    python benchmarks/throughput.py                    # defaults: CPU, or the GPU when present
    python benchmarks/throughput.py --quick            # tiny shapes, seconds (a smoke run)
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import kernels  # noqa: E402
from harness import Row  # noqa: E402

import mcl_kernels as mk  # noqa: E402
from mcl_kernels import reference  # noqa: E402

WIDTHS = {192: "DeiT-Ti", 384: "DeiT-S", 768: "DeiT-B"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (the GPU when one is visible)")
    ap.add_argument("--sections", default="embed,merged", help="comma-separated: embed, merged, models, kernels")
    ap.add_argument("--widths", default="192,384,768", help="embedding widths D (DeiT-Ti/S/B: 192,384,768)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 16 on CPU, 256 on GPU)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16, help="small patch p (large patch is p*compress)")
    ap.add_argument("--compress", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--backend", default="auto", help="mcl_kernels backend for the FusedMCLEmbed rows")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compiling is slow)")
    ap.add_argument("--models", default="all",
                    help="models section: comma-separated substrings of the rows to run (e.g. 'DeiT-Ti/16,MCL-DeiT-S'); "
                         "the first selected model of a case is its baseline")
    ap.add_argument("--model-dtypes", default="float32,bfloat16", help="models section: dtypes to run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: checks the script runs")
    harness.add_cpu_malloc_argument(ap)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "latest-throughput.json"), help="where to write the JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.img_size, args.batch, args.warmup, args.repeats = "32", 64, 2, 1, 2
    return args


class Bench:
    """Collects rows of one section/case; the first implementation timed is the baseline."""

    def __init__(self, args: argparse.Namespace, device: torch.device, peak: float, rows: List[Row]):
        self.args, self.device, self.peak, self.rows = args, device, peak, rows

    def case(self, section: str, case: str, flops: float, shape: Dict[str, int],
             impls: Sequence[tuple]) -> None:
        harness.time_case(self.rows, self.device, self.args.warmup, self.args.repeats, section, case,
                          self.args.dtype, self.peak, flops, shape, impls, no_memory=(kernels.BOUND,))


def _compiled(fn: Callable, args: argparse.Namespace) -> Optional[Callable]:
    return harness.compiled(fn, args.no_compile)


def embed_section(bench: Bench, args: argparse.Namespace) -> None:
    dev, dtype = bench.device, DTYPES[args.dtype]
    p, k, B = args.patch, args.compress, args.batch
    H = W = args.img_size
    for D in [int(w) for w in args.widths.split(",")]:
        torch.manual_seed(0)
        m = mk.FusedMCLEmbed(img_size=H, patch_size=p, compress=k, embed_dim=D, backend=args.backend,
                             device=dev, dtype=dtype)
        x = torch.randn(B, 3, H, W, device=dev, dtype=dtype)
        params = (m.proj.weight, m.proj.bias, m.compress.weight, m.compress.bias, m.decompress.weight,
                  m.decompress.bias)
        ns, nl = kernels.token_counts(H, W, p, k)
        fwd_flops, train_flops = kernels.training_flops(B, kernels.training_gemms(D, 3, H, W, p, k))
        shape = {"B": B, "H": H, "W": W, "D": D, "p": p, "k": k}
        name = f"{WIDTHS.get(D, '')} D={D} B={B} {H}x{W}".strip()
        bound = None  # (forward, forward + backward) of the case's GEMMs alone
        if kernels.bound_runs(dev, dtype, bench.peak, name):
            bound = kernels.training_gemm_bound(B, D, 3, p, k, ns, nl, dtype, dev)

        def ref_fwd():
            return reference.mcl_embed(x, *params, k)

        def mod_fwd():
            return m(x)

        compiled_fwd = _compiled(ref_fwd, args)
        with torch.no_grad():
            impls = [("reference (eager)", ref_fwd), ("reference (compile)", compiled_fwd),
                     (f"FusedMCLEmbed ({args.backend})", mod_fwd)]
            if bound is not None:
                impls.append((kernels.BOUND, bound[0]))
            bench.case("embed-fwd", name, fwd_flops, shape, [(n, f) for n, f in impls if f is not None])

        grads = [torch.randn(B, ns, D, device=dev, dtype=dtype), torch.randn(B, nl, D, device=dev, dtype=dtype),
                 torch.randn(B, ns, D, device=dev, dtype=dtype)]

        def train(fwd):
            def step():
                outs = fwd()
                torch.autograd.backward(list(outs), grads)
                for q in m.parameters():
                    q.grad = None
            return step

        impls = [("reference (eager)", train(ref_fwd))]
        if compiled_fwd is not None:
            # a separate compiled callable: the one above was traced under no_grad (no backward graph)
            compiled_train = _compiled(ref_fwd, args)
            impls.append(("reference (compile)", train(compiled_train)))
        impls.append((f"FusedMCLEmbed ({args.backend})", train(mod_fwd)))
        if bound is not None:
            impls.append((kernels.BOUND, bound[1]))
        bench.case("embed-fwd+bwd", name, train_flops, shape, impls)


def merged_section(bench: Bench, args: argparse.Namespace) -> None:
    dev, dtype = bench.device, DTYPES[args.dtype]
    P, B = args.patch * args.compress, args.batch
    H = W = args.img_size
    try:
        from timm.layers import PatchEmbed
    except ImportError:
        PatchEmbed = None
        print("  [merged] timm is not installed: its PatchEmbed rows are skipped (pip install timm)", file=sys.stderr)
    for D in [int(w) for w in args.widths.split(",")]:
        torch.manual_seed(0)
        merged = mk.FusedMCLEmbed(img_size=H, patch_size=args.patch, compress=args.compress, embed_dim=D,
                                  device=dev, dtype=dtype).fuse()
        n = (H // P) * (W // P)
        x = torch.randn(B, 3, H, W, device=dev, dtype=dtype)
        cls = torch.randn(1, 1, D, device=dev, dtype=dtype)
        pos = torch.randn(1, n + 1, D, device=dev, dtype=dtype)
        flops = 2.0 * B * n * D * 3 * P * P
        shape = {"B": B, "H": H, "W": W, "D": D, "P": P}
        name = f"{WIDTHS.get(D, '')} D={D} B={B} {H}x{W}/{P}".strip()
        impls = []
        if PatchEmbed is not None:
            pe = PatchEmbed(img_size=H, patch_size=P, embed_dim=D, device=dev, dtype=dtype)
            pe.load_state_dict(merged.state_dict())

            def timm_embed():
                t = pe(x)
                return torch.cat([cls.expand(t.shape[0], -1, -1), t], dim=1) + pos

            impls.append(("timm PatchEmbed+cat+add", timm_embed))
            compiled = _compiled(timm_embed, args)
            if compiled is not None:
                impls.append(("timm (compile)", compiled))
        impls.append(("reference (eager)", lambda: reference.embed_tokens(x, merged.proj.weight, merged.proj.bias,
                                                                          cls, pos)))
        for backend in ["auto"] + [b for b in mk.backends.available(dev) if b != "reference"]:
            if backend != "auto" and "embed_tokens" not in mk.backends.BACKENDS[backend].ops:
                continue
            impls.append((f"mcl embed_tokens ({backend})",
                          lambda b=backend: mk.embed_tokens(x, merged.proj.weight, merged.proj.bias, cls, pos,
                                                            backend=b)))
        blob = mk.pack_embed_weight(merged.proj.weight) if dev.type == "cpu" else None
        if blob is not None:  # the weight packed once, as MergedPatchEmbed(prepack=True) runs it
            impls.append(("mcl embed_tokens (cpu, prepacked)",
                          lambda: mk.embed_tokens(x, merged.proj.weight, merged.proj.bias, cls, pos, backend="cpu",
                                                  packed_weight=blob)))
        if kernels.bound_runs(dev, dtype, bench.peak, name):
            impls.append((kernels.BOUND, kernels.infer_gemm_bound(B, n, merged.proj.weight)))
        with torch.no_grad():
            bench.case("merged", name, flops, shape, impls)


def models_section(bench: Bench, args: argparse.Namespace) -> None:
    """Whole models (opt-in: ``--sections models``; tens of minutes on a CPU, about a minute on a GPU).

    ``models-infer``: images/s of the deployed MCL-DeiT-Ti/S/B-32 (plain timm ViT-/32s from
    ``MCLViT.deploy``; ``fused embed``: the same with ``mcl_kernels.swap_patch_embed(prepack=True)``, the
    embedding on ``embed_tokens`` with its weight packed once) against timm DeiT-Ti/16 (baseline: the model
    MCL-DeiT-S/32 beats at 1.5x its speed), DeiT-S/16, ViT-S/32 and torchvision MobileNetV2 and RegNetY-400MF,
    at batch 1, 16 and 64 in float32 and bfloat16 (weights and inputs cast). ``models-train``: one training step
    (forward, backward, AdamW step) of MCL-DeiT-S/32 (three branches, fused embedding) against one step of plain
    DeiT-S/16 (baseline) and of ViT-S/32, at ``--batch`` (at most 64), the steps timed in turn round by round;
    bfloat16 under autocast. ``--quick``: the tiny sizes only, batch 1 and 2. GFLOP/s from torch's
    FlopCounterMode plus the embedding's GEMMs (FlopCounterMode does not see inside the custom ops); ``%peak`` against the ``torch.mm`` peak of each dtype, measured in this run.
    """
    from torch.utils.flop_counter import FlopCounterMode
    try:
        import timm
        from mcl_kernels.loss import MCLLoss
        from mcl_kernels.models import create_model
    except ImportError as exc:
        print(f"  [models] skipped: {exc} (pip install timm)", file=sys.stderr)
        return
    try:
        import torchvision
    except ImportError:
        torchvision = None
        print("  [models] torchvision is not installed: its CNN rows are skipped", file=sys.stderr)
    dev, img = bench.device, args.img_size
    size = "tiny" if args.quick else None
    batches = (1, 2) if args.quick else (1, 16, 64)
    dtypes = tuple(d for d in args.model_dtypes.split(",") if d)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"--model-dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    wanted = None if args.models == "all" else [w.strip() for w in args.models.split(",") if w.strip()]

    def selected(label: str) -> bool:
        return wanted is None or any(w in label for w in wanted)
    peaks = {args.dtype: bench.peak}
    baselines: Dict[tuple, tuple] = {}  # (section, case) -> (impl, seconds): the first model timed in a case

    def peak(dname: str) -> float:
        if dname not in peaks:
            peaks[dname] = harness.measure_mm_peak(dev, DTYPES[dname])
            print(f"  measured torch.mm peak ({dname}): {peaks[dname]:.1f} GFLOP/s", flush=True)
        return peaks[dname]

    def timm_model(name: str, **kw):
        return timm.create_model(name, pretrained=False, img_size=img, **kw)

    def mcl(name: str, **kw):
        return create_model(name, num_classes=1000, img_size=img, backend=args.backend, **kw)

    def fused_embed(model):
        """The deployed timm ViT with its PatchEmbed run on mcl_kernels.embed_tokens, the weight packed once."""
        mk.swap_patch_embed(model, backend=args.backend, prepack=True)
        return model

    infer = [("timm DeiT-Ti/16", lambda: timm_model("deit_tiny_patch16_224")),
             ("MCL-DeiT-Ti/32 (deployed)", lambda: mcl("mcl_deit_tiny_patch32_224").deploy("fast")),
             ("MCL-DeiT-Ti/32 (fused embed)", lambda: fused_embed(mcl("mcl_deit_tiny_patch32_224").deploy("fast")))]
    if size is None:
        infer += [("timm DeiT-S/16", lambda: timm_model("deit_small_patch16_224")),
                  ("timm ViT-S/32", lambda: timm_model("vit_small_patch32_224")),
                  ("MCL-DeiT-S/32 (deployed)", lambda: mcl("mcl_deit_small_patch32_224").deploy("fast")),
                  ("MCL-DeiT-S/32 (fused embed)",
                   lambda: fused_embed(mcl("mcl_deit_small_patch32_224").deploy("fast"))),
                  ("MCL-DeiT-B/32 (deployed)", lambda: mcl("mcl_deit_base_patch32_224").deploy("fast")),
                  ("MCL-DeiT-B/32 (fused embed)",
                   lambda: fused_embed(mcl("mcl_deit_base_patch32_224").deploy("fast")))]
    if torchvision is not None:
        infer.append(("torchvision MobileNetV2", lambda: torchvision.models.mobilenet_v2(weights=None)))
        if size is None:
            infer.append(("torchvision RegNetY-400MF", lambda: torchvision.models.regnet_y_400mf(weights=None)))

    def row(section, case, impl, dname, shape, sec, flops, base, extra):
        r = Row(section, case, impl, dname, shape, sec * 1e3, flops / sec / 1e9, flops / sec / 1e9 / peak(dname),
                base[1] / sec, base[0], extra)
        bench.rows.append(r)
        print(f"  {section:<12} {case:<22} {impl:<28} {dname:<8} {sec * 1e3:9.3f} ms "
              f"{extra['images_per_s']:9.1f} img/s {r.gflops:8.1f} GFLOP/s {r.ratio:6.2f}x", flush=True)

    def count_flops(fn, model=None, B=0) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        # FlopCounterMode does not see inside the custom ops: a swapped-in embedding's GEMM, counted here.
        embeds = [m for m in model.modules() if isinstance(m, mk.MergedPatchEmbed)] if model is not None else []
        return float(fc.get_total_flops()) + sum(
            2.0 * B * (img // m.patch_size[0]) * (img // m.patch_size[1]) * m.proj.weight[0].numel() *
            m.proj.weight.shape[0] for m in embeds)

    for label, build in [(label, build) for label, build in infer if selected(label)]:
        torch.manual_seed(0)
        built = build().eval().to(dev)
        for dname in dtypes:
            built = built.to(DTYPES[dname])
            for B in batches:
                x = torch.randn(B, 3, img, img, device=dev, dtype=DTYPES[dname])
                case = f"B={B} {img}x{img} {dname}"
                with torch.no_grad():
                    def fn(m=built, x=x):
                        return m(x)
                    try:
                        sec = harness.median_seconds(fn, dev, args.warmup, args.repeats)
                        flops = count_flops(fn, built, B)
                    except Exception as exc:  # noqa: BLE001 - one failing peer must not hide the others
                        print(f"  [models-infer/{case}] {label}: skipped ({type(exc).__name__}: {exc})",
                              file=sys.stderr)
                        continue
                key = ("models-infer", case)
                base = baselines.setdefault(key, (label, sec))
                row("models-infer", case, label, dname, {"B": B, "H": img, "W": img}, sec, flops, base,
                    {"images_per_s": B / sec, "params": sum(p.numel() for p in built.parameters())})
        del built

    # Training steps: the MCL model's three branches and loss against plain one-patch models.
    B = min(args.batch, 64)
    s = "tiny" if size else "small"
    S = "Ti" if size else "S"
    train = [(f"timm DeiT-{S}/16 step", lambda: timm_model(f"deit_{s}_patch16_224"), False),
             (f"timm ViT-{S}/32 step", lambda: timm_model(f"deit_{s}_patch16_224", patch_size=32), False),
             (f"MCL-DeiT-{S}/32 step", lambda: mcl(f"mcl_deit_{s}_patch32_224"), True)]
    for dname in dtypes:
        case = f"B={B} {img}x{img} {dname}"
        steps, fwd_bwds, models = {}, {}, {}
        for label, build, is_mcl in [t for t in train if selected(t[0])]:
            torch.manual_seed(0)
            model = build().train().to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(B, 3, img, img, device=dev)
            y = torch.randint(0, 1000, (B,), device=dev)
            loss_fn = MCLLoss() if is_mcl else None

            def fwd_bwd(model=model, x=x, y=y, loss_fn=loss_fn, amp=dname == "bfloat16"):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(x)
                    loss = loss_fn(out, y)[0] if loss_fn is not None else torch.nn.functional.cross_entropy(out, y)
                loss.backward()

            def step(model=model, opt=opt, fwd_bwd=fwd_bwd):
                fwd_bwd()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                step()  # first call on its own: a model that cannot train is reported, not timed
            except Exception as exc:  # noqa: BLE001
                print(f"  [models-train/{case}] {label}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
                continue
            steps[label], fwd_bwds[label], models[label] = step, fwd_bwd, (model, opt, is_mcl)
        # The steps are timed in turn, round by round: their ratio is this section's result, and a step lasts
        # seconds on a CPU, long enough for the machine to drift between one model's rounds and the next's.
        secs = harness.interleaved_median_seconds(steps, dev, args.warmup, args.repeats) if steps else {}
        for label, sec in secs.items():
            model, opt, is_mcl = models[label]
            flops = count_flops(fwd_bwds[label])
            opt.zero_grad(set_to_none=True)
            if is_mcl:  # the fused embedding's GEMMs (custom ops), counted as in the embed section
                p, k, D, C = model.small_patch, model.compress, model.embed_dim, model.in_chans
                flops += kernels.training_flops(B, kernels.training_gemms(D, C, img, img, p, k))[1]
            base = baselines.setdefault(("models-train", case), (label, sec))
            row("models-train", case, label, dname, {"B": B, "H": img, "W": img}, sec, flops, base,
                {"images_per_s": B / sec, "params": sum(p.numel() for p in model.parameters())})
        del steps, fwd_bwds, models


def kernels_section(bench: Bench, args: argparse.Namespace) -> None:
    """benchmarks/kernels.py (fused kernels vs eager reference vs torch.compile: forward, forward+backward with
    peak memory, inference embed) at this run's widths, batch and dtype."""
    kargs = kernels.parse_args([])
    kargs.widths, kargs.batches, kargs.dtypes = args.widths, str(args.batch), args.dtype
    kargs.img_size, kargs.patch, kargs.compress = args.img_size, args.patch, args.compress
    kargs.no_compile, kargs.warmup, kargs.repeats = args.no_compile, args.warmup, args.repeats
    kernels.run(kargs, bench.device, bench.rows)


SECTIONS = {"embed": embed_section, "merged": merged_section, "models": models_section, "kernels": kernels_section}


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.batch is None:
        args.batch = 256 if device.type == "cuda" else 16
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {sorted(SECTIONS)}")
    env = harness.environment(device)
    env["cpu_malloc"] = harness.apply_cpu_malloc(args.cpu_malloc, device)
    print(f"mcl_kernels {mk.__version__} throughput on {env['device']} | torch {env['torch']} | "
          f"dtype {args.dtype} | batch {args.batch} | {args.img_size}x{args.img_size} | "
          f"malloc: {env['cpu_malloc']}", flush=True)
    dtype = DTYPES[args.dtype]
    peak = harness.measure_mm_peak(device, dtype)
    print(f"measured torch.mm peak ({args.dtype}): {peak:.1f} GFLOP/s", flush=True)
    rows: List[Row] = []
    bench = Bench(args, device, peak, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for s in sections:
            print(f"[{s}]", flush=True)
            SECTIONS[s](bench, args)
    print()
    harness.print_table(rows)
    harness.write_json(args.json, env, {args.dtype: peak}, rows, vars(args))
    print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
