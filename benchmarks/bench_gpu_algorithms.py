"""The GPU algorithms' work, measured on the CPU through their test-only twins.

    python -m benchmarks.bench_gpu_algorithms [--quick] [--json PATH]

The test-only ops run the CUDA kernels' own per-thread bodies on the CPU (csrc/README.md), so
their CPU time is a measure of the work the GPU algorithm does, visible here long before a GPU
is. Three ratios, each against its goal:

- RoIAlign backward, deterministic gather / atomic scatter
  (``_multiscale_roi_align_backward_cuda_algo``): FPN of one 800x800 image per batch entry
  (strides 4-32), 8 channels, 7x7 bins, sampling ratio 2, 2 images x 512 RoIs (the training
  size). Goal: at most 3x.
- RPN proposals, batch 8 / batch 1 (``_rpn_proposals_elementwise``): 800x800 images, 5 levels
  (strides 4-64, 3 anchors per position), 1000 candidates per level before NMS and 1000
  proposals after. Goal: at most 10x (linear in the batch).
- Mask paste, CUDA tiles / CPU kernel (``_paste_masks_elementwise`` against ``paste_masks``):
  100 masks 28x28 thresholded into an 800x1216 image (Mask R-CNN's inference paste). The
  tiles write every output byte one at a time, as the GPU's threads do (coalesced there),
  where the CPU kernel memsets the zeros, so the twin is slower by a constant factor. Goal:
  at most 20x (the one-thread-per-pixel kernel the tiles replaced measured about 95x).

The twins run on one thread (the scatter twin is serial; the others would otherwise get
every core), so the ratios compare work. ``run`` (the suite's entry point) reports each pair
as a Row: "maskops" is the GPU algorithm under study, "torchvision" the baseline it is
measured against (the scatter; batch 1 scaled by 8), so the reported speed-up is
baseline / algorithm and ``goal`` says what it must reach.
"""

from __future__ import annotations

import math

import torch

from benchmarks.bench_multiscale_roi_align import workload as fpn_workload
from benchmarks.common import Row, Timing, cli, measure, on_one_thread
from maskops.testing import ops as testing_ops

ops = torch.ops.maskops

ROI_GOAL = 3.0  # deterministic gather at most this many times the scatter
RPN_GOAL = 10.0  # batch 8 at most this many times batch 1
PASTE_GOAL = 20.0  # the paste's CUDA tiles at most this many times the CPU kernel


def roi_backward_case(images: int, rois: int, channels: int = 8, image: int = 800, output: int = 7):
    """grad, rois and the op's other arguments for a batch of FPN images."""
    feats, boxes, _ = fpn_workload("cpu", rois=rois, channels=channels, image=image, batch=images)
    rois_t = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)]
    )
    levels = list(feats.values())
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(len(rois_t), channels, output, output, generator=g)
    args = (
        grad,
        rois_t,
        [0.25, 0.125, 0.0625, 0.03125],
        output,
        output,
        images,
        channels,
        [f.shape[2] for f in levels],
        [f.shape[3] for f in levels],
        2,
        False,
        224.0,
        4.0,
        2,
    )
    return args


def roi_backward(args, deterministic: bool):
    return testing_ops._multiscale_roi_align_backward_cuda_algo(*args, deterministic)


def rpn_case(batch: int, image: int = 800, pre: int = 1000, post: int = 1000, seed: int = 0):
    """RPN head outputs for a batch of images, in the op's layout."""
    g = torch.Generator().manual_seed(seed)
    per_level, anchors = [], []
    for k, s in enumerate((4, 8, 16, 32, 64)):
        side = math.ceil(image / s)
        ys, xs = torch.meshgrid(torch.arange(side) * s, torch.arange(side) * s, indexing="ij")
        centres = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).float()
        size = 32.0 * 2**k
        base = []
        for r in (0.5, 1.0, 2.0):
            h, w = size * math.sqrt(r), size / math.sqrt(r)
            base.append([-w / 2, -h / 2, w / 2, h / 2])
        anchors.append((centres + torch.tensor(base)).reshape(-1, 4))
        per_level.append(side * side * 3)
    anchors = torch.cat(anchors)
    a = anchors.shape[0]
    objectness = torch.randn(batch, a, generator=g) * 2
    deltas = torch.randn(batch, a, 4, generator=g) * 0.3
    return (
        objectness,
        deltas,
        anchors,
        [image] * (2 * batch),
        pre,
        post,
        0.7,
        0.0,
        1e-3,
        per_level,
    )


def rpn(args):
    return testing_ops._rpn_proposals_elementwise(*args)


