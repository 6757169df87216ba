"""Process-group set-up for the CLIs: one process, or one per device under ``torchrun``.

``torchrun --nproc_per_node N mcl-train ...`` (or ``python -m torch.distributed.run``) sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them and joins the
group with NCCL when the processes use GPUs (one per local rank) and gloo on CPUs. Without them, it is
a single process and every helper here is a no-op.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]   # "nccl", "gloo", or None for a single process

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU; ``cuda`` / ``cpu`` force it."""
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asks for a GPU but torch.cuda.is_available() is False")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"local rank {local_rank} has no GPU of its own: {count} visible; start at most "
                           f"{count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", local_rank)


def init(device: str = "auto", backend: Optional[str] = None) -> DistEnv:
    """Join the process group that ``torchrun`` describes (if any) and pick this process's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistEnv(0, 1, 0, dev, None)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed support")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" and _init_takes_device_id() else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistEnv(rank, world_size, local_rank, dev, backend)


def _init_takes_device_id() -> bool:
    import inspect
    return "device_id" in inspect.signature(dist.init_process_group).parameters


def teardown(synchronize: bool = False) -> None:
    """Leave the process group (safe to call when there is none). ``synchronize`` (a run that ended normally on
    every rank): wait for every rank first. Without it a rank that finishes early (rank 0 still writing its
    JSON, say) tears gloo's connections down under the others, and a rank then died with SIGABRT ("terminate
    called without an active exception") in a 2-process CPU run. Not after an error: the other ranks may never
    reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (returned for chaining); a no-op for one process."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(env: DistEnv, obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def print0(env: DistEnv, *args: Any, file=None, **kwargs: Any) -> None:
    """``print`` on rank 0 only, flushed (logs of killed runs keep their last lines)."""
    if env.is_main:
        print(*args, file=file or sys.stdout, flush=True, **kwargs)
