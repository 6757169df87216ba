"""mcl-train: train an MCL vision transformer with the DeiT recipe (timm + torchvision).

    mcl-train --dataset fashion-mnist                          # offline, Debian's dataset-fashion-mnist
    mcl-train --dataset imagefolder --data-dir /data/imagenet --model mcl_deit_small_patch32_224
    torchrun --nproc_per_node 8 -m mcl_kernels.train --data-dir /data/imagenet --amp bf16
    mcl-train --resume runs/<run>                              # continue exactly where it stopped
    mcl-train --dataset synthetic --epochs 1                   # smoke run (random images)

Recipe (DeiT, Touvron et al. 2021): AdamW, lr = lr-base × global batch / 512, linear warm-up then
cosine decay (per step), weight decay 0.05, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1,
random erasing 0.25, mixup 0.8 / cutmix 1.0, drop-path 0.1, optional EMA. Datasets other than
imagefolder get shorter, milder defaults (see ``--help``; every value used is printed at the start).

The MCL loss (mcl_kernels.loss.MCLLoss) is the sum of the classification losses of the large, small
and reconstructed branches and the reconstruction loss. Each epoch the large (deployed) and small branches
are evaluated (top-1/top-5). Outputs in ``--output`` (default runs/<dataset>-<model>-<time>): log.txt,
args.json, metrics.csv and metrics.json (per epoch), summary.json, and checkpoints last.pt / best.pt
(atomic writes; ``--ckpt-every-steps`` adds mid-epoch ones). ``--resume`` restores model, optimizer,
scheduler, EMA, grad scaler, every rank's random generators and the data position, so the resumed run
computes exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import _cli, checkpoint as ckpt, cpu_malloc, data, distributed
from .checkpoint import CheckpointError
from .distributed import DistEnv
from .loss import RECON_LOSSES

DEFAULT_MODEL = "mcl_deit_tiny_patch32_224"
# Options a resumed run may change: how it runs, not what it computes.
RUNTIME_OPTIONS = {"resume", "output", "workers", "device", "dist_backend", "backend", "compile", "progress",
                   "log_interval", "ckpt_every_steps", "data_dir", "packed", "cpu_malloc"}
# Filled per dataset from _cli.DATASET_DEFAULTS when not given.
DATASET_KEYS = ("img_size", "fit", "epochs", "batch_size", "warmup_epochs", "scale_min", "aa", "reprob", "mixup",
                "cutmix", "drop_path", "crop_pct")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mcl-train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    _cli.add_data_options(ap, training=True)

    g = ap.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"MCL model name (default {DEFAULT_MODEL}; see "
                   "mcl_kernels.models.list_models(): mcl_deit_{tiny,small,base}_patch32_224, mcl_convit_...)")
    g.add_argument("--backend", default="auto", help="mcl_kernels kernel backend: auto, reference, cpu, cuda, triton")
    g.add_argument("--packed", action="store_true",
                   help="run the three branches as one block-diagonal sequence through the blocks (same results; "
                        "one pass, for GPUs; DeiT/ViT blocks only, not ConViT)")
    g.add_argument("--embed-dim", type=int, default=None, help="override the model's width")
    g.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    g.add_argument("--num-heads", "--heads", dest="num_heads", type=int, default=None,
                   help="override the attention heads")
    g.add_argument("--mlp-ratio", type=float, default=None, help="override the MLP ratio")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default 0.1; synthetic 0)")
    g.add_argument("--model-kwargs", default=None,
                   help="JSON object of further create_model keyword arguments, e.g. '{\"tied_decompress\": true}'")

    g = ap.add_argument_group("loss")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (folded into mixup targets)")
    g.add_argument("--branch-weights", default="1,1,1",
                   help="classification loss weights of the large, small and reconstructed branches")
    g.add_argument("--recon-weight", type=float, default=1.0, help="weight of the reconstruction loss")
    g.add_argument("--recon-loss", default="mse", choices=RECON_LOSSES, help="reconstruction distance (default mse)")
    g.add_argument("--detach-recon-target", action="store_true",
                   help="stop gradients through the small tokens in the reconstruction loss")

    g = ap.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=None, help="default: 300 imagefolder, 10 fashion-mnist, 2 synthetic")
    g.add_argument("--batch-size", type=int, default=None,
                   help="GLOBAL batch size, split evenly over ranks (default: 1024 imagefolder, 128 "
                        "fashion-mnist, 32 synthetic)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: lr-base × batch / 512)")
    g.add_argument("--lr-base", type=float, default=5e-4, help="learning rate per 512 images (DeiT: 5e-4)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="cosine floor")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at step 0")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length (default 5; "
                   "fashion-mnist 1, synthetic 0)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--opt-eps", type=float, default=1e-8)
    g.add_argument("--betas", default="0.9,0.999")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm (default: no clipping)")

    g = ap.add_argument_group("augmentation")
    g.add_argument("--no-aug", action="store_true",
                   help="no random augmentation: train images get the evaluation transform")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, 'none' to disable "
                   "(default rand-m9-mstd0.5-inc1)")
    g.add_argument("--scale-min", type=float, default=None,
                   help="random-resized-crop minimum area (default 0.08; fashion-mnist/synthetic 0.5)")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--color-jitter", type=float, default=0.3, help="used only when --aa none")
    g.add_argument("--reprob", type=float, default=None, help="random erasing probability (default 0.25)")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (default 0.8 imagefolder, else 0)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (default 1.0 imagefolder, else 0)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)

    g = ap.add_argument_group("EMA")
    g.add_argument("--ema", action="store_true", help="keep an exponential moving average of the weights "
                   "(timm ModelEmaV3), evaluated and saved alongside")
    g.add_argument("--ema-decay", type=float, default=0.99996)

    g = ap.add_argument_group("runtime")
    g.add_argument("--amp", choices=sorted(_cli.AMP_DTYPES), default=None,
                   help="autocast dtype (default: bf16 on GPUs that have it, else none)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g.add_argument("--device", default="auto", help="auto (the rank's GPU, else CPU), cpu, cuda")
    g.add_argument("--dist-backend", default=None,
                   help="torch.distributed backend (default nccl on GPUs, gloo on CPUs)")
    g.add_argument("--cpu-malloc", choices=cpu_malloc.CHOICES, default="retain",
                   help="CPU runs: retain (default) keeps glibc from returning freed activations to the OS, so each "
                        "step reuses them instead of page-faulting them afresh (mcl_kernels.cpu_malloc); default "
                        "leaves the C library as it is")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for models with unused weights")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default=None, help="run directory (default runs/<dataset>-<model>-<date-time>)")
    g.add_argument("--resume", default=None, help="checkpoint file or run directory (its last.pt) to continue")
    g.add_argument("--ckpt-every-steps", type=int, default=0,
                   help="also write last.pt every N optimizer steps (0: at epoch ends only)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--log-interval", type=int, default=50, help="steps between progress lines")
    g.add_argument("--progress", choices=("auto", "tqdm", "plain", "none"), default="auto",
                   help="auto: a tqdm bar on a terminal, plain lines otherwise")
    return ap


def parse_args(argv: Optional[Sequence[str]] = None):
    ap = build_parser()
    args = ap.parse_args(argv)
    explicit = _cli.explicit_options(ap, argv if argv is not None else sys.argv[1:])
    return args, explicit


def resolve_options(args: argparse.Namespace) -> None:
    """Fill dataset-dependent defaults and check the values that argparse cannot."""
    if args.dataset is None:
        if not args.data_dir:
            raise SystemExit("mcl-train: choose data: --dataset fashion-mnist (offline), --dataset imagefolder "
                             "--data-dir ROOT (ImageNet layout), or --dataset synthetic (smoke runs)")
        args.dataset = "imagefolder"
    _cli.fill_dataset_defaults(args, DATASET_KEYS)
    _cli.check_img_size(args.img_size, _cli.large_patch(args))
    from .models import list_models
    if args.model not in list_models():
        raise SystemExit(f"--model {args.model!r} is not an MCL model; choose one of {', '.join(list_models())}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        weights = tuple(float(w) for w in args.branch_weights.split(","))
        betas = tuple(float(b) for b in args.betas.split(","))
    except ValueError:
        raise SystemExit(f"--branch-weights and --betas take comma-separated numbers, got "
                         f"{args.branch_weights!r} and {args.betas!r}") from None
    if len(weights) != 3 or len(betas) != 2:
        raise SystemExit(f"--branch-weights needs 3 numbers (large, small, recon branch), --betas 2; got "
                         f"{args.branch_weights!r} and {args.betas!r}")
    if args.no_aug:
        args.mixup, args.cutmix = 0.0, 0.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run: data, model, optimizer and state, on this rank."""

    def __init__(self, args: argparse.Namespace, env: DistEnv, log: _cli.Log, resume_state: Optional[dict]):
        from timm.data import Mixup
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler
        from .loss import MCLLoss

        self.args, self.env, self.log = args, env, log
        dev = env.device
        if args.batch_size % env.world_size:
            raise SystemExit(f"--batch-size {args.batch_size} (global) must divide evenly over {env.world_size} ranks")
        self.per_rank_batch = args.batch_size // env.world_size
        self.mixup_active = args.mixup > 0 or args.cutmix > 0
        if self.mixup_active and self.per_rank_batch % 2:
            raise SystemExit(f"mixup/cutmix pair images within a batch: the per-rank batch must be even, got "
                             f"{self.per_rank_batch} (--batch-size {args.batch_size} over {env.world_size} ranks)")

        # Data (identical on every rank; each rank reads its shard).
        train_base = data.build_dataset(args.dataset, "train", args.data_dir, args.train_limit, args.num_classes or 10,
                                        args.seed, args.train_split)
        val_base = data.build_dataset(args.dataset, "val", args.data_dir, args.val_limit, args.num_classes or 10,
                                      args.seed, args.val_split)
        classes = getattr(train_base, "classes", None)
        self.num_classes = len(classes) if classes else (args.num_classes or 10)
        train_tf = data.build_transform(_cli.transform_config(args, augment=not args.no_aug), training=True)
        self.train_set = data.Transformed(train_base, train_tf)
        self.val_set = data.Transformed(val_base, data.build_transform(_cli.transform_config(args, False), False))
        self.sampler = data.ShardedSampler(len(self.train_set), env.world_size, env.rank, True, args.seed, pad=True)
        self.val_sampler = data.ShardedSampler(len(self.val_set), env.world_size, env.rank, False)
        self.steps_per_epoch = self.sampler.full_length() // self.per_rank_batch
        if self.steps_per_epoch < 1:
            raise SystemExit(f"{len(self.train_set)} training images make no full global batch of {args.batch_size}; "
                             f"lower --batch-size or raise --train-limit")
        self.total_steps = self.steps_per_epoch * args.epochs
        self.workers = args.workers if args.workers is not None else _cli.default_workers(env)
        self.pin = dev.type == "cuda"

        # Model: the same initial weights on every rank (seeded), then rank-specific randomness (drop-path).
        self.model_config = _cli.model_config(args, self.num_classes)
        set_seed(args.seed)
        self.model = _cli.build_model(self.model_config, args.backend, packed=args.packed).to(dev)
        self.ema = None
        if args.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=args.ema_decay, device=dev)
        set_seed(args.seed + env.rank)

        self.train_model: torch.nn.Module = self.model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.train_model = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=args.find_unused_parameters)
        if args.compile:
            self.train_model = torch.compile(self.train_model)

        self.lr = args.lr if args.lr is not None else args.lr_base * args.batch_size / 512
        betas = tuple(float(b) for b in args.betas.split(","))
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=self.lr, weight_decay=args.weight_decay,
                                             eps=args.opt_eps, betas=betas)
        self.warmup_steps = int(round(args.warmup_epochs * self.steps_per_epoch))
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=self.total_steps, lr_min=args.min_lr,
                                           warmup_t=self.warmup_steps, warmup_lr_init=args.warmup_lr,
                                           t_in_epochs=False)
        self.scaler = torch.amp.GradScaler(dev.type) if args.amp == "fp16" else None
        self.autocast = _cli.amp_context(dev, args.amp)
        weights = tuple(float(w) for w in args.branch_weights.split(","))
        self.loss_fn = MCLLoss(label_smoothing=0.0 if self.mixup_active else args.smoothing, branch_weights=weights,
                               recon_weight=args.recon_weight, recon_loss=args.recon_loss,
                               detach_recon_target=args.detach_recon_target)
        self.mixup = None
        if self.mixup_active:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                               switch_prob=args.mixup_switch_prob, mode="batch", label_smoothing=args.smoothing,
                               num_classes=self.num_classes)

        # Where training stands; a resume overwrites all of it.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.accum = self._new_accum()
        self.history: List[Dict[str, Any]] = []
        self.best = {"top1": -1.0, "epoch": -1}
        self.train_time = 0.0
        if resume_state is not None:
            self._load(resume_state)

    # ---- state ----

    @staticmethod
    def _new_accum() -> Dict[str, Any]:
        return {"steps": 0, "images": 0, "sums": {}, "seconds": 0.0}

    def _rank_state(self) -> Dict[str, Any]:
        accum = dict(self.accum, sums={k: float(v) for k, v in self.accum["sums"].items()})
        return {"rng": ckpt.capture_rng(), "accum": accum}

    def state(self) -> Dict[str, Any]:
        """The full checkpoint; collective (every rank contributes its generators and running sums)."""
        ranks = distributed.all_gather_object(self.env, self._rank_state())
        state = {
            "format": ckpt.FORMAT, "version": ckpt.VERSION,
            "model_config": self.model_config,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                         "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                         "world_size": self.env.world_size, "train_time": self.train_time},
            "rng": [r["rng"] for r in ranks],
            "accum": [r["accum"] for r in ranks],
            "args": {k: v for k, v in vars(self.args).items()},
            "metrics": self.history,
            "best": self.best,
            "dataset": data.SYNTHETIC_LABEL if self.args.dataset == "synthetic" else self.args.dataset,
        }
        bad = ckpt.unsafe_value(state)
        if bad:
            raise TypeError(f"internal error: checkpoint would not load with weights_only=True: {bad}")
        return state

    def _load(self, state: Dict[str, Any]) -> None:
        ckpt.check_model_config(state["model_config"], self.model_config, self.args.resume)
        prog = state["progress"]
        if prog["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(f"the checkpoint ran {prog['steps_per_epoch']} steps per epoch, this run would run "
                                  f"{self.steps_per_epoch}: the data or batch size differ; resume with the "
                                  f"original ones")
        ckpt.load_state_strict(self.model, state["model"], "checkpoint 'model'")
        if self.ema is not None:
            if state.get("ema") is None:
                raise CheckpointError("--ema is on but the checkpoint has no EMA weights (it was trained "
                                      "without --ema)")
            ckpt.load_state_strict(self.ema.module, state["ema"], "checkpoint 'ema'")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = prog["epoch"], prog["step_in_epoch"]
        self.global_step, self.train_time = prog["global_step"], prog.get("train_time", 0.0)
        self.history = list(state.get("metrics") or [])
        self.best = dict(state.get("best") or self.best)
        rngs, accums = state["rng"], state.get("accum") or []
        if len(rngs) == self.env.world_size:
            ckpt.restore_rng(rngs[self.env.rank])
            if len(accums) == self.env.world_size:
                self.accum = dict(accums[self.env.rank])
        else:
            # The data order and augmentations still continue exactly (they depend on seed, epoch and index
            # only); the per-rank streams (dropout, drop-path, mixup) cannot be split differently.
            self.log(f"note: the checkpoint was written by {len(rngs)} ranks, this run has {self.env.world_size}: "
                     f"data order and augmentation continue exactly, dropout/mixup random streams restart")
            set_seed(self.args.seed + 7919 * (self.global_step + 1) + self.env.rank)
            self.accum = self._new_accum()

    def save(self, path: str, state: Optional[dict] = None) -> None:
        state = state if state is not None else self.state()
        if self.env.is_main:
            ckpt.save_atomic(state, path)
        distributed.barrier(self.env)

    # ---- steps ----

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
        dev = self.env.device
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        self.scheduler.step_update(self.global_step)  # the learning rate of this step
        with self.autocast():
            out = self.train_model(x)
            loss, parts = self.loss_fn(out, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch} step {self.step_in_epoch} "
                                     f"(global step {self.global_step}); lower --lr, or try --amp bf16 / none")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.args.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return dict(parts, loss=loss.detach())

    def run_epoch(self, ckpt_path: str) -> Dict[str, float]:
        """Train the rest of ``self.epoch`` (all of it, or from a resumed step); returns its averages."""
        args, env = self.args, self.env
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.step_in_epoch * self.per_rank_batch)
        loader = data.build_loader(self.train_set, self.sampler, self.per_rank_batch, self.workers, self.pin,
                                   drop_last=True, seed=args.seed * 100_003 + self.epoch)
        self.model.train()
        progress = _cli.Progress(env, args.progress, self.steps_per_epoch, self.step_in_epoch,
                                 f"epoch {self.epoch + 1}/{args.epochs}", args.log_interval, self.log)
        sums: Dict[str, torch.Tensor] = {}
        t_last = time.perf_counter()
        try:
            for x, y in loader:
                parts = self.train_step(x, y)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.float()
                self.step_in_epoch += 1
                self.global_step += 1
                self.accum["steps"] += 1
                self.accum["images"] += x.shape[0]
                now = time.perf_counter()
                self.accum["seconds"] += now - t_last
                self.train_time += now - t_last
                t_last = now

                def postfix(parts=parts):
                    rate = self.accum["images"] * env.world_size / max(self.accum["seconds"], 1e-9)
                    return {"loss": f"{parts['loss'].item():.4f}", "lr": f"{self.optimizer.param_groups[0]['lr']:.3g}",
                            "img/s": f"{rate:.0f}"}
                progress.update(self.step_in_epoch, postfix)
                if self.step_in_epoch >= self.steps_per_epoch:
                    break
                if args.ckpt_every_steps and self.global_step % args.ckpt_every_steps == 0:
                    self._fold(sums)
                    sums = {}
                    self.save(ckpt_path)
                    self.log(f"checkpoint: {ckpt_path} (epoch {self.epoch + 1}, step {self.step_in_epoch}/"
                             f"{self.steps_per_epoch}, global step {self.global_step})")
                    t_last = time.perf_counter()
        finally:
            progress.close()
        self._fold(sums)
        return self._epoch_means()

    def _fold(self, sums: Dict[str, torch.Tensor]) -> None:
        for k, v in sums.items():
            self.accum["sums"][k] = self.accum["sums"].get(k, 0.0) + float(v)

    def _epoch_means(self) -> Dict[str, float]:
        """Per-image-step averages of the loss parts over the whole epoch and all ranks."""
        keys = sorted(self.accum["sums"])
        vec = torch.tensor([self.accum["sums"][k] for k in keys] + [self.accum["steps"], self.accum["images"]],
                           dtype=torch.float64, device=self.env.device)
        distributed.all_reduce_sum(self.env, vec)
        steps = max(vec[-2].item(), 1.0)
        means = {f"train_{k}": vec[i].item() / steps for i, k in enumerate(keys)}
        seconds = distributed.all_gather_object(self.env, self.accum["seconds"])
        means["train_images"] = int(vec[-1].item())
        means["train_img_per_s"] = vec[-1].item() / max(max(seconds), 1e-9)
        return means

    def evaluate(self) -> Dict[str, float]:
        from .eval import evaluate
        loader = data.build_loader(self.val_set, self.val_sampler, self.per_rank_batch, self.workers, self.pin,
                                   drop_last=False, seed=0)
        self.model.eval()
        branches = {"large": self.model.forward_large, "small": self.model.forward_small}
        if self.ema is not None:
            branches["ema_large"] = self.ema.module.forward_large
        results = evaluate(branches, loader, self.env, self.autocast, self.num_classes)
        self.model.train()
        out: Dict[str, float] = {}
        for name, r in results.items():
            out.update({f"val_{name}_top1": r["top1"], f"val_{name}_top5": r["top5"], f"val_{name}_loss": r["loss"]})
        out["val_images"] = next(iter(results.values()))["count"]
        return out


