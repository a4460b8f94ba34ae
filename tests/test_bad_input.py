"""Bad input across the public API: each call raises the right Python exception, with a message
naming the argument, before any kernel runs, and leaves the caller's tensors untouched.
Direct torch.ops.maskops calls (which skip the Python checks) raise too, never crash."""

import math

import pytest
import torch

import maskops

ops = torch.ops.maskops


def _inputs():
    """Fresh valid tensors for every case; each case breaks exactly one thing."""
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[1.0, 1.0, 20.0, 20.0], [5.0, 5.0, 30.0, 40.0], [2.0, 3.0, 9.0, 7.0]])
    return {
        "x": torch.randn(2, 3, 8, 8, generator=g),
        "rois": torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 2.0, 2.0, 7.0, 6.0]]),
        "l0": torch.randn(1, 2, 16, 16, generator=g),
        "l1": torch.randn(1, 2, 8, 8, generator=g),
        "boxes": boxes,
        "scores": torch.rand(3, generator=g),
        "idxs": torch.tensor([0, 1, 0]),
        "masks": torch.rand(3, 1, 28, 28, generator=g),
    }


# (id, call(t), exception, message pattern)
CASES = [
    # roi_align
    (
        "roi_align input list",
        lambda t: maskops.roi_align([t["x"]], t["rois"], 2),
        TypeError,
        "input must be a torch.Tensor",
    ),
    (
        "roi_align input int",
        lambda t: maskops.roi_align(t["x"].long(), t["rois"], 2),
        TypeError,
        "input must have a floating dtype",
    ),
    (
        "roi_align input 3d",
        lambda t: maskops.roi_align(t["x"][0], t["rois"], 2),
        ValueError,
        "input must be a 4-d tensor",
    ),
    (
        "roi_align input 5d",
        lambda t: maskops.roi_align(t["x"][None], t["rois"], 2),
        ValueError,
        "input must be a 4-d tensor",
    ),
    (
        "roi_align rois 4 cols",
        lambda t: maskops.roi_align(t["x"], t["rois"][:, :4], 2),
        ValueError,
        r"boxes .*\[K, 5\]",
    ),
    (
        "roi_align rois 1d",
        lambda t: maskops.roi_align(t["x"], t["rois"][0], 2),
        ValueError,
        r"boxes .*\[K, 5\]",
    ),
    (
        "roi_align rois int",
        lambda t: maskops.roi_align(t["x"], t["rois"].int(), 2),
        TypeError,
        "boxes must have a floating dtype",
    ),
    (
        "roi_align rois device",
        lambda t: maskops.roi_align(t["x"], t["rois"].to("meta"), 2),
        ValueError,
        "boxes must be on the same device",
    ),
    (
        "roi_align list wrong cols",
        lambda t: maskops.roi_align(t["x"], [t["boxes"][:, :3]], 2),
        ValueError,
        r"boxes\[0\] must have shape \[L, 4\]",
    ),
    (
        "roi_align list int",
        lambda t: maskops.roi_align(t["x"], [t["boxes"].long()], 2),
        TypeError,
        r"boxes\[0\] must have a floating dtype",
    ),
    (
        "roi_align boxes str",
        lambda t: maskops.roi_align(t["x"], "boxes", 2),
        TypeError,
        "boxes must be a Tensor",
    ),
    (
        "roi_align batch index high",
        lambda t: maskops.roi_align(t["x"], t["rois"] + torch.tensor([2.0, 0, 0, 0, 0]), 2),
        ValueError,
        r"batch index",
    ),
    (
        "roi_align batch index neg",
        lambda t: maskops.roi_align(t["x"], t["rois"] - torch.tensor([1.0, 0, 0, 0, 0]), 2),
        ValueError,
        r"batch index",
    ),
    (
        "roi_align list too long",
        lambda t: maskops.roi_align(t["x"], [t["boxes"]] * 3, 2),
        ValueError,
        r"batch index",
    ),
    (
        "roi_align output zero",
        lambda t: maskops.roi_align(t["x"], t["rois"], 0),
        ValueError,
        "output_size must be positive",
    ),
    (
        "roi_align output neg pair",
        lambda t: maskops.roi_align(t["x"], t["rois"], (3, -1)),
        ValueError,
        r"output_size\[1\] must be positive",
    ),
    (
        "roi_align output triple",
        lambda t: maskops.roi_align(t["x"], t["rois"], (3, 3, 3)),
        ValueError,
        "output_size must be an int or a pair",
    ),
    (
        "roi_align output float",
        lambda t: maskops.roi_align(t["x"], t["rois"], 2.0),
        TypeError,
        "output_size must be an int",
    ),
    (
        "roi_align output bool",
        lambda t: maskops.roi_align(t["x"], t["rois"], True),
        TypeError,
        "output_size must be an int",
    ),
    (
        "roi_align scale zero",
        lambda t: maskops.roi_align(t["x"], t["rois"], 2, 0.0),
        ValueError,
        "spatial_scale",
    ),
    (
        "roi_align scale neg",
        lambda t: maskops.roi_align(t["x"], t["rois"], 2, -0.5),
        ValueError,
        "spatial_scale",
    ),
    (
        "roi_align scale inf",
        lambda t: maskops.roi_align(t["x"], t["rois"], 2, math.inf),
        ValueError,
        "spatial_scale",
    ),
    (
        "roi_align scale str",
        lambda t: maskops.roi_align(t["x"], t["rois"], 2, "1"),
        TypeError,
        "spatial_scale must be a number",
    ),
    (
        "roi_align sampling float",
        lambda t: maskops.roi_align(t["x"], t["rois"], 2, 1.0, 2.5),
        TypeError,
        "sampling_ratio must be an int",
    ),
    (
        "roi_align aligned int",
        lambda t: maskops.roi_align(t["x"], t["rois"], 2, 1.0, 2, 1),
        TypeError,
        "aligned must be a bool",
    ),
    (
        "RoIAlign output zero",
        lambda t: maskops.RoIAlign(0, 1.0, 2),
        ValueError,
        "output_size must be positive",
    ),
    # multiscale_roi_align
    (
        "multiscale empty",
        lambda t: maskops.multiscale_roi_align([], t["rois"], 2, []),
        TypeError,
        "features must be a non-empty list",
    ),
    (
        "multiscale channels",
        lambda t: maskops.multiscale_roi_align(
            [t["l0"], t["l1"][:, :1]], [t["boxes"]], 2, [0.25, 0.125]
        ),
        ValueError,
        r"features\[1\] must have the dtype, batch size and channels",
    ),
    (
        "multiscale dtype",
        lambda t: maskops.multiscale_roi_align(
            [t["l0"], t["l1"].double()], [t["boxes"]], 2, [0.25, 0.125]
        ),
        ValueError,
        r"features\[1\]",
    ),
    (
        "multiscale scales len",
        lambda t: maskops.multiscale_roi_align([t["l0"], t["l1"]], [t["boxes"]], 2, [0.25]),
        ValueError,
        "one scale per level",
    ),
    (
        "multiscale scales not halving",
        lambda t: maskops.multiscale_roi_align([t["l0"], t["l1"]], [t["boxes"]], 2, [0.25, 0.2]),
        ValueError,
        "consecutive powers of two",
    ),
    (
        "multiscale scales skip",
        lambda t: maskops.multiscale_roi_align([t["l0"], t["l1"]], [t["boxes"]], 2, [0.25, 0.0625]),
        ValueError,
        "consecutive powers of two",
    ),
    (
        "multiscale canonical scale",
        lambda t: maskops.multiscale_roi_align(
            [t["l0"], t["l1"]], [t["boxes"]], 2, [0.25, 0.125], canonical_scale=-1
        ),
        ValueError,
        "canonical_scale",
    ),
    (
        "multiscale module x list",
        lambda t: maskops.MultiScaleRoIAlign(["0"], 2, 2)([t["l0"]], [t["boxes"]], [(64, 64)]),
        TypeError,
        "x must be a dict",
    ),
    (
        "multiscale module names",
        lambda t: maskops.MultiScaleRoIAlign(["a"], 2, 2)({"0": t["l0"]}, [t["boxes"]], [(64, 64)]),
        ValueError,
        "none of the feature maps",
    ),
    # nms family
    (
        "nms boxes 3 cols",
        lambda t: maskops.nms(t["boxes"][:, :3], t["scores"], 0.5),
        ValueError,
        "boxes",
    ),
    ("nms boxes 1d", lambda t: maskops.nms(t["boxes"][0], t["scores"], 0.5), ValueError, "boxes"),
    (
        "nms boxes int",
        lambda t: maskops.nms(t["boxes"].long(), t["scores"], 0.5),
        TypeError,
        "boxes",
    ),
    (
        "nms scores length",
        lambda t: maskops.nms(t["boxes"], t["scores"][:2], 0.5),
        ValueError,
        "scores",
    ),
    (
        "nms scores 2d",
        lambda t: maskops.nms(t["boxes"], t["scores"][:, None], 0.5),
        ValueError,
        "scores",
    ),
    (
        "nms threshold str",
        lambda t: maskops.nms(t["boxes"], t["scores"], "0.5"),
        TypeError,
        "iou_threshold",
    ),
    (
        "nms threshold nan",
        lambda t: maskops.nms(t["boxes"], t["scores"], math.nan),
        ValueError,
        "iou_threshold",
    ),
    (
        "nms scores device",
        lambda t: maskops.nms(t["boxes"], t["scores"].to("meta"), 0.5),
        ValueError,
        "scores",
    ),
    (
        "nms max_output neg",
        lambda t: maskops.nms(t["boxes"], t["scores"], 0.5, max_output=-1),
        ValueError,
        "max_output",
    ),
    (
        "batched_nms idxs float",
        lambda t: maskops.batched_nms(t["boxes"], t["scores"], t["idxs"].float(), 0.5),
        TypeError,
        "idxs",
    ),
    (
        "batched_nms idxs length",
        lambda t: maskops.batched_nms(t["boxes"], t["scores"], t["idxs"][:2], 0.5),
        ValueError,
        "idxs",
    ),
    (
        "box_iou boxes2 shape",
        lambda t: maskops.box_iou(t["boxes"], t["boxes"][:, :2]),
        ValueError,
        "boxes2",
    ),
    (
        "box_iou boxes1 bool",
        lambda t: maskops.box_iou(t["boxes"] > 1, t["boxes"]),
        TypeError,
        "boxes1",
    ),
    ("box_area 3 cols", lambda t: maskops.box_area(t["boxes"][:, :3]), ValueError, "boxes"),
    # paste_masks / RLE
    (
        "paste masks 3d",
        lambda t: maskops.paste_masks(t["masks"][:, 0], t["boxes"], (50, 50)),
        ValueError,
        "masks must be a 4-d tensor",
    ),
    (
        "paste masks not square",
        lambda t: maskops.paste_masks(t["masks"][..., :20], t["boxes"], (50, 50)),
        ValueError,
        "masks must be square",
    ),
    (
        "paste masks bool",
        lambda t: maskops.paste_masks(t["masks"] > 0.5, t["boxes"], (50, 50)),
        TypeError,
        "masks must have a floating dtype",
    ),
    (
        "paste boxes count",
        lambda t: maskops.paste_masks(t["masks"], t["boxes"][:2], (50, 50)),
        ValueError,
        "one row per mask",
    ),
    (
        "paste boxes cols",
        lambda t: maskops.paste_masks(t["masks"], t["boxes"][:, :3], (50, 50)),
        ValueError,
        r"boxes must have shape \[N, 4\]",
    ),
    (
        "paste image size int",
        lambda t: maskops.paste_masks(t["masks"], t["boxes"], 50),
        ValueError,
        "image_size must be a pair",
    ),
    (
        "paste image size neg",
        lambda t: maskops.paste_masks(t["masks"], t["boxes"], (50, -2)),
        ValueError,
        "image_size must be non-negative",
    ),
    (
        "paste threshold str",
        lambda t: maskops.paste_masks(t["masks"], t["boxes"], (50, 50), "0.5"),
        TypeError,
        "threshold",
    ),
    (
        "paste padding neg",
        lambda t: maskops.paste_masks(t["masks"], t["boxes"], (50, 50), padding=-1),
        ValueError,
        "padding",
    ),
    (
        "rle float masks",
        lambda t: maskops.masks_to_rle(t["masks"][:, 0]),
        TypeError,
        "masks must be bool or uint8",
    ),
    (
        "rle channels",
        lambda t: maskops.masks_to_rle(torch.zeros(2, 3, 4, 4, dtype=torch.bool)),
        ValueError,
        r"\[N, H, W\]",
    ),
]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_call_raises_and_writes_nothing(name, call, exc, match):
    t = _inputs()
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(exc, match=match):
        call(t)
    for k, v in t.items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed call"


