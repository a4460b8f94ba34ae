"""Property-based tests (hypothesis): random shapes (0-sized included), layouts (contiguous,
channels_last, sliced, expanded) and coordinates (NaN, inf, huge, negative, inverted).
Properties: equal to the reference wherever the reference is defined (finite boxes), and
never a crash; non-finite boxes give finite output (they pool / paste nothing)."""

import math

import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.models.detection.roi_heads import paste_masks_in_image

import maskops
from maskops.check.references import ref_iou
from maskops.testing import ops as testing_ops

from helpers import in_layout

ops = torch.ops.maskops
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL = [math.nan, math.inf, -math.inf, 1e30, -1e30]
coord = st.one_of(st.floats(-30, 60, allow_nan=False, width=32), st.sampled_from(SPECIAL))
finite_coord = st.floats(-30, 60, allow_nan=False, width=32)


@st.composite
def roi_align_case(draw, finite):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    k = draw(st.integers(0, 8))
    c_ = finite_coord if finite else coord
    coords = [[draw(st.integers(0, n - 1))] + [draw(c_) for _ in range(4)] for _ in range(k)]
    return dict(
        shape=(n, c, h, w),
        rois=torch.tensor(coords, dtype=torch.float32).reshape(k, 5),
        output=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        scale=draw(st.sampled_from([1.0, 0.5, 0.25])),
        sr=draw(st.integers(-1, 3)),
        aligned=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced", "expanded"])),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(roi_align_case(finite=True))
def test_roi_align_equals_torchvision(case):
    g = torch.Generator().manual_seed(case["seed"])
    base = torch.randn(*case["shape"], generator=g, dtype=torch.float64)
    if case["layout"] == "expanded":
        base = base[:1].expand(case["shape"]).contiguous()
    x = in_layout(base, case["layout"])
    rois = case["rois"].double()
    args = (case["output"], case["scale"], case["sr"], case["aligned"])
    got = maskops.roi_align(x, rois, *args)
    try:
        expected = torchvision.ops.roi_align(base, rois, *args)
    except (RuntimeError, ValueError):
        # torchvision fails on inverted boxes with adaptive sampling in aligned mode (a
        # negative sample count); maskops pools those boxes to zeros.
        assert torch.isfinite(got).all()
        return
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # Backward, through the public function.
    xg = base.clone().requires_grad_()
    gout = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    torchvision.ops.roi_align(xg, rois, *args).backward(gout)
    xm = x.detach().clone().requires_grad_()
    maskops.roi_align(xm, rois, *args).backward(gout)
    torch.testing.assert_close(xm.grad, xg.grad, rtol=0, atol=1e-10)


@SETTINGS
@given(roi_align_case(finite=False))
def test_roi_align_never_crashes_and_stays_finite(case):
    g = torch.Generator().manual_seed(case["seed"])
    x = in_layout(torch.randn(*case["shape"], generator=g), case["layout"])
    args = (case["scale"], *case["output"], case["sr"], case["aligned"])
    out = ops.roi_align(x, case["rois"], *args)
    assert torch.isfinite(out).all()
    # The GPU algorithm's body agrees with the CPU loops on any input.
    el = testing_ops._multiscale_roi_align_forward_elementwise(
        [x], case["rois"], [args[0]], *args[1:], 224.0, 4.0, 0
    )
    torch.testing.assert_close(el, out, rtol=1e-5, atol=1e-5)


@st.composite
def nms_case(draw, finite):
    n = draw(st.integers(0, 40))
    c_ = finite_coord if finite else coord
    boxes = torch.tensor(
        [[draw(c_) for _ in range(4)] for _ in range(n)], dtype=torch.float32
    ).reshape(n, 4)
    # Few distinct scores, so ties are common.
    scores = torch.tensor(
        [draw(st.sampled_from([0.1, 0.5, 0.5, 0.9, 0.3])) for _ in range(n)], dtype=torch.float32
    )
    return boxes, scores, draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]))


@SETTINGS
@given(nms_case(finite=True))
def test_nms_equals_torchvision(case):
    boxes, scores, thr = case
    assert torch.equal(maskops.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
    assert torch.equal(
        testing_ops._nms_bitmask(boxes, scores, None, thr), torchvision.ops.nms(boxes, scores, thr)
    )


@SETTINGS
@given(nms_case(finite=False))
def test_nms_never_crashes(case):
    boxes, scores, thr = case
    keep = maskops.nms(boxes, scores, thr)
    assert keep.dtype == torch.int64 and keep.numel() <= boxes.shape[0]
    assert keep.unique().numel() == keep.numel()
    iou = maskops.box_iou(boxes, boxes)
    assert iou.shape == (boxes.shape[0],) * 2


@SETTINGS
@given(st.integers(0, 12), st.integers(0, 12), st.integers(0, 2**16))
def test_box_iou_matches_float64_reference(n, m, seed):
    g = torch.Generator().manual_seed(seed)

    def boxes(k):
        xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 50
        wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * 20
        wh[torch.rand(k, generator=g) < 0.2] = 0  # zero-area boxes
        return torch.cat([xy, xy + wh], dim=1)

    a, b = boxes(n), boxes(m)
    ref = ref_iou(a, b)
    got = maskops.box_iou(a.float(), b.float())
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@st.composite
def paste_case(draw, finite):
    n = draw(st.integers(0, 6))
    h, w = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    m = draw(st.sampled_from([1, 2, 7, 28]))
    boxes = []
    for _ in range(n):
        if finite:  # boxes torchvision handles: right/bottom edge inside the image
            x1, y1 = draw(st.floats(-10, w - 1, width=32)), draw(st.floats(-10, h - 1, width=32))
            boxes.append(
                [
                    x1,
                    y1,
                    max(x1, 0) + draw(st.floats(0, 40, width=32)),
                    max(y1, 0) + draw(st.floats(0, 40, width=32)),
                ]
            )
        else:
            boxes.append([draw(coord) for _ in range(4)])
    return dict(
        n=n,
        size=(h, w),
        m=m,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        padding=draw(st.integers(0, 2)),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(paste_case(finite=True))
def test_paste_equals_torchvision(case):
    masks = torch.rand(
        case["n"], 1, case["m"], case["m"], generator=torch.Generator().manual_seed(case["seed"])
    )
    if case["n"] == 0:
        return
    expected = paste_masks_in_image(masks, case["boxes"], case["size"], case["padding"])
    got = maskops.paste_masks(masks, case["boxes"], case["size"], None, case["padding"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@SETTINGS
@given(paste_case(finite=False))
def test_paste_never_crashes(case):
    masks = torch.rand(
        case["n"], 1, case["m"], case["m"], generator=torch.Generator().manual_seed(case["seed"])
    )
    out = maskops.paste_masks(masks, case["boxes"], case["size"], None, case["padding"])
    assert out.shape == (case["n"], 1, *case["size"]) and torch.isfinite(out).all()
    el = testing_ops._paste_masks_elementwise(
        masks, case["boxes"], *case["size"], case["padding"], None, False
    )
    torch.testing.assert_close(el, out, rtol=0, atol=1e-6)
