"""Learning-rate schedules: linear warmup, then steps or a cosine decay, per iteration."""

from __future__ import annotations

import math
from typing import Sequence

import torch


class WarmupSchedule:
    """The learning-rate factor at iteration ``i`` (for ``LambdaLR``).

    Args:
        total_iters: iterations of the whole run.
        warmup_iters: iterations of linear warmup from ``warmup_factor`` to 1.
        warmup_factor: the factor at iteration 0.
        kind: ``"step"``: multiply by ``gamma`` at each of ``milestones`` (iterations);
            ``"cosine"``: half a cosine from 1 after warmup down to ``min_factor`` at the end;
            ``"constant"``.
    """

    def __init__(
        self,
        total_iters: int,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        kind: str = "cosine",
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        min_factor: float = 0.0,
    ) -> None:
        if kind not in ("step", "cosine", "constant"):
            raise ValueError(f"schedule must be step, cosine or constant, got {kind!r}")
        self.total_iters = max(1, int(total_iters))
        self.warmup_iters = max(0, int(warmup_iters))
        self.warmup_factor = float(warmup_factor)
        self.kind = kind
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.min_factor = float(min_factor)

    def __call__(self, i: int) -> float:
        warm = 1.0
        if i < self.warmup_iters:
            a = i / self.warmup_iters
            warm = self.warmup_factor * (1 - a) + a
        if self.kind == "step":
            return warm * self.gamma ** sum(i >= m for m in self.milestones)
        if self.kind == "cosine":
            span = max(1, self.total_iters - self.warmup_iters)
            t = min(1.0, max(0, i - self.warmup_iters) / span)
            return warm * (
                self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
            )
        return warm


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: WarmupSchedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR``; its state_dict carries the schedule's parameters."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