def default_output(args: argparse.Namespace) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{args.dataset}-{args.model}-{stamp}")


def restore_saved_args(args: argparse.Namespace, explicit: set, saved: Dict[str, Any], path: str) -> None:
    """A resumed run continues the saved recipe: options it was given explicitly must agree with it."""
    conflicts = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (checkpoint: {saved[k]!r})"
                 for k in sorted(explicit - RUNTIME_OPTIONS) if k in saved and getattr(args, k) != saved[k]]
    if conflicts:
        raise CheckpointError(f"--resume {path} continues the original run, but these options differ from it: "
                              f"{'; '.join(conflicts)}. Drop them, or start a new run")
    for k, v in saved.items():
        if k not in RUNTIME_OPTIONS or k not in explicit:
            setattr(args, k, v)


def run(args: argparse.Namespace, explicit: set) -> Dict[str, Any]:
    """Train; returns the summary (also written to summary.json)."""
    resume_state = resume_path = None
    if args.resume:
        resume_path = ckpt.resolve_resume(args.resume)
        resume_state = ckpt.load_checkpoint(resume_path)
        restore_saved_args(args, explicit, resume_state["args"], resume_path)
        args.resume = resume_path
        if "output" not in explicit:
            args.output = os.path.dirname(os.path.abspath(resume_path))
    resolve_options(args)

    env = distributed.init(args.device, args.dist_backend)
    ok = False
    try:
        summary = _run(args, env, resume_state, resume_path)
        ok = True
        return summary
    finally:
        distributed.teardown(synchronize=ok)


