"""Stopping training cleanly on SIGTERM / SIGINT, between iterations."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import torch

from . import distributed as dist_utils


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag that the loop checks between iterations, so that a
    stop never lands inside a checkpoint write; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers, no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def requested(self) -> bool:
        """Whether any rank was asked to stop (collective under torch.distributed)."""
        flag = self.signal is not None
        if dist_utils.is_distributed():
            t = torch.tensor([float(flag)], device=_collective_device())
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TrainingInterrupted(Exception):
    """Training stopped on a signal; the last complete checkpoint is intact."""

    def __init__(self, signum: int, checkpoint: Optional[Path]) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = (
            f"the last complete checkpoint is {checkpoint}"
            if checkpoint
            else "no epoch had completed, so there is no checkpoint"
        )
        super().__init__(f"stopped by {name}; {where}")
