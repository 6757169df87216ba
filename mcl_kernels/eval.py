"""mcl-eval: top-1 / top-5 accuracy of an MCL training checkpoint or of a deployed/exported model.

    mcl-eval runs/<run>/last.pt                 # large (deployed) and small branch, the run's own val data
    mcl-eval runs/<run>/last.pt --use-ema       # the EMA weights instead
    mcl-eval export/fast.safetensors --dataset fashion-mnist --img-size 64
    mcl-eval export/fast.onnx --dataset imagefolder --data-dir /data/imagenet
    torchrun --nproc_per_node 8 -m mcl_kernels.eval runs/<run>/best.pt

What it reads, by content: an mcl-train checkpoint (``last.pt``/``best.pt``; data options default to the
run's own), a deployed model's safetensors (mcl-export), TorchScript (``.pt``/``.ts`` archives with
code) or ONNX (``.onnx``, run with onnxruntime). Under ``torchrun`` each rank evaluates its own shard
(no padding duplicates) and the counts are summed, so the figures equal a single-process run.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from . import _cli, checkpoint as ckpt, data, distributed
from .checkpoint import CheckpointError
from .distributed import DistEnv

TOPK = (1, 5)


@torch.no_grad()
def evaluate(branches: Dict[str, Callable[[torch.Tensor], torch.Tensor]], loader, env: DistEnv,
             autocast: Callable = None, num_classes: Optional[int] = None,
             progress: Optional[_cli.Progress] = None) -> Dict[str, Dict[str, float]]:
    """Accuracy of each branch (``x [B, C, H, W] -> logits [B, classes]``) over ``loader``, all ranks summed.

    Returns ``{branch: {top1, top5, loss, count}}``: percentages, mean cross-entropy, images counted.
    With fewer than 5 classes, top-5 is top-``classes`` (100%)."""
    import contextlib
    autocast = autocast or contextlib.nullcontext
    dev = env.device
    # Per branch: correct@1, correct@5, summed cross-entropy; plus the image count. float64 sums are exact
    # for counts below 2**53.
    sums = torch.zeros(len(branches), 3, dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    for step, (x, y) in enumerate(loader):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        for i, fn in enumerate(branches.values()):
            with autocast():
                logits = fn(x)
            logits = logits.float()
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"branch {list(branches)[i]!r} returned logits of shape {tuple(logits.shape)}, "
                                 f"expected [{x.shape[0]}, classes]")
            k = min(max(TOPK), logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            sums[i, 0] += hit[:, 0].sum()
            sums[i, 1] += hit.any(dim=1).sum()
            sums[i, 2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
        count += x.shape[0]
        if progress is not None:
            progress.update(step + 1, lambda: {"images": str(int(count.item()))})
    distributed.all_reduce_sum(env, sums)
    distributed.all_reduce_sum(env, count)
    n = max(count.item(), 1.0)
    return {name: {"top1": 100.0 * sums[i, 0].item() / n, "top5": 100.0 * sums[i, 1].item() / n,
                   "loss": sums[i, 2].item() / n, "count": int(count.item())}
            for i, name in enumerate(branches)}


# ---- what the file is ----

def file_kind(path: str) -> str:
    """"checkpoint", "safetensors", "torchscript" or "onnx", judged by content where it can be."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".onnx"):
        return "onnx"
    if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        # safetensors: an 8-byte little-endian header length, then a JSON header.
        return "safetensors"
    if ckpt.is_torchscript(path):
        return "torchscript"
    return "checkpoint"


class Loaded:
    """A model to evaluate: its branches and what it knows about its input."""

    def __init__(self, branches: Dict[str, Callable], img_size: Optional[int], in_chans: Optional[int],
                 num_classes: Optional[int], description: str, saved_args: Optional[Dict[str, Any]] = None):
        self.branches, self.img_size, self.in_chans, self.num_classes = branches, img_size, in_chans, num_classes
        self.description, self.saved_args = description, saved_args or {}


def load_for_eval(path: str, device: torch.device, backend: str = "auto", use_ema: bool = False) -> Loaded:
    kind = file_kind(path)
    if kind == "checkpoint":
        state = ckpt.load_checkpoint(path)
        cfg = state["model_config"]
        model = _cli.build_model(cfg, backend)
        if use_ema:
            if state.get("ema") is None:
                raise CheckpointError(f"{path} has no EMA weights (trained without --ema); drop --use-ema")
            ckpt.load_state_strict(model, state["ema"], f"{path} 'ema'")
        else:
            ckpt.load_state_strict(model, state["model"], f"{path} 'model'")
        model.to(device).eval()
        prog = state["progress"]
        desc = (f"mcl-train checkpoint {path} ({cfg['name']}, epoch {prog['epoch']}, step {prog['step_in_epoch']}, "
                f"{'EMA' if use_ema else 'model'} weights)")
        return Loaded({"large": model.forward_large, "small": model.forward_small}, cfg["img_size"],
                      cfg["in_chans"], cfg["num_classes"], desc, state["args"])
    if kind == "safetensors":
        from .models.export import load_deployed
        model = load_deployed(path).to(device).eval()
        return Loaded({"deployed": model}, _timm_img_size(model), _timm_in_chans(model),
                      getattr(model, "num_classes", None), f"deployed model {path} (safetensors)")
    if kind == "torchscript":
        model = _cli.load_torchscript(path, device).eval()
        return Loaded({"deployed": model}, None, None, None, f"TorchScript model {path}")
    return _load_onnx(path, device)


def _timm_img_size(model) -> Optional[int]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return int(size[0]) if isinstance(size, (tuple, list)) else (int(size) if size else None)


