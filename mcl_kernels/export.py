"""mcl-export: turn an mcl-train checkpoint into deployed models, and prove each one computes the same logits.

    mcl-export runs/<run>/best.pt                       # -> runs/<run>/export/{fast,accurate}.{safetensors,pt,onnx}
    mcl-export runs/<run>/last.pt --modes fast --formats safetensors,onnx --use-ema

Modes (MCLViT.deploy): ``fast`` merges the small-patch embedding and the compression into one large-patch
embedding: a plain timm ViT-/32 that computes the large branch; ``accurate`` keeps the small-patch
embedding: a plain timm ViT-/16 that computes the small branch. Formats: ``safetensors`` (timm state dict
plus the timm model name and arguments to rebuild it; mcl_kernels.models.export.load_deployed), ``torchscript``
and ``onnx``. Every deployed model is checked against the MCL model's own branch on the same inputs, and every
file is read back and checked against the deployed model; the maximum absolute logit error is printed and
written to manifest.json, and the command fails (exit 1) when one exceeds ``--atol``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import _cli, checkpoint as ckpt
from .checkpoint import CheckpointError

MODES = ("fast", "accurate")
FORMATS = ("safetensors", "torchscript", "onnx")
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}
BRANCH = {"fast": "large", "accurate": "small"}  # the MCL branch each deployed mode reproduces


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mcl-export", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("checkpoint", help="an mcl-train checkpoint (last.pt / best.pt)")
    ap.add_argument("--output-dir", default=None, help="default: export/ next to the checkpoint")
    ap.add_argument("--modes", default="fast,accurate", help="comma-separated: fast (/32), accurate (/16)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated: {', '.join(FORMATS)}")
    ap.add_argument("--use-ema", action="store_true", help="export the checkpoint's EMA weights")
    ap.add_argument("--batch-size", type=int, default=4, help="images in the verification batch")
    ap.add_argument("--atol", type=float, default=1e-4, help="largest accepted absolute logit difference")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    return ap


def parse_list(value: str, allowed: Sequence[str], option: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{option} takes a comma-separated subset of {', '.join(allowed)}; got {value!r}")
    return items


def export_one(model, mode: str, deployed: torch.nn.Module, fmt: str, path: str, example: torch.Tensor,
               opset: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Write the ``mode`` deployment of ``model`` as ``fmt`` to ``path``; returns the file read back as a callable."""
    from .models import export as mx
    if fmt == "safetensors":
        mx.save_deployed(model, path, mode=mode)  # records deploy_config's timm name and arguments
        return mx.load_deployed(path)
    if fmt == "torchscript":
        mx.to_torchscript(deployed, path, example)
        return _cli.load_torchscript(path, "cpu").eval()
    mx.to_onnx(deployed, path, example, opset=opset)
    return mx.onnx_runner(path)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    modes = parse_list(args.modes, MODES, "--modes")
    formats = parse_list(args.formats, FORMATS, "--formats")
    state = ckpt.load_checkpoint(args.checkpoint)
    cfg = state["model_config"]
    weights = state["model"]
    if args.use_ema:
        if state.get("ema") is None:
            raise CheckpointError(f"{args.checkpoint} has no EMA weights (trained without --ema); drop --use-ema")
        weights = state["ema"]
    # Export runs on the CPU in float32 with the reference kernels: the files must not depend on this machine.
    from .models.export import max_abs_diff
    model = _cli.build_model(cfg, backend="reference")
    ckpt.load_state_strict(model, weights, f"{args.checkpoint} {'ema' if args.use_ema else 'model'}")
    model.eval()
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "export")
    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=g)

    print(f"mcl-export: {args.checkpoint} ({cfg['name']}, {cfg['num_classes']} classes, {cfg['img_size']}px, "
          f"{'EMA' if args.use_ema else 'model'} weights) -> {out_dir}", flush=True)
    print(f"verification: {args.batch_size} random images, max abs err of the logits must be <= {args.atol}",
          flush=True)
    rows: List[Dict[str, Any]] = []
    with torch.no_grad():
        for mode in modes:
            branch = BRANCH[mode]
            expected = (model.forward_large if branch == "large" else model.forward_small)(x)
            deployed = model.deploy(mode=mode).eval()
            got = deployed(x)
            rows.append({"mode": mode, "format": "eager", "path": None, "timm_name": _timm_name(model, mode),
                         "max_abs_err": max_abs_diff(got, expected), "against": f"MCL {branch} branch"})
            for fmt in formats:
                path = os.path.join(out_dir, mode + SUFFIX[fmt])
                logits = export_one(model, mode, deployed, fmt, path, x, args.opset)(x)
                rows.append({"mode": mode, "format": fmt, "path": os.path.abspath(path),
                             "timm_name": _timm_name(model, mode),
                             "max_abs_err": max(max_abs_diff(logits, got), max_abs_diff(logits, expected)),
                             "against": f"deployed eager model and MCL {branch} branch"})
    ok = all(r["max_abs_err"] <= args.atol for r in rows)
    print(f"{'mode':9s} {'format':12s} {'max abs err':>12s}  file", flush=True)
    for r in rows:
        flag = "ok" if r["max_abs_err"] <= args.atol else f"FAIL (> {args.atol})"
        print(f"{r['mode']:9s} {r['format']:12s} {r['max_abs_err']:12.3e}  {r['path'] or '(in memory)'}  {flag}",
              flush=True)
    manifest = {"checkpoint": os.path.abspath(args.checkpoint), "model_config": cfg, "use_ema": args.use_ema,
                "atol": args.atol, "verification_batch": args.batch_size, "ok": ok, "exports": rows}
    _cli.write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    print(f"{'all exports match' if ok else 'SOME EXPORTS DIFFER'}; manifest: {os.path.join(out_dir, 'manifest.json')}",
          flush=True)
    return manifest


def _timm_name(model, mode: str) -> Optional[str]:
    return model.deploy_config(mode).get("timm_name")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = run(args)
    except CheckpointError as exc:
        print(f"mcl-export: error: {exc}", file=sys.stderr)
        return 2
    return 0 if manifest["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
