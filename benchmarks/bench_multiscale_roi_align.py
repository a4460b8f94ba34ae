"""Multi-level (FPN) RoIAlign, maskops.MultiScaleRoIAlign vs torchvision's, same inputs.

    python -m benchmarks.bench_multiscale_roi_align [--quick] [--device cpu|cuda] [--json PATH]

Default workload: the FPN levels of one 800x800 image (strides 4-32, 256 channels) and 1000
proposal-like boxes, 7x7 (box head) and 14x14 (mask head) outputs, sampling_ratio 2.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision

import maskops
from benchmarks.common import Row, check_same, cli, measure, measure_uncached, nbytes


def workload(
    device: str,
    rois: int = 1000,
    channels: int = 256,
    image: int = 800,
    batch: int = 1,
    seed: int = 0,
):
    g = torch.Generator().manual_seed(seed)
    feats = OrderedDict(
        (str(i), torch.randn(batch, channels, image // s, image // s, generator=g).to(device))
        for i, s in enumerate((4, 8, 16, 32))
    )
    boxes = []
    for _ in range(batch):
        # Proposal-like sizes: many small boxes, some large (log-uniform side 8..600 px).
        side = torch.exp(torch.rand(rois, 2, generator=g) * (6.4 - 2.1) + 2.1)
        xy = torch.rand(rois, 2, generator=g) * (image - side)
        boxes.append(torch.cat([xy, xy + side], dim=1).to(device))
    return feats, boxes, [(image, image)] * batch


def bench(device: str = "cpu", quick: bool = False, output: int = 7) -> list[Row]:
    feats, boxes, shapes = workload(
        device, rois=200 if quick else 1000, channels=64 if quick else 256
    )
    ours = maskops.MultiScaleRoIAlign(list(feats), output, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(list(feats), output, 2)
    case = (
        f"{sum(len(b) for b in boxes)} RoIs x {feats['0'].shape[1]} ch, 4 levels, {output}x{output}"
    )
    reps = 3 if quick else 7
    out = ours(feats, boxes, shapes)
    check_same("multiscale_roi_align forward", out, theirs(feats, boxes, shapes), 1e-4)
    levels = [feats[k] for k in ("0", "1", "2", "3")]
    rows = [
        Row(
            "multiscale_roi_align fwd",
            device,
            case,
            measure(lambda: ours(feats, boxes, shapes), device, reps),
            measure(lambda: theirs(feats, boxes, shapes), device, reps),
            min_bytes=nbytes(levels, boxes, out),
        )
    ]
    if device == "cpu":
        rows.append(
            Row(
                "multiscale_roi_align fwd (no cache)",
                device,
                case,
                measure_uncached(lambda: ours(feats, boxes, shapes), device, reps),
                rows[0].torchvision,
                min_bytes=rows[0].min_bytes,
            )
        )

    def fwd_bwd(module):
        leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in feats.items())
        out = module(leaves, boxes, shapes)
        grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
        return grads

    for a, b in zip(fwd_bwd(ours), fwd_bwd(theirs)):
        check_same("multiscale_roi_align backward", a, b, 1e-3)
    rows.append(
        Row(
            "multiscale_roi_align fwd+bwd",
            device,
            case,
            measure(lambda: fwd_bwd(ours), device, reps),
            measure(lambda: fwd_bwd(theirs), device, max(2, reps // 3)),
            min_bytes=2 * nbytes(levels, out) + nbytes(boxes),
        )
    )
    return rows


def run(device: str = "cpu", quick: bool = False) -> list[Row]:
    return bench(device, quick, 7) + bench(device, quick, 14)


def main(argv=None):
    cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
