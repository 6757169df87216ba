"""Datasets, transforms and loaders for the training and evaluation CLIs.

Three sources, all yielding ``(PIL image, int label)`` before transforms, so every one goes through
the same pipeline (timm's ``create_transform``: random-resized crop, flip, RandAugment, random erasing):

- ``imagefolder``: an ImageNet-style tree ``ROOT/{train,val}/<class>/<image>`` (torchvision ImageFolder);
- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` package, read with gzip + numpy
  (nothing is downloaded); 28×28 grayscale, fitted to ``img_size`` by resizing or zero-padding;
- ``synthetic``: class-dependent random images generated on the fly, for smoke runs only.

Grayscale and colour are reconciled by converting every image to the model's channel count
(``in_chans=1``: PIL mode "L"; ``in_chans=3``: "RGB", a grayscale image repeated to three channels).

Determinism (what makes ``mcl-train --resume`` continue exactly): the sampler draws, per epoch, a
permutation (the same one ``torch.utils.data.DistributedSampler`` draws: ``randperm`` seeded with
``seed + epoch``) and one 63-bit seed per dataset index; it yields ``(index, sample_seed)`` keys and the
dataset seeds Python's, NumPy's and torch's CPU generators from that key around the transform (restoring
them after). So a sample's augmentation depends only on ``(seed, epoch, index)``: not on the worker
that loads it, the number of workers or ranks, or where in the epoch a resumed run starts.
"""
from __future__ import annotations

import gzip
import math
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

DATASETS = ("imagefolder", "fashion-mnist", "synthetic")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# Per-channel statistics of the Fashion-MNIST training images (pixel values / 255).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SYNTHETIC_SIZES = {"train": 1024, "val": 256}
SYNTHETIC_SOURCE_SIZE = 40  # synthetic images are made at 40×40 and fitted like any other source
SYNTHETIC_LABEL = "synthetic (random images for smoke runs: the numbers mean nothing)"

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the third byte of the magic number.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): ``[n, rows, cols]`` images or ``[n]`` labels, as stored."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: expected magic bytes 00 00 <type> <ndim>, "
                         f"got {data[:4].hex(' ')}")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes for {ndim} dimensions)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX shape {shape} of {dtype} needs {expected} bytes, the file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


