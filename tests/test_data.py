"""Data pipeline of the CLIs: IDX reading, Fashion-MNIST, transforms (pad / resize, channels), and the
deterministic, resumable, rank-sharded sampling that exact resumption relies on."""
import gzip
import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from mcl_kernels import data

HAVE_FMNIST = all(os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, f))
                  for pair in data.FASHION_MNIST_FILES.values() for f in pair)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not installed in {data.FASHION_MNIST_DIR} "
                                  "(apt-get install dataset-fashion-mnist)")


def write_idx(path, array, type_code=0x08, compress=True):
    header = bytes([0, 0, type_code, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    payload = header + array.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    path = str(tmp_path / ("x.idx.gz" if compress else "x.idx"))
    write_idx(path, images, compress=compress)
    out = data.read_idx(path)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    labels = np.array([3, 1, 4], dtype=">i4")
    write_idx(path, labels, type_code=0x0C, compress=compress)
    np.testing.assert_array_equal(data.read_idx(path), [3, 1, 4])


def test_read_idx_errors(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(bad))
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([2, 4, 4], dtype=">u4").tobytes() + b"\x00" * 10)
    with pytest.raises(ValueError, match=r"needs 48 bytes, the file has 26"):
        data.read_idx(str(short))
    notgz = tmp_path / "plain.gz"
    notgz.write_bytes(b"definitely not gzip")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        data.read_idx(str(notgz))


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("train", str(tmp_path))


@needs_fmnist
def test_fashion_mnist_real_files():
    train, val = data.fashion_mnist("train"), data.fashion_mnist("val")
    assert len(train) == 60000 and len(val) == 10000
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert train.labels[0] == 9 and val.labels[:5].tolist() == [9, 2, 1, 1, 6]  # known first labels
    assert np.bincount(train.labels).tolist() == [6000] * 10
    # The normalization constants are this data's statistics.
    assert abs(train.images.mean() / 255 - data.FASHION_MNIST_MEAN) < 1e-3
    assert abs(train.images.std() / 255 - data.FASHION_MNIST_STD) < 1e-3
    img, label = train[0]
    assert img.size == (28, 28) and img.mode == "L" and label == 9


def small_gray(n=6, size=28):
    rng = np.random.RandomState(1)
    return data.ArrayImages(rng.randint(0, 256, (n, size, size), dtype=np.uint8), np.arange(n) % 3, ["a", "b", "c"])


@pytest.mark.parametrize("in_chans", [1, 3])
def test_pad_keeps_pixels_and_channels(in_chans):
    ds = small_gray()
    cfg = data.TransformConfig(img_size=32, in_chans=in_chans, mean=(0.5,) * in_chans, std=(0.25,) * in_chans,
                               fit="pad")
    x = data.build_transform(cfg, training=False)(ds[0][0])
    assert x.shape == (in_chans, 32, 32)
    raw = torch.from_numpy(ds.images[0]).float() / 255
    expected = (raw - 0.5) / 0.25
    for c in range(in_chans):  # grayscale repeated into every channel, pixels untouched, border = padding
        torch.testing.assert_close(x[c, 2:30, 2:30], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(x[c, :2], torch.full((2, 32), -2.0))


def test_pad_refuses_images_larger_than_target():
    cfg = data.TransformConfig(img_size=32, in_chans=1, mean=(0.5,), std=(0.5,), fit="pad")
    with pytest.raises(ValueError, match="--fit pad needs images no larger than --img-size 32, got 40×40"):
        data.build_transform(cfg, training=False)(small_gray(size=40)[0][0])


@pytest.mark.parametrize("training", [False, True])
def test_resize_and_augment_shapes(training):
    ds = small_gray()
    cfg = data.TransformConfig(img_size=64, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, fit="resize", crop_pct=1.0)
    x = data.build_transform(cfg, training)(ds[1][0])
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32


def test_sampler_matches_distributed_sampler_order():
    for n, world in [(10, 1), (10, 2), (11, 3)]:
        for rank in range(world):
            ours = data.ShardedSampler(n, world, rank, shuffle=True, seed=5)
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
            for epoch in (0, 3):
                ours.set_epoch(epoch)
                ref.set_epoch(epoch)
                assert [i for i, _ in ours] == list(ref)


def test_sampler_shards_cover_data_once_for_global_batches():
    # The global batch of a 1-process run is exactly the union of the ranks' per-rank batches.
    n, batch, world = 24, 8, 2
    single = [i for i, _ in data.ShardedSampler(n, 1, 0, seed=1)]
    shards = [[i for i, _ in data.ShardedSampler(n, world, r, seed=1)] for r in range(world)]
    per = batch // world
    for step in range(n // batch):
        union = sorted(sum((s[step * per:(step + 1) * per] for s in shards), []))
        assert union == sorted(single[step * batch:(step + 1) * batch])


def test_eval_sampler_has_no_padding_duplicates():
    n, world = 11, 4
    shards = [list(data.ShardedSampler(n, world, r, shuffle=False)) for r in range(world)]
    flat = sorted(i for s in shards for i, _ in s)
    assert flat == list(range(n))
    assert [len(s) for s in shards] == [3, 3, 3, 2]


def test_sampler_start_and_sample_seeds():
    s = data.ShardedSampler(20, 2, 1, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:] and len(s) == len(full) - 4 and s.full_length() == len(full)
    # Seeds belong to (seed, epoch, index): the same on every rank, new each epoch.
    other = data.ShardedSampler(20, 2, 0, seed=3)
    other.set_epoch(2)
    assert torch.equal(other.sample_seeds(), s.sample_seeds())
    seeds = dict(full)
    assert all(s.sample_seeds()[i].item() == sd for i, sd in seeds.items())
    assert len(set(s.sample_seeds().tolist())) == 20
    s.set_epoch(3)
    s.set_start(0)
    assert dict(s) != seeds


def test_augmentation_depends_only_on_the_key():
    ds = small_gray()
    cfg = data.TransformConfig(img_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(0.3, 1.0))
    tds = data.Transformed(ds, data.build_transform(cfg, training=True))
    a = tds[(2, 1234)][0]
    for key in [(0, 1), (2, 99), (5, 1234)]:  # other draws in between must not matter
        tds[key]
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    assert torch.equal(tds[(2, 1234)][0], a)
    assert not torch.equal(tds[(2, 1235)][0], a)


def test_seeded_rngs_leave_global_generators_untouched():
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    with data.seeded_rngs(123):
        torch.rand(5), random.random(), np.random.rand(4)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_loader_is_identical_with_and_without_workers_and_after_a_restart():
    ds = data.Transformed(small_gray(n=16), data.build_transform(
        data.TransformConfig(img_size=32, in_chans=1, mean=(0.5,), std=(0.5,), scale=(0.3, 1.0)), training=True))

    def batches(workers, start=0):
        s = data.ShardedSampler(len(ds), 1, 0, seed=9)
        s.set_epoch(1)
        s.set_start(start)
        return [x for x, _ in data.build_loader(ds, s, 4, workers, False, drop_last=True, seed=0)]

    before = torch.get_rng_state()
    plain = batches(0)
    assert torch.equal(torch.get_rng_state(), before)  # the loader draws nothing from the global generator
    with_workers = batches(2)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_workers))
    resumed = batches(0, start=8)  # a run resumed after two batches
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(plain[2:], resumed))


