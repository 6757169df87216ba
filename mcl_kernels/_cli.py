"""Pieces the three CLIs (``mcl-train``, ``mcl-eval``, ``mcl-export``) share: the data options and their
per-dataset defaults, building the model from a saved configuration, AMP, and rank-0 logging."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from . import data
from .distributed import DistEnv

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}

# What a dataset gets when an option is not given. imagefolder follows DeiT (Touvron et al. 2021, ImageNet,
# 300 epochs); Fashion-MNIST is small (60k 28×28 images) so it gets a short run with milder augmentation;
# synthetic is a smoke run.
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "imagefolder": dict(img_size=224, fit="resize", epochs=300, batch_size=1024, warmup_epochs=5, scale_min=0.08,
                        aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, drop_path=0.1, crop_pct=0.875),
    "fashion-mnist": dict(img_size=64, fit="resize", epochs=10, batch_size=128, warmup_epochs=1, scale_min=0.5,
                          aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.0, cutmix=0.0, drop_path=0.1,
                          crop_pct=1.0),
    "synthetic": dict(img_size=64, fit="resize", epochs=2, batch_size=32, warmup_epochs=0, scale_min=0.5,
                      aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.0, cutmix=0.0, drop_path=0.0, crop_pct=1.0),
}


def add_data_options(ap: argparse.ArgumentParser, training: bool) -> None:
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", choices=data.DATASETS, default=None,
                   help="imagefolder (ImageNet layout under --data-dir), fashion-mnist (Debian's "
                        "dataset-fashion-mnist, offline) or synthetic (random images: smoke runs only). "
                        "Default: imagefolder when --data-dir is given" + ("" if training else
                                                                           ", else the checkpoint's"))
    g.add_argument("--data-dir", default=None, help="imagefolder: the root holding train/ and val/; "
                   f"fashion-mnist: the IDX files' folder (default {data.FASHION_MNIST_DIR})")
    if training:
        g.add_argument("--train-split", default="train", help="imagefolder: training folder under --data-dir")
        g.add_argument("--train-limit", type=int, default=None,
                       help="use only this many training images (a fixed subset; synthetic: its size, default "
                            f"{data.SYNTHETIC_SIZES['train']})")
    g.add_argument("--val-split", default="val", help="imagefolder: validation folder under --data-dir")
    g.add_argument("--val-limit", type=int, default=None,
                   help="use only this many validation images (synthetic: its size, default "
                        f"{data.SYNTHETIC_SIZES['val']})")
    g.add_argument("--num-classes", type=int, default=None,
                   help="synthetic: number of classes (default 10); other datasets count their own")
    g.add_argument("--img-size", type=int, default=None,
                   help="model input side, a multiple of the large patch (default: 224 imagefolder, 64 "
                        "fashion-mnist, 64 synthetic)")
    g.add_argument("--in-chans", type=int, choices=(1, 3), default=None,
                   help="model input channels: 3 (default; grayscale images repeated to RGB) or 1 "
                        "(grayscale model; colour images converted to luminance)")
    g.add_argument("--fit", choices=("resize", "pad"), default=None,
                   help="how images reach --img-size: resize (default) or zero-pad centred (e.g. 28 -> 32, "
                        "no resampling; needs images no larger than --img-size)")
    g.add_argument("--crop-pct", type=float, default=None,
                   help="evaluation: resize to img-size/crop-pct then centre-crop (default 0.875 imagefolder, "
                        "1.0 otherwise)")
    g.add_argument("--interpolation", default="bicubic", help="resampling (bicubic, bilinear, ...)")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per rank (default: min(8, CPU cores per rank))")


def default_workers(env: DistEnv) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))))
    return min(8, per_rank)


def fill_dataset_defaults(args: argparse.Namespace, keys: Iterable[str]) -> None:
    """Set every option in ``keys`` still None from :data:`DATASET_DEFAULTS` of ``args.dataset``."""
    table = DATASET_DEFAULTS[args.dataset]
    for k in keys:
        if getattr(args, k, None) is None and k in table:
            setattr(args, k, table[k])
    if args.in_chans is None:
        args.in_chans = 3


def check_img_size(img_size: int, patch: int) -> None:
    if img_size < patch or img_size % patch:
        raise SystemExit(f"--img-size must be a positive multiple of the large patch {patch}, got {img_size} "
                         f"(e.g. Fashion-MNIST 28 -> --img-size 32 --fit pad, or 64 with --fit resize)")


def large_patch(args: argparse.Namespace) -> int:
    """The model's large patch: small patch × compression (16 × 2 unless --model-kwargs says otherwise)."""
    extra = json.loads(args.model_kwargs) if getattr(args, "model_kwargs", None) else {}
    extra = extra if isinstance(extra, dict) else {}
    return int(extra.get("small_patch", 16)) * int(extra.get("compress", 2))


