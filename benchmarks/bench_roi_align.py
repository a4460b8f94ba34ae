"""RoIAlign, maskops vs torchvision: same inputs, same process, medians and the ratio.

    python -m benchmarks.bench_roi_align [--quick] [--device cpu|cuda] [--json PATH]

The default workload is a Mask R-CNN box head's: 1000 RoIs on a stride-16 map of an
800x800 image (batch 2, 256 channels), 14x14 output, sampling_ratio 2, aligned.
"""

from __future__ import annotations

import torch
import torchvision

import maskops
from benchmarks.common import Row, check_same, cli, measure, nbytes


def workload(
    device: str,
    rois: int = 1000,
    channels: int = 256,
    size: int = 50,
    batch: int = 2,
    seed: int = 0,
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    image = size * 16
    xy = torch.rand(rois, 2, generator=g) * image * 0.9
    wh = torch.rand(rois, 2, generator=g) * image * 0.4 + 8
    boxes = torch.cat([xy, (xy + wh).clamp(max=image - 1)], dim=1)
    idx = torch.randint(0, batch, (rois, 1), generator=g).float()
    return x.to(device), torch.cat([idx, boxes], dim=1).to(device)


def bench(
    device: str = "cpu",
    quick: bool = False,
    rois: int = 1000,
    output: int = 14,
    channels_last: bool = False,
) -> list[Row]:
    x, r = workload(
        device, rois=rois if not quick else min(rois, 200), channels=256 if not quick else 64
    )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (output, 1 / 16, 2, True)
    case = (
        f"{r.shape[0]} RoIs x {x.shape[1]} ch, {x.shape[2]}x{x.shape[3]} map, {output}x{output}"
        + (", channels_last" if channels_last else "")
    )
    reps = 3 if quick else 7
    rows = []

    ours = maskops.roi_align(x, r, *args)
    theirs = torchvision.ops.roi_align(x, r, *args)
    check_same("roi_align forward", ours, theirs, atol=1e-4)
    t_ours = measure(lambda: maskops.roi_align(x, r, *args), device, reps)
    t_tv = measure(lambda: torchvision.ops.roi_align(x, r, *args), device, max(3, reps // 2))
    # The floor of any forward: allocating and writing an output of the same size.
    floor = measure(lambda: torch.empty_like(ours).fill_(1.0), device, reps)
    rows.append(
        Row(
            "roi_align fwd",
            device,
            case,
            t_ours,
            t_tv,
            note=f"(floor {floor.median_ms:.1f} ms: "
            f"{t_ours.median_ms / floor.median_ms:.2f}x of it)",
            min_bytes=nbytes(x, r, ours),
            flops=ours.numel() * 4 * 11,
        )
    )

    grad = torch.randn_like(ours)
    n, c, h, w = x.shape
    bwd_args = (r, 1 / 16, output, output, n, c, h, w, 2, True)
    ours_g = torch.ops.maskops._roi_align_backward(grad, *bwd_args)
    theirs_g = torch.ops.torchvision._roi_align_backward(grad, *bwd_args)
    check_same("roi_align backward", ours_g.contiguous(), theirs_g.contiguous(), atol=1e-3)
    t_ours = measure(lambda: torch.ops.maskops._roi_align_backward(grad, *bwd_args), device, reps)
    t_tv = measure(
        lambda: torch.ops.torchvision._roi_align_backward(grad, *bwd_args),
        device,
        2 if device == "cpu" else reps,
        warmup=0 if device == "cpu" else 1,
    )
    # FLOPs: 2x2 samples per bin, each 4 bilinear taps (weights + multiply-adds): ~11 per sample.
    rows.append(
        Row(
            "roi_align bwd",
            device,
            case,
            t_ours,
            t_tv,
            min_bytes=nbytes(grad, r, ours_g),
            flops=grad.numel() * 4 * 11,
        )
    )
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[Row]:
    return bench(device, quick) + bench(device, quick, channels_last=True)


def main(argv=None):
    cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
