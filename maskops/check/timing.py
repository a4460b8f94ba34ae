"""The one timing loop of maskops' self-check and of the benchmarks: the median (and
interquartile range) of repeated calls, after untimed warm-up calls, with the device
synchronised around each timed call so that a GPU's queued work is counted."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    reps: int
    samples_ms: List[float] = field(default_factory=list, repr=False)


def sync(device: Union[str, torch.device]) -> None:
    """Waits for ``device``'s queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: Union[str, torch.device] = "cpu",
    reps: int = 7,
    warmup: int = 1,
) -> Timing:
    """Median and interquartile range of ``reps`` timed calls of ``fn()`` (after ``warmup``
    untimed ones), in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return Timing(statistics.median(samples), q[2] - q[0], reps, samples)


def measure_interleaved(
    fns: List[Callable[[], object]],
    device: Union[str, torch.device] = "cpu",
    reps: int = 7,
    warmup: int = 1,
    between: Optional[Callable[[], object]] = None,
) -> List[Timing]:
    """:func:`measure` of several functions whose calls take turns, so that all of them see
    the same conditions (a machine's load and clocks drift over a run). ``between()``, if
    given, runs untimed after each round."""
    for _ in range(warmup):
        for f in fns:
            f()
    sync(device)
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(reps):
        for s, f in zip(samples, fns):
            start = time.perf_counter()
            f()
            sync(device)
            s.append((time.perf_counter() - start) * 1e3)
        if between is not None:
            between()
    out = []
    for s in samples:
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        out.append(Timing(statistics.median(s), q[2] - q[0], reps, s))
    return out
