"""Mask paste, maskops vs torchvision's paste_masks_in_image, same inputs, same run.

    python -m benchmarks.bench_paste_masks [--quick] [--device cpu|cuda] [--json PATH]

Workload: N 28x28 mask probabilities into an 800x800 image (N = 100 detections, and 1000),
boxes with sides up to 300 px. maskops is timed with float output (what torchvision returns)
and thresholded straight to bool (what a user keeps); torchvision's time is its float paste.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

import maskops
from benchmarks.common import Row, check_same, cli, measure, measure_uncached, nbytes
from maskops.check.inputs import random_boxes


def workload(device: str, n: int, image: int = 800, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    # sides in [1, 300), every box inside the image
    boxes = random_boxes(g, n, image, 1, 300, margin=300, dtype=torch.float32)
    return masks.to(device), boxes.to(device), (image, image)


def bench(device: str = "cpu", quick: bool = False) -> list[Row]:
    rows = []
    for n in (20,) if quick else (100, 1000):
        masks, boxes, size = workload(device, n)
        ref = paste_masks_in_image(masks, boxes, size)
        check_same("paste_masks float", maskops.paste_masks(masks, boxes, size, None), ref, 1e-5)
        agree = (maskops.paste_masks(masks, boxes, size) == (ref >= 0.5)).float().mean().item()
        if agree < 0.9999:
            raise AssertionError(f"paste_masks bool agrees on only {agree:.6f} of pixels")
        reps = 3 if quick else 7
        t_tv = measure(
            lambda: paste_masks_in_image(masks, boxes, size),
            device,
            reps if n <= 100 or device != "cpu" else 2,
            warmup=1 if n <= 100 else 0,
        )
        case = f"{n} masks 28x28 -> {size[0]}x{size[1]}"
        rows.append(
            Row(
                "paste_masks (float)",
                device,
                case,
                measure(lambda: maskops.paste_masks(masks, boxes, size, None), device, reps),
                t_tv,
                min_bytes=nbytes(masks, boxes, ref),
            )
        )
        floor = measure(
            lambda: torch.zeros(n, 1, *size, dtype=torch.bool, device=device), device, reps
        )
        t_bool = measure(lambda: maskops.paste_masks(masks, boxes, size), device, reps)
        rows.append(
            Row(
                "paste_masks (bool)",
                device,
                case,
                t_bool,
                t_tv,
                note=f"(torch.zeros of the bool output alone: {floor.median_ms:.1f} ms)",
                min_bytes=nbytes(masks, boxes) + ref.numel(),
            )
        )
        if device == "cpu":
            rows.append(
                Row(
                    "paste_masks (bool, no cache)",
                    device,
                    case,
                    measure_uncached(lambda: maskops.paste_masks(masks, boxes, size), device, reps),
                    t_tv,
                    min_bytes=nbytes(masks, boxes) + ref.numel(),
                )
            )
    return rows


run = bench


def main(argv=None):
    cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
