"""Helpers for ``torch.distributed`` runs started by ``torchrun`` (and no-ops without it)."""

from __future__ import annotations

import datetime
import os
from typing import Any, List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "auto", timeout_s: int = 1800) -> torch.device:
    """Joins the process group that ``torchrun`` describes in the environment (if any) and
    returns this process's device.

    Args:
        device: ``"auto"`` (this rank's GPU when CUDA is available, else the CPU), ``"cpu"``
            or ``"cuda"``.

    The backend is NCCL on GPUs and gloo on the CPU.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return dev


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` on rank 0 (other ranks get ``[]``); ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a float tensor (a copy; the input is unchanged)."""
    values = values.detach().clone()
    if is_distributed():
        dist.all_reduce(values)
        values /= world_size()
    return values