def _run(args, env: DistEnv, resume_state, resume_path) -> Dict[str, Any]:
    log = _cli.Log(env)
    if args.amp is None:
        args.amp = _cli.default_amp(env.device)
    args.output = distributed.broadcast_object(env, args.output or default_output(args))
    if env.is_main:
        os.makedirs(args.output, exist_ok=True)
        log.to_file(os.path.join(args.output, "log.txt"))
    synthetic = args.dataset == "synthetic"
    if synthetic:
        log("=" * 78 + "\nSYNTHETIC DATA: random class-coloured images for a smoke run; accuracies mean nothing\n"
            + "=" * 78)

    if env.device.type == "cpu":
        log(f"malloc: {cpu_malloc.apply(args.cpu_malloc)}")
    trainer = Trainer(args, env, log, resume_state)
    paths = ckpt.checkpoint_paths(args.output)
    cfg = trainer.model_config
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"mcl-train: {args.model} ({n_params / 1e6:.2f} M parameters, {cfg['kwargs'] or 'default sizes'}), "
        f"{trainer.num_classes} classes, {args.img_size}px, {args.in_chans} channel(s), backend {args.backend}")
    where = args.data_dir or (data.FASHION_MNIST_DIR if args.dataset == "fashion-mnist" else None)
    log(f"data: {data.SYNTHETIC_LABEL if synthetic else args.dataset}{f' ({where})' if where else ''}: "
        f"{len(trainer.train_set)} train / {len(trainer.val_set)} val images, fit {args.fit}, "
        f"augmentation {'off' if args.no_aug else f'aa {args.aa}, reprob {args.reprob}, scale ({args.scale_min}, 1)'}, "
        f"mixup {args.mixup} cutmix {args.cutmix}")
    log(f"run: {env.world_size} process(es) on {env.device} ({env.backend or 'single'}), global batch "
        f"{args.batch_size} ({trainer.per_rank_batch}/rank), {args.epochs} epochs × {trainer.steps_per_epoch} steps, "
        f"lr {trainer.lr:.3g} (warm-up {trainer.warmup_steps} steps, cosine to {args.min_lr}), wd {args.weight_decay}, "
        f"smoothing {args.smoothing}, drop-path {args.drop_path}, amp {args.amp}, compile {args.compile}, "
        f"ema {args.ema}, workers {trainer.workers}")
    log(f"output: {os.path.abspath(args.output)} (log.txt, metrics.csv/json, last.pt, best.pt, summary.json)")
    if resume_state is not None:
        log(f"resumed from {resume_path}: epoch {trainer.epoch + 1}, step {trainer.step_in_epoch}/"
            f"{trainer.steps_per_epoch} (global step {trainer.global_step})")
    if env.is_main:
        _cli.write_json_atomic(os.path.join(args.output, "args.json"), vars(args))

    t_start = time.perf_counter()
    while trainer.epoch < args.epochs:
        means = trainer.run_epoch(paths["last"])
        record: Dict[str, Any] = {"epoch": trainer.epoch + 1, "global_step": trainer.global_step,
                                  "lr": trainer.optimizer.param_groups[0]["lr"]}
        record.update(means)
        last_epoch = trainer.epoch + 1 == args.epochs
        if (trainer.epoch + 1) % args.eval_every == 0 or last_epoch:
            record.update(trainer.evaluate())
        trainer.history.append(record)
        trainer.epoch += 1
        trainer.step_in_epoch = 0
        trainer.accum = trainer._new_accum()
        improved = "val_large_top1" in record and record["val_large_top1"] > trainer.best["top1"]
        if improved:
            trainer.best = {"top1": record["val_large_top1"], "epoch": record["epoch"]}
        state = trainer.state()
        trainer.save(paths["last"], state)
        if improved:
            trainer.save(paths["best"], state)
        if env.is_main:
            _cli.write_csv_atomic(os.path.join(args.output, "metrics.csv"), trainer.history)
            _cli.write_json_atomic(os.path.join(args.output, "metrics.json"), trainer.history)
        log(format_epoch(record, args.epochs))

    final = trainer.history[-1] if trainer.history else {}
    summary = {
        "dataset": data.SYNTHETIC_LABEL if synthetic else args.dataset,
        "model": args.model, "model_config": trainer.model_config,
        "epochs": args.epochs, "global_steps": trainer.global_step, "world_size": env.world_size,
        "train_seconds": trainer.train_time, "wall_seconds_this_process": time.perf_counter() - t_start,
        "final": {k: v for k, v in final.items() if k.startswith("val_") or k == "train_loss"},
        "best_val_large_top1": trainer.best["top1"], "best_epoch": trainer.best["epoch"],
        "checkpoints": {"last": os.path.abspath(paths["last"]),
                        "best": os.path.abspath(paths["best"]) if trainer.best["epoch"] > 0 else None},
        "output": os.path.abspath(args.output),
    }
    if env.is_main:
        _cli.write_json_atomic(os.path.join(args.output, "summary.json"), summary)
    log(format_summary(summary))
    return summary


