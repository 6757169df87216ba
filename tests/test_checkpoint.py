"""Checkpoint files: atomic writes, weights_only reads, and a clear error for every bad file."""
import os
import random

import numpy as np
import pytest
import torch

from mcl_kernels import checkpoint as ckpt
from mcl_kernels.checkpoint import CheckpointError


def minimal_checkpoint(**over):
    state = {
        "format": ckpt.FORMAT, "version": ckpt.VERSION,
        "model_config": {"name": "m", "num_classes": 3, "img_size": 32, "in_chans": 1, "kwargs": {"depth": 1}},
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {"t_initial": 10, "base_values": [0.1]},
        "progress": {"epoch": 1, "step_in_epoch": 2},
        "rng": [ckpt.capture_rng()],
        "args": {"lr": 0.1, "resume": None},
    }
    state.update(over)
    return state


def test_round_trip_is_weights_only(tmp_path):
    path = str(tmp_path / "run" / "last.pt")
    state = minimal_checkpoint()
    assert ckpt.unsafe_value(state) is None
    ckpt.save_atomic(state, path)
    assert os.listdir(tmp_path / "run") == ["last.pt"]  # no temporary left behind
    torch.load(path, weights_only=True)  # loads without the unpickler's escape hatches
    back = ckpt.load_checkpoint(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["optimizer"]["state"][0]["step"].item() == 3.0 and back["progress"]["step_in_epoch"] == 2


def test_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "last.pt")
    ckpt.save_atomic(minimal_checkpoint(), path)
    before = open(path, "rb").read()
    with pytest.raises(Exception):
        ckpt.save_atomic({"bad": lambda: None}, path)  # pickling a lambda fails mid-write
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def test_unsafe_values_are_named():
    assert "numpy.float64" in ckpt.unsafe_value({"metrics": [{"top1": np.float64(1.0)}]})
    assert "metrics" in ckpt.unsafe_value({"metrics": [{"top1": np.float64(1.0)}]})
    assert ckpt.unsafe_value({"a": [1, 2.0, "x", None, True, torch.zeros(1)], 3: {"b": (1, 2)}}) is None
    assert "set" in ckpt.unsafe_value({"s": {1, 2}})


def write(path, payload: bytes):
    with open(path, "wb") as f:
        f.write(payload)
    return str(path)


class NotAllowed:  # a pickled custom class: weights_only loading must refuse it
    pass


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("truncated", "truncated or corrupt"),
    ("garbage", "truncated or corrupt"),
    ("empty", "truncated or corrupt"),
    ("custom_class", "truncated or corrupt, or it was not written by mcl-train"),
    ("bare_state_dict", "bare state dict of 2 tensors"),
    ("other_dict", "is not an mcl-train checkpoint"),
    ("tensor", "found a Tensor"),
    ("version", "version 99 is not supported"),
    ("missing_keys", "lacks optimizer, scheduler"),
    ("bad_model_config", "model_config must hold"),
    ("safetensors", "safetensors weights file"),
    ("torchscript", "TorchScript model"),
])
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*deprecated:FutureWarning")
def test_bad_files_get_clear_errors(tmp_path, case, match):
    path = str(tmp_path / "ckpt.pt")
    if case == "missing":
        path = str(tmp_path / "nope.pt")
    elif case == "directory":
        path = str(tmp_path)
    elif case in ("truncated", "garbage", "empty"):
        ckpt.save_atomic(minimal_checkpoint(), path)
        good = open(path, "rb").read()
        write(path, {"truncated": good[:len(good) // 2], "garbage": os.urandom(4096), "empty": b""}[case])
    elif case == "custom_class":
        torch.save({"format": ckpt.FORMAT, "x": NotAllowed()}, path)
    elif case == "bare_state_dict":
        torch.save({"blocks.0.weight": torch.zeros(2), "head.bias": torch.zeros(1)}, path)
    elif case == "other_dict":
        torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(1)}}, path)
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    elif case == "version":
        torch.save(minimal_checkpoint(version=99), path)
    elif case == "missing_keys":
        state = minimal_checkpoint()
        del state["optimizer"], state["scheduler"]
        torch.save(state, path)
    elif case == "bad_model_config":
        torch.save(minimal_checkpoint(model_config={"name": "m"}), path)
    elif case == "safetensors":
        from safetensors.torch import save_file
        path = str(tmp_path / "model.safetensors")
        save_file({"w": torch.zeros(2)}, path)
    elif case == "torchscript":
        torch.jit.script(torch.nn.Linear(2, 2)).save(path)
    with pytest.raises(CheckpointError, match=match):
        ckpt.load_checkpoint(path)


def test_load_state_strict_lists_the_differences():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = model.state_dict()
    state["1.weight"] = torch.zeros(5, 4)
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing 0\.bias; unexpected extra\.weight; shape mismatch "
                                              r"1\.weight: checkpoint \(5, 4\) vs model \(2, 4\)"):
        ckpt.load_state_strict(model, state, "checkpoint 'model'")
    good = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    ckpt.load_state_strict(model, good, "x")
    assert all(torch.equal(v, torch.ones_like(v)) for v in model.state_dict().values())


def test_model_config_mismatch_names_every_difference():
    saved = minimal_checkpoint()["model_config"]
    wanted = dict(saved, img_size=64, kwargs={"depth": 2})
    with pytest.raises(CheckpointError, match=r"img_size: checkpoint 32, command line 64; kwargs: checkpoint"):
        ckpt.check_model_config(saved, wanted, "last.pt")
    ckpt.check_model_config(saved, dict(saved), "last.pt")


def test_rng_capture_restore_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    state = ckpt.capture_rng()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    path = str(tmp_path / "rng.pt")
    ckpt.save_atomic({"rng": state}, path)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.restore_rng(torch.load(path, weights_only=True)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    assert got[0] == expected[0] and got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3] and torch.equal(got[4], expected[4])


def test_resolve_resume_accepts_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="holds no last.pt"):
        ckpt.resolve_resume(str(tmp_path))
    ckpt.save_atomic(minimal_checkpoint(), str(tmp_path / "last.pt"))
    assert ckpt.resolve_resume(str(tmp_path)) == str(tmp_path / "last.pt")
