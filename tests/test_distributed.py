"""torchrun with 2 gloo processes on the CPU: DDP training equals one process on the same global batch, and
distributed evaluation counts every image exactly once."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mcl_kernels import checkpoint as ckpt
from mcl_kernels import _cli, eval as mcl_eval, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "mcl_deit_tiny_patch32_224", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--workers", "0", "--progress", "plain", "--log-interval", "1000"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module, args, nproc=2, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on a small CPU: one thread each
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", f"mcl_kernels.{module}"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    # No random augmentation, no drop-path or mixup: the only difference left is who computes which half
    # of each global batch (DistributedSampler order, per-rank batch = global / 2, gradients averaged).
    args = TINY + ["--dataset", "synthetic", "--img-size", "32", "--epochs", "2", "--batch-size", "16",
                   "--train-limit", "64", "--val-limit", "21", "--no-aug", "--drop-path", "0", "--lr", "1e-2",
                   "--warmup-epochs", "0", "--seed", "5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train.main(args + ["--output", one]) == 0
    r = torchrun("train", args + ["--output", two])
    assert "2 process(es)" in r.stdout and "(gloo)" in r.stdout
    assert r.stdout.count("mcl-train summary") == 1  # rank 0 logs, rank 1 does not

    a = ckpt.load_checkpoint(os.path.join(one, "last.pt"))
    b = ckpt.load_checkpoint(os.path.join(two, "last.pt"))
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 8
    assert b["progress"]["world_size"] == 2 and len(b["rng"]) == 2  # every rank's generators saved
    for k, v in a["model"].items():
        got = b["model"][k]
        if k.endswith("attn.qkv.bias"):
            # The key bias shifts every attention logit of a query equally, so softmax cancels it: its gradient
            # is exactly 0 in exact arithmetic, and rounding noise (~1e-10) that differs between 1 and 2
            # processes is normalized by Adam into lr-sized steps. Compare the query and value biases only.
            d = v.shape[0] // 3
            v, got = torch.cat([v[:d], v[2 * d:]]), torch.cat([got[:d], got[2 * d:]])
        torch.testing.assert_close(got, v, atol=2e-5, rtol=1e-4, msg=k)
    # The comparison means something: training moved the weights far beyond that tolerance.
    train.set_seed(5)
    init = _cli.build_model(a["model_config"]).state_dict()
    moved = max((a["model"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 100 * 2e-5, moved
    ha = json.load(open(os.path.join(one, "metrics.json")))
    hb = json.load(open(os.path.join(two, "metrics.json")))
    for ra, rb in zip(ha, hb):
        assert rb["val_images"] == ra["val_images"] == 21  # 21 over 2 ranks: 11 + 10, no padding duplicates
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["val_large_top1"] == pytest.approx(ra["val_large_top1"])
        assert rb["val_large_loss"] == pytest.approx(ra["val_large_loss"], rel=1e-4)


def test_distributed_eval_counts_each_image_once(tmp_path):
    out = str(tmp_path / "run")
    assert train.main(TINY + ["--dataset", "synthetic", "--img-size", "32", "--epochs", "1", "--batch-size", "16",
                              "--train-limit", "32", "--val-limit", "37", "--output", out]) == 0
    single, double = str(tmp_path / "single.json"), str(tmp_path / "double.json")
    eval_args = [os.path.join(out, "last.pt"), "--batch-size", "5", "--workers", "0", "--progress", "none"]
    assert mcl_eval.main(eval_args + ["--json", single]) == 0
    torchrun("eval", eval_args + ["--json", double])
    s, d = json.load(open(single))["results"], json.load(open(double))["results"]
    for branch in ("large", "small"):
        assert d[branch]["count"] == s[branch]["count"] == 37
        assert d[branch]["top1"] == pytest.approx(s[branch]["top1"])
        assert d[branch]["top5"] == pytest.approx(s[branch]["top5"])
        assert d[branch]["loss"] == pytest.approx(s[branch]["loss"], rel=1e-5)


def test_teardown_waits_for_every_rank_only_after_a_normal_end(monkeypatch):
    """A normal end waits at a barrier before leaving the group (a rank finishing early had torn gloo's
    connections down under another, which then aborted); after an error it leaves at once (the other ranks
    may never reach a barrier)."""
    import torch.distributed as dist
    from mcl_kernels import distributed
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.teardown(synchronize=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.teardown()
    assert calls == ["destroy"]
