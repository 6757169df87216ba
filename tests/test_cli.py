"""mcl-train / mcl-eval / mcl-export end to end on the CPU with a tiny model: synthetic data, a few hundred
real Fashion-MNIST images, a run killed with SIGKILL mid-epoch and resumed, and bad checkpoints."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from mcl_kernels import checkpoint as ckpt
from mcl_kernels import data, eval as mcl_eval, export as mcl_export, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_FMNIST = all(os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, f))
                  for pair in data.FASHION_MNIST_FILES.values() for f in pair)
# A 2-block, 32-wide MCL-DeiT: seconds per run on a CPU.
TINY = ["--model", "mcl_deit_tiny_patch32_224", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--workers", "0", "--progress", "plain", "--log-interval", "1000"]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_synthetic_train_eval_export(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = train.main(TINY + ["--dataset", "synthetic", "--img-size", "32", "--epochs", "2", "--batch-size", "16",
                            "--train-limit", "64", "--val-limit", "24", "--ema", "--ema-decay", "0.9",
                            "--mixup", "0.8", "--cutmix", "1.0", "--output", out])
    text = capsys.readouterr().out
    assert rc == 0
    assert "SYNTHETIC DATA" in text and "mcl-train summary" in text
    assert "malloc: " in text  # the CPU allocator setting (mcl_kernels.cpu_malloc) is logged
    for name in ("log.txt", "args.json", "metrics.csv", "metrics.json", "summary.json", "last.pt", "best.pt"):
        assert os.path.isfile(os.path.join(out, name)), name
    history = read_json(os.path.join(out, "metrics.json"))
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["global_step"] == 8
    assert all(r["val_images"] == 24 for r in history)
    summary = read_json(os.path.join(out, "summary.json"))
    assert summary["dataset"] == data.SYNTHETIC_LABEL
    with open(os.path.join(out, "metrics.csv")) as f:
        assert len(f.read().strip().splitlines()) == 3  # header + 2 epochs

    # mcl-eval on the checkpoint re-derives the run's own validation numbers (same data by default).
    res_json = str(tmp_path / "eval.json")
    assert mcl_eval.main([os.path.join(out, "last.pt"), "--workers", "0", "--progress", "none",
                          "--json", res_json]) == 0
    results = read_json(res_json)["results"]
    for branch in ("large", "small"):
        assert results[branch]["count"] == 24
        assert results[branch]["top1"] == pytest.approx(history[-1][f"val_{branch}_top1"], abs=1e-9)
        assert results[branch]["loss"] == pytest.approx(history[-1][f"val_{branch}_loss"], rel=1e-5)
    assert mcl_eval.main([os.path.join(out, "last.pt"), "--use-ema", "--workers", "0", "--progress", "none",
                          "--json", res_json]) == 0
    assert read_json(res_json)["results"]["large"]["top1"] == pytest.approx(history[-1]["val_ema_large_top1"])
    capsys.readouterr()

    # mcl-export: fast (/32) and accurate (/16) deployed models in three formats, each checked.
    exp = str(tmp_path / "export")
    assert mcl_export.main([os.path.join(out, "last.pt"), "--output-dir", exp]) == 0
    text = capsys.readouterr().out
    manifest = read_json(os.path.join(exp, "manifest.json"))
    assert {(e["mode"], e["format"]) for e in manifest["exports"]} == {
        (m, f) for m in ("fast", "accurate") for f in ("eager", "safetensors", "torchscript", "onnx")}
    for e in manifest["exports"]:
        assert e["max_abs_err"] <= manifest["atol"], e
        assert e["format"] == "eager" or os.path.isfile(e["path"])
    assert re.search(r"max abs err", text)

    # The exported fast model, evaluated from each file, scores what the checkpoint's large branch scores.
    for e in manifest["exports"]:
        if e["mode"] != "fast" or e["format"] == "eager":
            continue
        assert mcl_eval.main([e["path"], "--dataset", "synthetic", "--val-limit", "24", "--img-size", "32",
                              "--workers", "0", "--progress", "none", "--json", res_json]) == 0
        deployed = read_json(res_json)["results"]["deployed"]
        assert deployed["count"] == 24
        assert deployed["top1"] == pytest.approx(results["large"]["top1"]), e["format"]
        assert deployed["loss"] == pytest.approx(results["large"]["loss"], rel=1e-4), e["format"]


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not installed in {data.FASHION_MNIST_DIR} "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_few_hundred_images_learns(tmp_path, capsys):
    out = str(tmp_path / "fm")
    # Grayscale model (1 channel), 28 -> 32 by zero padding, no resampling.
    rc = train.main(TINY + ["--dataset", "fashion-mnist", "--train-limit", "512", "--val-limit", "256",
                            "--img-size", "32", "--fit", "pad", "--in-chans", "1", "--epochs", "4",
                            "--batch-size", "32", "--lr", "3e-3", "--warmup-epochs", "0.5", "--no-aug",
                            "--output", out])
    text = capsys.readouterr().out
    assert rc == 0 and "fashion-mnist" in text and "SYNTHETIC" not in text
    history = read_json(os.path.join(out, "metrics.json"))
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < 0.8 * losses[0], losses
    # 10 balanced classes: chance is 10%.
    assert history[-1]["val_large_top1"] > 40 and history[-1]["val_small_top1"] > 40, history[-1]
    assert history[-1]["val_large_top5"] > 80, history[-1]


def test_killed_mid_epoch_then_resumed_matches_uninterrupted(tmp_path):
    # Augmentation, mixup/cutmix, drop-path and EMA all on: every random stream must continue exactly.
    args = TINY + ["--dataset", "synthetic", "--img-size", "32", "--epochs", "4", "--batch-size", "16",
                   "--train-limit", "128", "--val-limit", "16", "--mixup", "0.8", "--cutmix", "1.0",
                   "--drop-path", "0.1", "--ema", "--ema-decay", "0.9", "--seed", "3", "--ckpt-every-steps", "3"]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert train.main(args + ["--output", ref_dir]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "mcl_kernels.train"] + args + ["--output", run_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            m = re.search(r"checkpoint: .* global step (\d+)\)", line)
            if m and int(m.group(1)) >= 9:  # in epoch 2 of 4 (8 steps per epoch): 23 steps left as margin
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    killed_at = ckpt.load_checkpoint(os.path.join(run_dir, "last.pt"))["progress"]
    assert 0 < killed_at["step_in_epoch"] < killed_at["steps_per_epoch"], killed_at  # a mid-epoch checkpoint
    assert killed_at["global_step"] < 32

    assert train.main(["--resume", run_dir, "--workers", "0", "--progress", "plain"]) == 0
    ref = ckpt.load_checkpoint(os.path.join(ref_dir, "last.pt"))
    got = ckpt.load_checkpoint(os.path.join(run_dir, "last.pt"))
    assert got["progress"]["global_step"] == ref["progress"]["global_step"] == 32
    for part in ("model", "ema"):
        for k, v in ref[part].items():
            torch.testing.assert_close(got[part][k], v, atol=1e-6, rtol=0, msg=f"{part}.{k}")
    for pid, s in ref["optimizer"]["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(got["optimizer"]["state"][pid][k], v, atol=1e-6, rtol=0)
    ref_hist = read_json(os.path.join(ref_dir, "metrics.json"))
    got_hist = read_json(os.path.join(run_dir, "metrics.json"))
    assert len(got_hist) == len(ref_hist) == 4
    for a, b in zip(got_hist, ref_hist):
        for k in ("train_loss", "val_large_top1", "val_small_loss", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (k, a, b)


def test_bad_checkpoints_get_clear_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    foreign = tmp_path / "foreign.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, foreign)
    for path, what in ((garbage, "truncated or corrupt"), (foreign, "bare state dict")):
        assert train.main(["--resume", str(path)]) == 2
        assert what in capsys.readouterr().err
        assert mcl_eval.main([str(path), "--dataset", "synthetic"]) == 2
        assert what in capsys.readouterr().err
        assert mcl_export.main([str(path), "--output-dir", str(tmp_path / "x")]) == 2
        assert what in capsys.readouterr().err


def test_resume_refuses_a_different_recipe(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = TINY + ["--dataset", "synthetic", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
                   "--train-limit", "32", "--val-limit", "8", "--output", out]
    assert train.main(base) == 0
    capsys.readouterr()
    assert train.main(["--resume", out, "--lr", "0.5", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (checkpoint: None)" in err and "continues the original run" in err
    # Changing how it runs is fine; the finished run has nothing left to do.
    assert train.main(["--resume", out, "--workers", "0", "--progress", "none"]) == 0


def test_option_errors(tmp_path):
    with pytest.raises(SystemExit, match="choose data: --dataset fashion-mnist"):
        train.main([])
    with pytest.raises(SystemExit, match="--img-size must be a positive multiple of the large patch 32, got 28"):
        train.main(["--dataset", "synthetic", "--img-size", "28"])
    with pytest.raises(SystemExit, match="per-rank batch must be even"):
        train.main(TINY + ["--dataset", "synthetic", "--img-size", "32", "--batch-size", "15", "--mixup", "0.8",
                           "--output", str(tmp_path / "o")])


def test_module_entry_points_run():
    for module in ("train", "eval", "export"):
        r = subprocess.run([sys.executable, "-m", f"mcl_kernels.{module}", "--help"], capture_output=True, text=True,
                           env=subprocess_env(), timeout=120)
        assert r.returncode == 0 and f"mcl-{module}" in r.stdout, r.stderr


def test_packed_training_matches_two_pass_training(tmp_path):
    # --packed changes how the branches run (one block-diagonal sequence), not what is computed: with no
    # randomness that packing draws differently (drop path, dropout), training gives the same weights.
    args = TINY + ["--dataset", "synthetic", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
                   "--train-limit", "64", "--val-limit", "16", "--no-aug", "--drop-path", "0", "--seed", "5",
                   "--lr", "1e-3", "--warmup-epochs", "0"]
    plain_dir, packed_dir = str(tmp_path / "plain"), str(tmp_path / "packed")
    assert train.main(args + ["--output", plain_dir]) == 0
    assert train.main(args + ["--output", packed_dir, "--packed"]) == 0
    plain = ckpt.load_checkpoint(os.path.join(plain_dir, "last.pt"))["model"]
    packed = ckpt.load_checkpoint(os.path.join(packed_dir, "last.pt"))["model"]
    assert plain.keys() == packed.keys()  # packing keeps timm's state-dict layout
    D = 32
    for k, v in plain.items():
        got = packed[k]
        if k.endswith("attn.qkv.bias"):
            # The key bias's gradient is zero in exact arithmetic (softmax cancels it); Adam turns its rounding
            # noise into steps of about the learning rate, so only the query and value parts are compared.
            v, got = torch.cat([v[:D], v[2 * D:]]), torch.cat([got[:D], got[2 * D:]])
        torch.testing.assert_close(got, v, atol=2e-5, rtol=0, msg=f"model.{k}")
    hist = [read_json(os.path.join(d, "metrics.json"))[-1] for d in (plain_dir, packed_dir)]
    assert hist[0]["train_loss"] == pytest.approx(hist[1]["train_loss"], rel=1e-5)
