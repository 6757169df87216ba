"""Training checkpoints: written atomically, read without executing code, checked before use.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts, so
``torch.load(weights_only=True)`` reads it (no pickled code runs, whoever wrote the file). Its top level:

- ``format`` (:data:`FORMAT`) and ``version`` (:data:`VERSION`): what tells it apart from a foreign file;
- ``model_config``: ``{name, num_classes, img_size, in_chans, kwargs}`` to rebuild the model;
- ``model``: the MCL model's state dict; ``ema``: the EMA copy's, or absent;
- ``optimizer``, ``scheduler``, ``scaler``: their state dicts (scaler absent without fp16 AMP);
- ``progress``: ``{epoch, step_in_epoch, global_step, steps_per_epoch, ...}``: where training continues;
- ``rng``: one entry per rank (Python, NumPy, torch CPU and CUDA generator states), see :func:`capture_rng`;
- ``args``: the command-line options of the run; ``metrics``: the per-epoch history so far.

Writes go to a temporary file in the same directory, are flushed to disk, then ``os.replace``-d over
the target: a crash or kill mid-write leaves the previous checkpoint intact, never a truncated one.
"""
from __future__ import annotations

import os
import random
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT = "mcl_kernels.train_checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model_config", "model", "optimizer", "scheduler", "progress", "rng", "args")
MODEL_CONFIG_KEYS = ("name", "num_classes", "img_size", "in_chans", "kwargs")


class CheckpointError(ValueError):
    """A file that is not a usable mcl-train checkpoint: corrupt, foreign, or for another model."""


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` so that ``path`` is either the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory entry is on disk (POSIX; a no-op elsewhere).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (a zip with a ``code/`` folder), which ``torch.save`` files lack."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in name or name.startswith("code/") for name in z.namelist())


def _describe_foreign(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)
        tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
        if keys and tensors == len(keys):
            return (f"a bare state dict of {len(keys)} tensors (first keys: {', '.join(map(str, keys[:3]))}), "
                    f"e.g. torch.save(model.state_dict()) or timm weights")
        return f"a dict with keys {', '.join(map(str, keys[:8]))}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(obj).__name__}"


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and check an mcl-train checkpoint (tensors on the CPU); :class:`CheckpointError` says what is wrong."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; pass the file (e.g. {os.path.join(path, 'last.pt')})")
    if path.endswith(".safetensors"):
        raise CheckpointError(f"{path} is a safetensors weights file (a deployed model from mcl-export?), not a "
                              f"training checkpoint; mcl-eval reads it directly, --resume and mcl-export need "
                              f"the last.pt/best.pt that mcl-train writes")
    if is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript model (from mcl-export?), not a training checkpoint; "
                              f"mcl-eval reads it directly, --resume and mcl-export need a last.pt/best.pt "
                              f"from mcl-train")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every read failure gets the same actionable message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {first[:300]}). The file is truncated or "
            f"corrupt, or it was not written by mcl-train (which saves plain tensors and numbers only, "
            f"readable with torch.load(weights_only=True))") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mcl-train checkpoint: expected a dict with format={FORMAT!r}, "
                              f"found {_describe_foreign(obj)}")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')!r} is not supported; this "
                              f"mcl_kernels reads version {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)} (has {', '.join(map(str, obj))})")
    cfg = obj["model_config"]
    if not isinstance(cfg, dict) or any(k not in cfg for k in MODEL_CONFIG_KEYS):
        raise CheckpointError(f"{path}: model_config must hold {', '.join(MODEL_CONFIG_KEYS)}, got {cfg!r}")
    return obj


def load_state_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` with an error that lists missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def head(items: List[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
        parts = [f"missing {head(missing)}" if missing else "", f"unexpected {head(unexpected)}" if unexpected else "",
                 f"shape mismatch {head(shapes)}" if shapes else ""]
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(p for p in parts if p))
    module.load_state_dict(state)


def check_model_config(saved: Dict[str, Any], wanted: Dict[str, Any], path: str) -> None:
    """Refuse to resume a checkpoint into a differently configured model, naming every difference."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, command line {wanted.get(k)!r}"
             for k in MODEL_CONFIG_KEYS if saved.get(k) != wanted.get(k)]
    if diffs:
        raise CheckpointError(f"{path} was trained with a different model configuration ({'; '.join(diffs)}); "
                              f"resume with the original options, or start a new run")


def capture_rng() -> Dict[str, Any]:
    """This process's generator states as plain tensors and numbers (``weights_only``-loadable)."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Undo :func:`capture_rng`: the next random draws are those the saving process would have made."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            for i, s in enumerate(states[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def checkpoint_paths(directory: str) -> Dict[str, str]:
    """Where mcl-train keeps its checkpoints in an output directory."""
    return {"last": os.path.join(directory, "last.pt"), "best": os.path.join(directory, "best.pt")}


def resolve_resume(path: str) -> str:
    """``--resume`` accepts a checkpoint file or a run directory (meaning its ``last.pt``)."""
    if os.path.isdir(path):
        last = checkpoint_paths(path)["last"]
        if not os.path.isfile(last):
            raise CheckpointError(f"--resume {path}: the directory holds no last.pt to resume from")
        return last
    return path


def unsafe_value(obj: Any, where: str = "checkpoint") -> Optional[str]:
    """Where ``obj`` holds a value ``torch.load(weights_only=True)`` would refuse, or None when it is clean.

    Scalars must be exactly int/float/bool/str/None: a NumPy scalar passes ``isinstance(v, float)`` but
    pickles as a NumPy object, which weights_only loading rejects."""
    if isinstance(obj, torch.Tensor) or type(obj) in (int, float, bool, str, type(None)):
        return None
    if type(obj) in (dict, OrderedDict):  # state dicts are OrderedDicts, which weights_only accepts
        for k, v in obj.items():
            bad = unsafe_value(k, f"{where} key {k!r}") or unsafe_value(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            bad = unsafe_value(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where} is a {type(obj).__module__}.{type(obj).__name__}"