def _timm_in_chans(model) -> Optional[int]:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return int(proj.weight.shape[1]) if proj is not None else None


def _load_onnx(path: str, device: torch.device) -> Loaded:
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit("evaluating .onnx needs onnxruntime (pip install onnxruntime)") from None
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    providers = [p for p in providers if p in ort.get_available_providers()]
    sess = ort.InferenceSession(path, providers=providers)
    inp = sess.get_inputs()[0]
    shape = inp.shape  # e.g. ['batch', 3, 224, 224]; symbolic dims are strings
    in_chans = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else None
    img_size = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else None
    out_shape = sess.get_outputs()[0].shape
    num_classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None

    def run(x: torch.Tensor) -> torch.Tensor:
        logits = sess.run(None, {inp.name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)
    return Loaded({"deployed": run}, img_size, in_chans, num_classes, f"ONNX model {path} ({', '.join(providers)})")


# ---- CLI ----

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mcl-eval", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("model",
                    help="mcl-train checkpoint, or deployed .safetensors / TorchScript / .onnx from mcl-export")
    _cli.add_data_options(ap, training=False)
    ap.add_argument("--batch-size", type=int, default=256, help="images per rank per batch")
    ap.add_argument("--use-ema", action="store_true", help="checkpoint: evaluate its EMA weights")
    ap.add_argument("--backend", default="auto", help="mcl_kernels kernel backend for checkpoint models")
    ap.add_argument("--amp", choices=sorted(_cli.AMP_DTYPES), default="none", help="autocast dtype (default none)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--dist-backend", default=None)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--progress", choices=("auto", "tqdm", "plain", "none"), default="auto")
    return ap


def resolve_data_options(args: argparse.Namespace, explicit: set, loaded: Loaded) -> None:
    """Data options: the command line, else the training run's (checkpoints), else the model's own input
    size, else the dataset defaults."""
    saved = loaded.saved_args
    for key in ("dataset", "data_dir", "val_split", "val_limit", "num_classes", "img_size", "in_chans", "fit",
                "crop_pct", "interpolation"):
        if key not in explicit and key in saved and saved[key] is not None:
            setattr(args, key, saved[key])
    if args.dataset is None:
        if not args.data_dir:
            raise SystemExit(f"mcl-eval: {loaded.description} does not say which data it was trained on: give "
                             f"--dataset fashion-mnist, --dataset imagefolder --data-dir ROOT, or --dataset synthetic")
        args.dataset = "imagefolder"
    if args.img_size is None:
        args.img_size = loaded.img_size
    if args.in_chans is None:
        args.in_chans = loaded.in_chans
    _cli.fill_dataset_defaults(args, ("img_size", "fit", "crop_pct"))
    for name, have in (("img_size", loaded.img_size), ("in_chans", loaded.in_chans)):
        if have is not None and getattr(args, name) != have:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)} does not match the model's {have}")


def run(args: argparse.Namespace, explicit: set) -> Dict[str, Dict[str, float]]:
    env = distributed.init(args.device, args.dist_backend)
    ok = False
    try:
        log = _cli.Log(env)
        loaded = load_for_eval(args.model, env.device, args.backend, args.use_ema)
        resolve_data_options(args, explicit, loaded)
        base = data.build_dataset(args.dataset, "val", args.data_dir, args.val_limit, args.num_classes or 10,
                                  saved_seed(loaded), args.val_split)
        classes = getattr(base, "classes", None)
        if loaded.num_classes is not None and classes and len(classes) != loaded.num_classes:
            raise SystemExit(f"the model has {loaded.num_classes} classes, the {args.dataset} data {len(classes)}")
        val_set = data.Transformed(base, data.build_transform(_cli.transform_config(args, False), False))
        sampler = data.ShardedSampler(len(val_set), env.world_size, env.rank, shuffle=False)
        workers = args.workers if args.workers is not None else _cli.default_workers(env)
        loader = data.build_loader(val_set, sampler, args.batch_size, workers, env.device.type == "cuda",
                                   drop_last=False, seed=0)
        label = data.SYNTHETIC_LABEL if args.dataset == "synthetic" else args.dataset
        log(f"mcl-eval: {loaded.description}")
        log(f"data: {label} val ({len(val_set)} images, {args.img_size}px, {args.in_chans} channel(s), "
            f"fit {args.fit}), "
            f"{env.world_size} process(es) on {env.device}, amp {args.amp}")
        steps = -(-sampler.full_length() // args.batch_size)
        progress = _cli.Progress(env, args.progress, steps, 0, "eval", 10, log)
        try:
            results = evaluate(loaded.branches, loader, env, _cli.amp_context(env.device, args.amp),
                               progress=progress)
        finally:
            progress.close()
        for name, r in results.items():
            log(f"  {name:9s} top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}  loss {r['loss']:.4f}  "
                f"({r['count']} images)")
        if args.dataset == "synthetic":
            log("  (SYNTHETIC DATA: these numbers only show that the pipeline runs)")
        if args.json and env.is_main:
            _cli.write_json_atomic(args.json, {"model": args.model, "description": loaded.description,
                                               "dataset": label, "img_size": args.img_size, "results": results})
        ok = True
        return results
    finally:
        distributed.teardown(synchronize=ok)


def saved_seed(loaded: Loaded) -> int:
    # Synthetic validation images depend on the run's seed: use the training run's.
    return int(loaded.saved_args.get("seed", 0))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    explicit = _cli.explicit_options(ap, argv if argv is not None else sys.argv[1:])
    try:
        run(args, explicit)
    except CheckpointError as exc:
        print(f"mcl-eval: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        from .models.export import DeployedModelError
        if not isinstance(exc, DeployedModelError):
            raise
        print(f"mcl-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
