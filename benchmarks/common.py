"""Shared timing and reporting helpers for the side-by-side benchmarks."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    reps: int
    samples_ms: list = field(default_factory=list, repr=False)


def measure(fn, device: str = "cpu", reps: int = 7, warmup: int = 1) -> Timing:
    """Median and interquartile range of `reps` timed calls (after `warmup` untimed ones)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return Timing(statistics.median(samples), q[2] - q[0], reps, samples)


@dataclass
class Row:
    op: str
    device: str
    case: str
    maskops: Timing
    torchvision: Timing
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.torchvision.median_ms / self.maskops.median_ms


def check_same(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """The correctness guard: no speed is reported for a wrong result."""
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != torchvision's {tuple(expected.shape)}")
    err = (got.float() - expected.float()).abs().max().item() if got.numel() else 0.0
    if not err <= atol:
        raise AssertionError(f"{name}: differs from torchvision by {err:.3g} (> {atol}); "
                             "refusing to report its speed")


def table(rows: list[Row]) -> str:
    lines = ["| op | device | case | maskops ms (IQR) | torchvision ms (IQR) | speed-up |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.op} | {r.device} | {r.case} | {r.maskops.median_ms:.2f} ({r.maskops.iqr_ms:.2f}) "
            f"| {r.torchvision.median_ms:.2f} ({r.torchvision.iqr_ms:.2f}) | **{r.ratio:.1f}x**"
            f"{' ' + r.note if r.note else ''} |")
    return "\n".join(lines)


def save_json(path: str, rows: list[Row], extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {"machine": machine(), "rows": [
        {**{k: v for k, v in asdict(r).items() if k not in ("maskops", "torchvision")},
         "maskops_ms": r.maskops.median_ms, "maskops_iqr_ms": r.maskops.iqr_ms,
         "torchvision_ms": r.torchvision.median_ms, "torchvision_iqr_ms": r.torchvision.iqr_ms,
         "ratio": r.ratio} for r in rows]}
    if extra:
        payload.update(extra)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