def transform_config(args: argparse.Namespace, augment: bool) -> data.TransformConfig:
    mean, std = data.dataset_stats(args.dataset, args.in_chans)
    cfg = data.TransformConfig(img_size=args.img_size, in_chans=args.in_chans, mean=mean, std=std, fit=args.fit,
                               interpolation=args.interpolation, crop_pct=args.crop_pct, augment=augment)
    if augment:
        cfg.scale = (args.scale_min, 1.0)
        cfg.hflip, cfg.color_jitter, cfg.re_prob = args.hflip, args.color_jitter, args.reprob
        cfg.auto_augment = None if args.aa in (None, "", "none") else args.aa
    return cfg


def explicit_options(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set:
    """Destinations of the options actually written on the command line (not filled by defaults)."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in ap._actions:  # noqa: SLF001 - argparse has no public way to copy its actions
        if action.option_strings and not isinstance(action, argparse._HelpAction):  # noqa: SLF001
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                shadow.add_argument(*action.option_strings, action="store_const", const=True, **kwargs)
            else:
                shadow.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    ns, _ = shadow.parse_known_args(argv)
    return set(vars(ns))


# ---- model ----

def model_config(args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    """``{name, num_classes, img_size, in_chans, kwargs}``: everything needed to rebuild the model."""
    kwargs: Dict[str, Any] = {}
    for opt, key in (("embed_dim", "embed_dim"), ("depth", "depth"), ("num_heads", "num_heads"),
                     ("mlp_ratio", "mlp_ratio")):
        value = getattr(args, opt, None)
        if value is not None:
            kwargs[key] = value
    if getattr(args, "drop_path", None) is not None:
        kwargs["drop_path_rate"] = float(args.drop_path)
    if getattr(args, "model_kwargs", None):
        try:
            extra = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--model-kwargs must be a JSON object, e.g. '{{\"tied_decompress\": true}}': {exc}")
        if not isinstance(extra, dict):
            raise SystemExit(f"--model-kwargs must be a JSON object, got {type(extra).__name__}")
        kwargs.update(extra)
    return {"name": args.model, "num_classes": int(num_classes), "img_size": int(args.img_size),
            "in_chans": int(args.in_chans), "kwargs": kwargs}


def build_model(cfg: Dict[str, Any], backend: str = "auto", packed: bool = False) -> torch.nn.Module:
    """The MCL model ``cfg`` describes (see :func:`model_config`). ``packed`` changes how the branches run,
    not the weights, so it is not part of ``cfg``."""
    from .models import create_model
    kwargs = dict(cfg["kwargs"])
    if packed:
        kwargs["packed"] = True
    return create_model(cfg["name"], num_classes=cfg["num_classes"], img_size=cfg["img_size"],
                        in_chans=cfg["in_chans"], backend=backend, **kwargs)


def load_torchscript(path: str, device) -> torch.nn.Module:
    """``torch.jit.load`` without its deprecation warning (torch >= 2.9): TorchScript is an export format here."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)
        return torch.jit.load(path, map_location=device)


def amp_context(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for ``--amp`` (bf16, fp16, none)."""
    if amp not in AMP_DTYPES:
        raise SystemExit(f"--amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def default_amp(device: torch.device) -> str:
    """bf16 on GPUs that support it, else none (CPU autocast is slower than fp32 on most CPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "none"


# ---- logging ----

class Log:
    """Rank-0 lines to stdout and, once an output directory is set, to ``log.txt`` in it."""

    def __init__(self, env: DistEnv):
        self.env, self.path = env, None

    def to_file(self, path: str) -> None:
        self.path = path

    def __call__(self, msg: str) -> None:
        if not self.env.is_main:
            return
        print(msg, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


class Progress:
    """Per-step progress on rank 0: a tqdm bar when tqdm is installed and stderr is a terminal
    (``--progress tqdm`` forces it), else a plain line every ``interval`` steps."""

    def __init__(self, env: DistEnv, mode: str, total: int, initial: int, desc: str, interval: int, log: Log):
        self.log, self.interval, self.total, self.desc = log, max(1, interval), total, desc
        self.bar = None
        if not env.is_main or mode == "none":
            self.mode = "none"
            return
        use_tqdm = mode == "tqdm" or (mode == "auto" and sys.stderr.isatty())
        if use_tqdm:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
            except ImportError:
                if mode == "tqdm":
                    log("tqdm is not installed (pip install tqdm): plain progress lines instead")
        self.mode = "tqdm" if self.bar is not None else "plain"
        self.t0 = time.perf_counter()

    def update(self, step: int, postfix: Callable[[], Dict[str, str]]) -> None:
        """``step``: 1-based steps done; ``postfix``: called only when something is shown (it may sync)."""
        if self.mode == "tqdm":
            self.bar.update(1)
            if step % self.interval == 0 or step == self.total:
                self.bar.set_postfix(postfix(), refresh=False)
        elif self.mode == "plain" and (step % self.interval == 0 or step == self.total):
            fields = " ".join(f"{k} {v}" for k, v in postfix().items())
            self.log(f"{self.desc} step {step}/{self.total} {fields}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_csv_atomic(path: str, rows: List[Dict[str, Any]]) -> None:
    import csv
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