class ArrayImages(Dataset):
    """Images held in memory as uint8 ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]``, with int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N={images.shape[0]}], got {labels.shape}")
        if labels.size and not (0 <= labels.min() and labels.max() < len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes)}), got [{labels.min()}, {labels.max()}]")
        self.images, self.labels, self.classes = images, labels.astype(np.int64), list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image
        return Image.fromarray(self.images[index]), int(self.labels[index])


def fashion_mnist(split: str, root: Optional[str] = None) -> ArrayImages:
    """Fashion-MNIST ``split`` ("train": 60000 images, "val": the 10000 test images) from IDX files."""
    root = root or FASHION_MNIST_DIR
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}")
    paths = [os.path.join(root, name) for name in FASHION_MNIST_FILES[split]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install Debian's package "
            f"(sudo apt-get install dataset-fashion-mnist, which puts them in {FASHION_MNIST_DIR}) or pass "
            f"--data-dir DIR holding {', '.join(sorted(n for pair in FASHION_MNIST_FILES.values() for n in pair))}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: expected images [N, 28, 28] and labels [N], got "
                         f"{images.shape} and {labels.shape}")
    return ArrayImages(images, labels, FASHION_MNIST_CLASSES)


class SyntheticImages(Dataset):
    """Random RGB images whose colour pattern depends on the class (so a model can fit them), made on the
    fly from ``(seed, split, index)``: for smoke runs of the pipeline only."""

    def __init__(self, size: int, num_classes: int = 10, split: str = "train", seed: int = 0,
                 image_size: int = SYNTHETIC_SOURCE_SIZE):
        if size < 1 or num_classes < 2:
            raise ValueError(f"synthetic data needs size >= 1 and num_classes >= 2, got {size} and {num_classes}")
        self.size, self.image_size = size, image_size
        self.classes = [f"class_{i}" for i in range(num_classes)]
        self.split_seed = seed * 1000 + (0 if split == "train" else 1)
        g = torch.Generator().manual_seed(seed)
        # One coarse 4×4 colour pattern per class, upsampled: learnable with a handful of steps.
        self.patterns = torch.rand(num_classes, 3, 4, 4, generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        from PIL import Image
        g = torch.Generator().manual_seed(self.split_seed * 1_000_003 + index)
        label = int(torch.randint(len(self.classes), (), generator=g))
        s = self.image_size
        base = torch.nn.functional.interpolate(self.patterns[label][None], size=(s, s), mode="nearest")[0]
        img = (0.7 * base + 0.3 * torch.rand(3, s, s, generator=g)).clamp(0, 1)
        return Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()), label


def image_folder(root: str, split: str) -> Dataset:
    """torchvision ImageFolder over ``root/split`` (ImageNet layout: one folder per class)."""
    from torchvision.datasets import ImageFolder
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"ImageFolder split {split!r} not found: {path} is not a directory. Expected the "
                                f"ImageNet layout ROOT/train/<class>/*.jpeg and ROOT/val/<class>/*.jpeg "
                                f"(--data-dir ROOT, --train-split/--val-split to rename)")
    return ImageFolder(path)


class Limited(Dataset):
    """The first ``limit`` items of a fixed (seed-independent) shuffle of ``base``: a class-mixed subset
    even for class-sorted sources like ImageFolder, and the same subset in every run."""

    def __init__(self, base: Dataset, limit: int):
        if limit < 1:
            raise ValueError(f"a dataset limit must be >= 1, got {limit}")
        n = len(base)
        self.base, self.classes = base, getattr(base, "classes", None)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:min(limit, n)]
        self.indices = sorted(order.tolist())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[self.indices[index]]


def build_dataset(name: str, split: str, data_dir: Optional[str] = None, limit: Optional[int] = None,
                  num_classes: int = 10, seed: int = 0, split_dir: Optional[str] = None) -> Dataset:
    """The untransformed dataset (PIL image, label) for ``split`` in ("train", "val")."""
    if name == "imagefolder":
        if not data_dir:
            raise ValueError("--dataset imagefolder needs --data-dir ROOT (ImageNet layout: ROOT/train, ROOT/val)")
        ds = image_folder(data_dir, split_dir or split)
    elif name == "fashion-mnist":
        ds = fashion_mnist(split, data_dir)
    elif name == "synthetic":
        ds = SyntheticImages(limit or SYNTHETIC_SIZES[split], num_classes, split, seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return Limited(ds, limit) if limit is not None and name != "synthetic" else ds


def dataset_stats(name: str, in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Normalization mean and std per channel for the source and channel count."""
    if name == "fashion-mnist":
        return (FASHION_MNIST_MEAN,) * in_chans, (FASHION_MNIST_STD,) * in_chans
    if name == "synthetic":
        return (0.5,) * in_chans, (0.5,) * in_chans
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    # Grayscale from colour sources (PIL "L" = 0.299 R + 0.587 G + 0.114 B): the same mix of the stats.
    w = (0.299, 0.587, 0.114)
    return ((sum(a * b for a, b in zip(w, IMAGENET_MEAN)),) * in_chans,
            (sum(a * b for a, b in zip(w, IMAGENET_STD)),) * in_chans)


@dataclass
class TransformConfig:
    """What the train and eval pipelines do (timm ``create_transform`` arguments, DeiT values by default)."""
    img_size: int = 224
    in_chans: int = 3
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    fit: str = "resize"            # "resize" or "pad" (zero-pad the source up to img_size)
    augment: bool = True           # False: the train pipeline is the (deterministic) eval pipeline
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.3      # used by timm only when auto_augment is off
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    re_prob: float = 0.25
    crop_pct: float = 0.875        # eval: resize to img_size / crop_pct, then centre-crop img_size