def test_table_is_large():
    assert len(CASES) >= 50


# Direct operator calls skip the Python checks: the C++ checks must still refuse cleanly.
DIRECT = [
    ("roi_align rois shape", lambda t: ops.roi_align(t["x"], t["rois"][:, :4], 1.0, 2, 2, 2, True)),
    ("roi_align batch index", lambda t: ops.roi_align(t["x"], t["rois"] * 9, 1.0, 2, 2, 2, True)),
    (
        "roi_align nan batch index",
        lambda t: ops.roi_align(t["x"], torch.full((1, 5), math.nan), 1.0, 2, 2, 2, True),
    ),
    ("roi_align pooled zero", lambda t: ops.roi_align(t["x"], t["rois"], 1.0, 0, 2, 2, True)),
    ("roi_align input int", lambda t: ops.roi_align(t["x"].long(), t["rois"], 1.0, 2, 2, 2, True)),
    (
        "roi_align backward grad shape",
        lambda t: ops._roi_align_backward(
            torch.randn(5, 3, 2, 2), t["rois"], 1.0, 2, 2, 2, 3, 8, 8, 2, True
        ),
    ),
    (
        "multiscale scales count",
        lambda t: ops.multiscale_roi_align(
            [t["l0"], t["l1"]], torch.zeros(1, 5), [0.25], 2, 2, 2, False, 224.0, 4.0, 2
        ),
    ),
    (
        "multiscale no levels",
        lambda t: ops.multiscale_roi_align(
            [], torch.zeros(1, 5), [], 2, 2, 2, False, 224.0, 4.0, 2
        ),
    ),
    (
        "multiscale backward levels",
        lambda t: ops._multiscale_roi_align_backward(
            torch.randn(1, 2, 2, 2),
            torch.zeros(1, 5),
            [0.25],
            2,
            2,
            1,
            2,
            [8, 4],
            [8],
            2,
            False,
            224.0,
            4.0,
            2,
        ),
    ),
    ("nms boxes shape", lambda t: ops.nms(t["boxes"][:, :3], t["scores"], 0.5)),
    ("nms scores length", lambda t: ops.nms(t["boxes"], t["scores"][:1], 0.5)),
    (
        "batched_nms idxs dtype",
        lambda t: ops.batched_nms(t["boxes"], t["scores"], t["idxs"].float(), 0.5),
    ),
    ("box_iou shape", lambda t: ops.box_iou(t["boxes"][:, :2], t["boxes"])),
    (
        "paste boxes count",
        lambda t: ops.paste_masks(t["masks"], t["boxes"][:1], 50, 50, 1, None, False),
    ),
    (
        "paste negative size",
        lambda t: ops.paste_masks(t["masks"], t["boxes"], -1, 50, 1, None, False),
    ),
    (
        "paste non-square",
        lambda t: ops.paste_masks(t["masks"][..., :3], t["boxes"], 50, 50, 1, None, False),
    ),
    ("rle dtype", lambda t: ops._masks_to_rle(t["masks"][:, 0])),
]


@pytest.mark.parametrize("name,call", DIRECT, ids=[c[0] for c in DIRECT])
def test_direct_op_call_raises(name, call):
    t = _inputs()
    before = {k: v.clone() for k, v in t.items()}
    with pytest.raises(RuntimeError):
        call(t)
    for k, v in t.items():
        assert torch.equal(v, before[k])