def format_epoch(r: Dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"train loss {r.get('train_loss', float('nan')):.4f}"]
    for k in sorted(r):
        if k.startswith("train_") and k not in ("train_loss", "train_images", "train_img_per_s"):
            parts.append(f"{k[6:]} {r[k]:.4f}")
    if "val_large_top1" in r:
        parts.append(f"| val large top-1 {r['val_large_top1']:.2f} top-5 {r['val_large_top5']:.2f}, small top-1 "
                     f"{r['val_small_top1']:.2f} top-5 {r['val_small_top5']:.2f}")
        if "val_ema_large_top1" in r:
            parts.append(f"ema large top-1 {r['val_ema_large_top1']:.2f}")
    parts.append(f"| {r.get('train_img_per_s', 0):.0f} img/s")
    return " ".join(parts)


def format_summary(s: Dict[str, Any]) -> str:
    f = s["final"]
    lines = ["", "=" * 78, f"mcl-train summary: {s['model']} on {s['dataset']}",
             f"  {s['epochs']} epochs, {s['global_steps']} steps, {s['world_size']} process(es), "
             f"{s['train_seconds']:.1f} s training"]
    if "val_large_top1" in f:
        lines.append(f"  final: large (deployed) top-1 {f['val_large_top1']:.2f} top-5 {f['val_large_top5']:.2f}; "
                     f"small top-1 {f['val_small_top1']:.2f} top-5 {f['val_small_top5']:.2f}")
        lines.append(f"  best large top-1 {s['best_val_large_top1']:.2f} at epoch {s['best_epoch']}")
    lines += [f"  checkpoints: {s['checkpoints']['last']}" + (f", {s['checkpoints']['best']}" if
                                                              s['checkpoints']['best'] else ""),
              f"  next: mcl-eval {s['checkpoints']['last']}   |   mcl-export {s['checkpoints']['last']}", "=" * 78]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, explicit = parse_args(argv)
    try:
        run(args, explicit)
    except CheckpointError as exc:
        print(f"mcl-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