class PadTo:
    """Zero-pad a PIL image (centred) to ``size × size``: 28×28 Fashion-MNIST -> 32×32, no resampling."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        from PIL import ImageOps
        w, h = img.size
        if w > self.size or h > self.size:
            raise ValueError(f"--fit pad needs images no larger than --img-size {self.size}, got {w}×{h}; "
                             f"use --fit resize or a larger --img-size")
        left, top = (self.size - w) // 2, (self.size - h) // 2
        return ImageOps.expand(img, (left, top, self.size - w - left, self.size - h - top), fill=0)

    def __repr__(self) -> str:
        return f"PadTo(size={self.size})"


def build_transform(cfg: TransformConfig, training: bool) -> Callable:
    """PIL image -> normalized float tensor ``[in_chans, img_size, img_size]``."""
    from timm.data import create_transform
    from torchvision import transforms
    if cfg.fit not in ("resize", "pad"):
        raise ValueError(f"fit must be 'resize' or 'pad', got {cfg.fit!r}")
    input_size = (cfg.in_chans, cfg.img_size, cfg.img_size)
    common = dict(input_size=input_size, interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std))
    if training and cfg.augment:
        tf = create_transform(is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
                              color_jitter=cfg.color_jitter, auto_augment=cfg.auto_augment or None,
                              re_prob=cfg.re_prob, re_mode="pixel", re_count=1, **common)
    else:
        # A padded image already has the target size: no crop margin to take off.
        crop_pct = 1.0 if cfg.fit == "pad" else cfg.crop_pct
        tf = create_transform(is_training=False, crop_pct=crop_pct, **common)
    _allow_zero_bit_posterize(tf)
    steps = [ConvertMode("L" if cfg.in_chans == 1 else "RGB")]
    if cfg.fit == "pad":
        steps.append(PadTo(cfg.img_size))
    return transforms.Compose(steps + [tf])


def _posterize(img, bits_to_keep, **_):
    """timm's posterize with 0 bits allowed: an all-black image, as Pillow < 12 gave. RandAugment's
    PosterizeIncreasing maps the top magnitude (10, reached through magnitude noise) to 0 bits, which newer
    Pillow rejects ("bits must be between or equal to 1 and 8"), crashing a training run at random."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize


class ConvertMode:
    """PIL ``convert`` to "L" (1 channel) or "RGB" (3 channels; grayscale sources repeated)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


@contextmanager
def seeded_rngs(seed: int):
    """Seed Python's, NumPy's and torch's CPU generators for the body, then restore them: transforms
    draw from all three (timm RandAugment: numpy and random; torchvision and random erasing: torch)."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also reseed the GPUs
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.default_generator.set_state(torch_state)


class Transformed(Dataset):
    """``base`` with ``transform`` applied, indexed by the sampler's ``(index, sample_seed)`` keys."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, key)
        img, label = self.base[index]
        with seeded_rngs(sample_seed):
            return self.transform(img), label


class ShardedSampler(Sampler):
    """Deterministic, resumable, rank-sharded sampler yielding ``(index, sample_seed)`` keys.

    ``shuffle=True`` (training) matches ``DistributedSampler(shuffle=True, seed, drop_last=pad is False)``:
    permutation ``randperm(n)`` from ``seed + epoch``, padded by wrapping (``pad=True``) or cut
    (``pad=False``) to a multiple of ``world_size``, rank ``r`` taking ``perm[r::world_size]``.
    ``shuffle=False`` (evaluation) takes ``r::world_size`` of ``0..n-1`` with no padding, so every
    sample is counted exactly once across ranks (shards may differ in length by one).
    ``set_start(k)`` skips this rank's first ``k`` keys of the epoch (a mid-epoch resume).
    """

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 pad: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.n, self.world_size, self.rank, self.shuffle, self.seed, self.pad = n, world_size, rank, shuffle, seed, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def _order(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world_size))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.pad:
            total = math.ceil(self.n / self.world_size) * self.world_size
            while len(order) < total:
                order += order[:total - len(order)]
        else:
            order = order[:self.n - self.n % self.world_size]
        return order[self.rank::self.world_size]

    def sample_seeds(self) -> torch.Tensor:
        """One seed per dataset index for this epoch: ``[n]`` int64, the same on every rank."""
        g = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + self.epoch)
        return torch.randint(0, 2**62, (self.n,), generator=g, dtype=torch.int64)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = self._order()[self.start:]
        seeds = self.sample_seeds().tolist() if self.shuffle else None
        for i in order:
            yield (i, seeds[i] if seeds is not None else i)

    def __len__(self) -> int:
        return max(0, len(self._order()) - self.start)

    def full_length(self) -> int:
        """Keys per epoch on this rank, ignoring ``set_start``."""
        return len(self._order())


def build_loader(dataset: Dataset, sampler: ShardedSampler, batch_size: int, workers: int, pin_memory: bool,
                 drop_last: bool, seed: int) -> DataLoader:
    """A DataLoader over ``dataset`` in ``sampler``'s order with its own generator: creating its iterator
    then draws nothing from torch's global generator (which dropout and drop-path use)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=drop_last, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False)