def test_limited_subset_is_fixed_and_class_mixed():
    sorted_by_class = data.ArrayImages(np.zeros((100, 4, 4), np.uint8), np.repeat(np.arange(10), 10),
                                       [str(i) for i in range(10)])
    a, b = data.Limited(sorted_by_class, 20), data.Limited(sorted_by_class, 20)
    assert a.indices == b.indices and len(a) == 20
    assert len({sorted_by_class[i][1] for i in a.indices}) >= 5
    assert len(data.Limited(sorted_by_class, 1000)) == 100


def test_synthetic_is_deterministic_and_labelled():
    a, b = data.SyntheticImages(8, 4, "train", seed=1), data.SyntheticImages(8, 4, "train", seed=1)
    assert all(np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and a[i][1] == b[i][1] for i in range(8))
    val = data.SyntheticImages(8, 4, "val", seed=1)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(val[0][0]))
    assert "synthetic" in data.SYNTHETIC_LABEL and "mean nothing" in data.SYNTHETIC_LABEL


def test_image_folder_layout_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageNet layout"):
        data.build_dataset("imagefolder", "train", str(tmp_path))
    with pytest.raises(ValueError, match="needs --data-dir"):
        data.build_dataset("imagefolder", "train", None)


def test_image_folder_reads_a_tree(tmp_path):
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / "train" / cls / f"{i}.png")
    ds = data.build_dataset("imagefolder", "train", str(tmp_path), limit=4)
    assert len(ds) == 4 and ds.classes == ["cat", "dog"]
    cfg = data.TransformConfig(img_size=32, in_chans=1, mean=(0.5,), std=(0.5,))
    x, y = data.Transformed(ds, data.build_transform(cfg, training=False))[0]
    assert x.shape == (1, 32, 32) and y in (0, 1)


def test_randaugment_posterize_to_zero_bits_does_not_crash():
    # RandAugment's magnitude noise reaches level 10, which PosterizeIncreasing maps to 0 bits; newer Pillow
    # rejects 0 bits, so without the fix a training run crashes at a random step.
    from PIL import Image
    tf = data.build_transform(data.TransformConfig(img_size=32, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3), True)
    ops = [op for t in tf.transforms[-1].transforms for op in getattr(t, "ops", []) if "Posterize" in op.name]
    assert ops and all(op.aug_fn is data._posterize for op in ops)
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(ops[0].aug_fn(img, 0)).max() == 0
    assert np.asarray(ops[0].aug_fn(img, 1)).tolist() == np.asarray(img.point(lambda v: v & 0x80)).tolist()