def paste_case(masks: int = 100, image=(800, 1216), seed: int = 0):
    """Mask R-CNN's inference paste: masks 28x28 and boxes of 5-305 pixels inside the image."""
    g = torch.Generator().manual_seed(seed)
    h, w = image
    m = torch.rand(masks, 1, 28, 28, generator=g)
    xy = torch.rand(masks, 2, generator=g) * torch.tensor([w, h]) * 0.9
    boxes = torch.cat([xy, xy + torch.rand(masks, 2, generator=g) * 300 + 5], 1)
    return m, boxes, h, w


def paste(case, twin: bool):
    m, boxes, h, w = case
    op = testing_ops._paste_masks_elementwise if twin else ops.paste_masks
    return op(m, boxes, h, w, 1, 0.5, False)


def measure_ratios(quick: bool = False) -> dict:
    """Times (ms) and the three ratios. quick: smaller problems, one repetition (smoke test)."""
    reps = 1 if quick else 3
    res = {}

    def roi():
        images, rois = (1, 64) if quick else (2, 512)
        args = roi_backward_case(images, rois, image=256 if quick else 800)
        scatter = roi_backward(args, False)
        gather = roi_backward(args, True)
        for a, b in zip(gather, scatter):  # the guard: no time for a wrong result
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        res["roi_case"] = f"{images} images x {rois} RoIs, 8 ch, 7x7, sampling ratio 2"
        res["scatter"] = measure(lambda: roi_backward(args, False), "cpu", reps)
        res["gather"] = measure(lambda: roi_backward(args, True), "cpu", reps)

    def proposals():
        image, pre = (256, 200) if quick else (800, 1000)
        big = 2 if quick else 8
        one, many = rpn_case(1, image, pre, pre), rpn_case(big, image, pre, pre)
        res["rpn_case"] = f"{image}x{image}, 5 levels, pre/post NMS {pre}, batch {big} vs 1"
        res["rpn_batch"] = big
        res["rpn_1"] = measure(lambda: rpn(one), "cpu", reps)
        res["rpn_many"] = measure(lambda: rpn(many), "cpu", reps)

    def pastes():
        case = paste_case(20, (200, 300)) if quick else paste_case()
        assert torch.equal(paste(case, True), paste(case, False))  # the guard
        res["paste_case"] = (
            f"{case[0].shape[0]} masks 28x28 into {case[2]}x{case[3]}, threshold 0.5"
        )
        res["paste_cpu"] = measure(lambda: paste(case, False), "cpu", reps)
        res["paste_tiles"] = measure(lambda: paste(case, True), "cpu", reps)

    on_one_thread(roi)
    on_one_thread(proposals)
    on_one_thread(pastes)
    res["roi_ratio"] = res["gather"].median_ms / res["scatter"].median_ms
    res["rpn_ratio"] = res["rpn_many"].median_ms / res["rpn_1"].median_ms
    res["paste_ratio"] = res["paste_tiles"].median_ms / res["paste_cpu"].median_ms
    return res


def run(device: str = "cpu", quick: bool = False) -> list[Row]:
    """The suite's entry: the twins run on the CPU whatever the device."""
    if device != "cpu":
        return []
    r = measure_ratios(quick)
    b = r["rpn_batch"]
    scaled = Timing(r["rpn_1"].median_ms * b, r["rpn_1"].iqr_ms * b, r["rpn_1"].reps)
    return [
        Row(
            "roi_align bwd, deterministic gather vs atomic scatter (CUDA twins)",
            "cpu",
            r["roi_case"],
            r["gather"],
            r["scatter"],
            note=f"gather/scatter {r['roi_ratio']:.2f}x, goal <= {ROI_GOAL:g}x",
        ),
        Row(
            f"rpn_proposals batch {b} vs {b} x batch 1 (CUDA twin)",
            "cpu",
            r["rpn_case"],
            r["rpn_many"],
            scaled,
            note=f"batch {b}/batch 1 {r['rpn_ratio']:.2f}x, goal <= {RPN_GOAL:g}x"
            if b == 8
            else f"batch {b}/batch 1 {r['rpn_ratio']:.2f}x",
        ),
        Row(
            "paste_masks, CUDA tiles vs CPU kernel (CUDA twin)",
            "cpu",
            r["paste_case"],
            r["paste_tiles"],
            r["paste_cpu"],
            note=f"tiles/CPU kernel {r['paste_ratio']:.2f}x, goal <= {PASTE_GOAL:g}x",
        ),
    ]


if __name__ == "__main__":
    cli(run, __doc__)
