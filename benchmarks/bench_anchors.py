"""Anchors, box decoding and the RPN proposal step, maskops vs torchvision, same inputs, same run.

    python -m benchmarks.bench_anchors [--quick] [--device cpu|cuda] [--json PATH]

Workloads (an 800x800 image, FPN levels P2-P6 at strides 4..64, i.e. feature maps 200, 100,
50, 25, 13, one size per level (32..512) and 3 aspect ratios: 159,882 anchors):
  - anchors: torchvision's AnchorGenerator forward vs maskops.AnchorGenerator (cached, what a
    model sees from the second image of a size on) and maskops.generate_anchors(cache=False)
    (the kernel);
  - decode of 200,000 boxes (BoxCoder weights (10, 10, 5, 5), one class per box);
  - the RPN proposal step for batch 1 and 2 (torchvision: box_coder.decode of every anchor,
    then filter_proposals; maskops: rpn_proposals), pre/post NMS top-n 1000, NMS 0.7.
Every maskops result is checked against torchvision's before it is timed.
"""

from __future__ import annotations

import argparse
import math

import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

import maskops
from benchmarks.common import Row, check_same, machine, measure, nbytes, save_json, table
from maskops.check.inputs import random_boxes

SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = (4, 8, 16, 32, 64)


def _features(batch: int, image: int, device: str):
    return [
        torch.zeros(batch, 1, math.ceil(image / s), math.ceil(image / s), device=device)
        for s in STRIDES
    ]


def _rpn_inputs(batch: int, image: int, device: str, seed: int = 0):
    """Objectness and deltas as torchvision's concat_box_prediction_layers gives them."""
    g = torch.Generator().manual_seed(seed)
    images = ImageList(torch.zeros(batch, 3, image, image, device=device), [(image, image)] * batch)
    feats = _features(batch, image, device)
    anchors = TVAnchorGenerator(SIZES, RATIOS)(images, feats)
    per_level = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    a = sum(per_level)
    # Distinct logits spread over [-4, 4]: no two scores tie, so the outputs can be compared
    # exactly (torchvision orders equal scores with an unstable sort).
    objectness = torch.randperm(batch * a, generator=g).float() / (batch * a) * 8 - 4
    deltas = torch.randn(batch * a, 4, generator=g) * 0.3
    return images, anchors, per_level, objectness[:, None].to(device), deltas.to(device)


def _same_proposals(name, got, expected):
    for b, ((gb, gs), (eb, es)) in enumerate(zip(zip(*got), zip(*expected))):
        check_same(f"{name} boxes[{b}]", gb, eb, 0.0)
        check_same(f"{name} scores[{b}]", gs, es, 0.0)


def bench(device: str = "cpu", quick: bool = False) -> list[Row]:
    rows = []
    reps = 3 if quick else 15
    image = 320 if quick else 800

    # ---- anchors ----
    images = ImageList(torch.zeros(1, 3, image, image, device=device), [(image, image)])
    feats = _features(1, image, device)
    tv_gen, mo_gen = TVAnchorGenerator(SIZES, RATIOS), maskops.AnchorGenerator(SIZES, RATIOS)
    ref = tv_gen(images, feats)
    check_same("anchors", mo_gen(images, feats)[0], ref[0], 0.0)
    grid = [tuple(f.shape[-2:]) for f in feats]
    strides = [(image // h, image // w) for h, w in grid]
    uncached = maskops.generate_anchors(grid, strides, SIZES, RATIOS, device=device, cache=False)
    check_same("anchors (uncached)", uncached, ref[0], 0.0)
    t_tv = measure(lambda: tv_gen(images, feats), device, reps)
    case = f"{len(STRIDES)} levels, {image}x{image}, {ref[0].shape[0]} anchors"
    rows.append(
        Row(
            "AnchorGenerator (cached)",
            device,
            case,
            measure(lambda: mo_gen(images, feats), device, reps),
            t_tv,
            min_bytes=nbytes(ref[0]),
        )
    )
    rows.append(
        Row(
            "generate_anchors (kernel)",
            device,
            case,
            measure(
                lambda: maskops.generate_anchors(
                    grid, strides, SIZES, RATIOS, device=device, cache=False
                ),
                device,
                reps,
            ),
            t_tv,
            min_bytes=nbytes(ref[0]),
        )
    )

    # ---- decode ----
    n = 20_000 if quick else 200_000
    g = torch.Generator().manual_seed(1)
    boxes = random_boxes(g, n, 800, 1, 301, margin=0, dtype=torch.float32).to(device)
    codes = torch.randn(n, 4, generator=g).to(device)
    tv_coder, mo_coder = (
        TVBoxCoder((10.0, 10.0, 5.0, 5.0)),
        maskops.BoxCoder((10.0, 10.0, 5.0, 5.0)),
    )
    ref = tv_coder.decode_single(codes, boxes)
    # Bit for bit on the CPU; on CUDA torchvision divides by a weight as a multiplication by
    # its reciprocal, so allow an ulp of an 1100-pixel coordinate.
    check_same(
        "decode", mo_coder.decode_single(codes, boxes), ref, 0.0 if device == "cpu" else 1e-3
    )
    rows.append(
        Row(
            "decode_boxes",
            device,
            f"{n} boxes",
            measure(lambda: mo_coder.decode_single(codes, boxes), device, reps),
            measure(lambda: tv_coder.decode_single(codes, boxes), device, reps),
            min_bytes=nbytes(codes, boxes, ref),
        )
    )

    # ---- RPN proposal step ----
    rpn = RegionProposalNetwork(
        TVAnchorGenerator(SIZES, RATIOS),
        RPNHead(1, 3),
        0.7,
        0.3,
        256,
        0.5,
        dict(training=2000, testing=1000),
        dict(training=2000, testing=1000),
        0.7,
    ).eval()
    for batch in (1, 2):
        images, anchors, per_level, objectness, deltas = _rpn_inputs(
            batch, image, device, seed=batch
        )

        def tv_step():
            with torch.no_grad():
                proposals = rpn.box_coder.decode(deltas, anchors).view(batch, -1, 4)
                return rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)

        shared = anchors[0]  # what maskops.AnchorGenerator gives every image

        def mo_step():
            return maskops.rpn_proposals(
                objectness,
                deltas,
                shared,
                images.image_sizes,
                1000,
                1000,
                0.7,
                0.0,
                1e-3,
                per_level,
            )

        _same_proposals(f"rpn_proposals batch {batch}", mo_step(), tv_step())
        rows.append(
            Row(
                "rpn_proposals",
                device,
                f"batch {batch}, {image}x{image}, {objectness.shape[0] // batch} anchors/image",
                measure(mo_step, device, reps),
                measure(tv_step, device, reps),
                min_bytes=nbytes(objectness, deltas, shared),
            )
        )
    return rows


run = bench


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    devices = [a.device] if a.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for d in devices:
        rows += bench(d, a.quick)
    print(machine())
    print(table(rows))
    if a.json:
        save_json(a.json, rows)


if __name__ == "__main__":
    main()
