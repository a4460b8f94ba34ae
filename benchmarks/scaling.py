"""Scaling study: how maskops' and torchvision's cost grows with problem size.

    python -m benchmarks.scaling [--quick] [--device cpu|cuda] [--out DIR]

Sweeps RoIs for roi_align (100 -> 10k), masks pasted (10 -> 1k), image size for the FPN
RoIAlign, and boxes for NMS (1k -> 100k) when maskops.nms exists; times both libraries on
the same inputs and plots time against size on log-log axes to DIR/scaling-<device>.png
(plus a JSON of the numbers). torchvision's slowest points are skipped past a time budget.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torchvision
from torchvision.models.detection.roi_heads import paste_masks_in_image

import maskops
from benchmarks import bench_multiscale_roi_align, bench_paste_masks, bench_roi_align
from benchmarks.common import device_slug, measure
from maskops.check.inputs import random_boxes

BUDGET_MS = 4000.0  # stop timing a library once one point costs more than this


def _sweep(sizes, make, ours, theirs, device, reps):
    out = {"size": [], "maskops_ms": [], "torchvision_ms": []}
    skip_tv = False
    for n in sizes:
        data = make(n)
        out["size"].append(n)
        out["maskops_ms"].append(measure(lambda: ours(*data), device, reps).median_ms)
        if skip_tv:
            out["torchvision_ms"].append(None)
            continue
        t = measure(
            lambda: theirs(*data),
            device,
            1 if device == "cpu" else reps,
            warmup=0 if device == "cpu" else 1,
        ).median_ms
        out["torchvision_ms"].append(t)
        skip_tv = t > BUDGET_MS
    return out


def studies(device: str, quick: bool):
    reps = 2 if quick else 3
    res = {}
    roi_sizes = [100, 300, 1000] if quick else [100, 300, 1000, 3000, 10000]
    args = (7, 1 / 16, 2, True)
    res["roi_align fwd (RoIs; 256 ch, 7x7)"] = _sweep(
        roi_sizes,
        lambda n: bench_roi_align.workload(device, rois=n),
        lambda x, r: maskops.roi_align(x, r, *args),
        lambda x, r: torchvision.ops.roi_align(x, r, *args),
        device,
        reps,
    )
    mask_sizes = [10, 30, 100] if quick else [10, 30, 100, 300, 1000]
    res["paste_masks (masks; 800x800, bool out)"] = _sweep(
        mask_sizes,
        lambda n: bench_paste_masks.workload(device, n),
        lambda m, b, s: maskops.paste_masks(m, b, s),
        lambda m, b, s: paste_masks_in_image(m, b, s),
        device,
        reps,
    )
    images = [400, 800] if quick else [400, 800, 1344]

    def fpn(image):
        feats, boxes, shapes = bench_multiscale_roi_align.workload(device, rois=1000, image=image)
        return feats, boxes, shapes

    ours_m = maskops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    theirs_m = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    res["multiscale_roi_align fwd (image side; 1000 RoIs, 7x7)"] = _sweep(
        images, fpn, ours_m, theirs_m, device, reps
    )
    if hasattr(maskops, "nms"):
        nms_sizes = [1000, 5000, 20000] if quick else [1000, 5000, 20000, 50000, 100000]

        def boxes(n):
            g = torch.Generator().manual_seed(n)
            b = random_boxes(g, n, 800, 1, 101, margin=0, dtype=torch.float32)
            return b.to(device), torch.rand(n, generator=g).to(device)

        res["nms (boxes; IoU 0.5)"] = _sweep(
            nms_sizes,
            boxes,
            lambda b, s: maskops.nms(b, s, 0.5),
            lambda b, s: torchvision.ops.nms(b, s, 0.5),
            device,
            reps,
        )
    return res


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8))
    for ax, (name, r) in zip(axes if n > 1 else [axes], results.items()):
        ax.loglog(r["size"], r["maskops_ms"], "o-", label="maskops")
        pts = [(s, t) for s, t in zip(r["size"], r["torchvision_ms"]) if t is not None]
        if pts:
            ax.loglog(*zip(*pts), "s--", label="torchvision")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("size")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    results = studies(a.device, a.quick)
    os.makedirs(a.out, exist_ok=True)
    slug = device_slug(a.device) + ("-quick" if a.quick else "")
    with open(os.path.join(a.out, f"scaling-{slug}.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(a.out, f"scaling-{slug}.png"), f"maskops vs torchvision, {slug}")
    for name, r in results.items():
        print(name)
        for s, o, t in zip(r["size"], r["maskops_ms"], r["torchvision_ms"]):
            print(
                f"  {s:>8}  maskops {o:9.2f} ms   torchvision "
                + (f"{t:9.2f} ms  ({t / o:5.1f}x)" if t else "  skipped")
            )
    print(f"plot: {a.out}/scaling-{slug}.png")


if __name__ == "__main__":
    main()
