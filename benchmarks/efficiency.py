"""What share of the machine's compute a model run reaches.

A speed-up against a peer says nothing about what is left: both may be far from the hardware.
So the model benchmark also counts the model's floating-point operations (torch's
``FlopCounterMode`` on torchvision's model: convolutions and matrix products) and measures, in
the same process, the machine's *practical peak*: the best rate of a few large 3x3
channels-last convolutions, the bulk of a Mask R-CNN's work, in float32 and in bfloat16. A
run's share of that peak is ``FLOPs / time / peak``.
"""

from __future__ import annotations

import statistics
from typing import Dict, List

import torch
import torch.nn.functional as F

from maskops.check.timing import measure

# (channels, height, width) of the probe convolutions (3x3, stride 1, channels in = out):
# FPN- and ResNet-stage-like shapes of an 800x800 image.
PROBES = [(256, 100, 100), (128, 200, 200), (512, 50, 50)]


@torch.inference_mode()
def conv_peak_gflops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, quick: bool = False, reps: int = 5
) -> Dict[str, float]:
    """The practical peak: the best GFLOP/s (median of ``reps`` per shape, 2 with ``quick``)
    of the probe convolutions, channels-last. Returns ``{"gflops": best, "shape": "CxHxW"}``."""
    best, best_shape = 0.0, ""
    g = torch.Generator().manual_seed(0)
    reps = 2 if quick else reps
    for c, h, w in PROBES:
        x = (
            torch.randn(1, c, h, w, generator=g)
            .to(device, dtype)
            .contiguous(memory_format=torch.channels_last)
        )
        weight = (
            (torch.randn(c, c, 3, 3, generator=g) * 0.02)
            .to(device, dtype)
            .contiguous(memory_format=torch.channels_last)
        )
        flops = 2.0 * c * c * 9 * h * w
        # (the warm-up call: oneDNN picks and caches its kernel)
        t = measure(lambda: F.conv2d(x, weight, padding=1), device, reps, warmup=1)
        rate = flops / (t.median_ms / 1e3) / 1e9
        if rate > best:
            best, best_shape = rate, f"{c}x{h}x{w}"
    return {"gflops": best, "shape": best_shape}


class PeakProbe:
    """The practical peak measured *alongside* a timed run: after ``conv_peak_gflops`` has
    picked the best probe shape, ``sample()`` times that convolution once more; the run's
    peak is the median of these samples. A shared machine's speed drifts (other tenants,
    clocks) over a benchmark's minutes; probing between the timed reps makes the model's
    median and the peak's median see the same drift, so their ratio, the share, is steadier
    than against a peak measured once at the start."""

    def __init__(self, device: str, dtype: torch.dtype, shape: str) -> None:
        c, h, w = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        self.device = device
        self.x = (
            torch.randn(1, c, h, w, generator=g)
            .to(device, dtype)
            .contiguous(memory_format=torch.channels_last)
        )
        self.weight = (
            (torch.randn(c, c, 3, 3, generator=g) * 0.02)
            .to(device, dtype)
            .contiguous(memory_format=torch.channels_last)
        )
        self.flops = 2.0 * c * c * 9 * h * w
        self.rates: List[float] = []

    @torch.inference_mode()
    def sample(self) -> None:
        t = measure(lambda: F.conv2d(self.x, self.weight, padding=1), self.device, 1, warmup=0)
        self.rates.append(self.flops / (t.median_ms / 1e3) / 1e9)

    def gflops(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


@torch.inference_mode()
def forward_gflops(model, images: List[torch.Tensor]) -> Dict[str, float]:
    """GFLOP of one forward of ``model`` on ``images``, total and per aten op (FlopCounterMode
    counts convolutions and matrix products: the arithmetic that matters here)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(images)
    per_op = {
        str(op).split(".")[-1]: n / 1e9
        for op, n in counter.get_flop_counts().get("Global", {}).items()
    }
    return {"total": counter.get_total_flops() / 1e9, **per_op}


def share(gflop: float, ms: float, peak_gflops: float) -> Dict[str, float]:
    """Achieved GFLOP/s of ``gflop`` done in ``ms``, and its share of ``peak_gflops``."""
    rate = gflop / (ms / 1e3)
    return {"gflops": rate, "share": rate / peak_gflops if peak_gflops else 0.0}
