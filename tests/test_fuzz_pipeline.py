"""Property-based tests (hypothesis) of the detection-pipeline ops test_fuzz.py does not cover:
multi-level RoIAlign, anchors, box coding, RPN proposals, batched NMS and COCO RLE.

Random shapes (0-sized included), dtypes (float16, bfloat16, float32, float64 wherever the op
takes floats), layouts (contiguous, channels_last, sliced) and values (tiny, huge,
zero-area, inverted boxes; huge deltas). Properties:
- multiscale_roi_align / MultiScaleRoIAlign equal torchvision's MultiScaleRoIAlign (or, with
  aligned=True, its LevelMapper + roi_align) within 1e-5, gradients within 1e-4; half types
  within their rounding of the float32 result; non-finite boxes never crash and give finite
  output.
- anchors equal torchvision's AnchorGenerator bit for bit, for any sizes, ratios, grids
  (1x1 and 0-sized included) and strides; an empty feature map is refused clearly.
- box coding equals torchvision's BoxCoder bit for bit in float32/float64 (inf and NaN where
  torchvision has them, and only there), half types equal torchvision's float32 result
  rounded once; decode(encode(x)) returns x within a float64-derived error bound.
- rpn_proposals equal torchvision's RPN decode + filter_proposals bit for bit (distinct
  scores: equal scores may legitimately come in another order).
- batched_nms equals torchvision.ops.batched_nms (and its exact per-class form) with distinct
  scores, n < 1000 (above, torchvision's merge sort is unstable).
- masks_to_rle gives pycocotools.mask.encode's counts byte for byte, and decodes back.
"""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_rpn_proposals import make_rpn, torchvision_proposals
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as tv_boxes
from torchvision.ops.poolers import LevelMapper

import maskops

from helpers import in_layout

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
SPECIAL = [math.nan, math.inf, -math.inf, 1e30, -1e30]
DEFAULT_CLIP = math.log(1000.0 / 16)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sliced_rows(x: torch.Tensor) -> torch.Tensor:
    """The same values as every other column of a wider 2-d tensor (non-contiguous)."""
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
    wide[:, ::2] = x
    out = wide[:, ::2]
    assert not out.is_contiguous() or x.numel() <= 1 or x.shape[1] <= 1
    return out


def exactly_equal(got, expected):
    """Bit for bit, inf and NaN included (and in the same places)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (
        got.dtype,
        got.shape,
        expected.dtype,
        expected.shape,
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# multi-level RoIAlign
# ---------------------------------------------------------------------------------------------


@st.composite
def box_rows(draw, k, image, finite):
    """k boxes (x1, y1, x2, y2) of every kind: ordinary, tiny, huge, zero-area, inverted, and
    (unless finite) some with NaN / inf / 1e30 coordinates."""
    h, w = image
    rows, huge = [], False
    for _ in range(k):
        kind = draw(st.sampled_from(["normal", "normal", "tiny", "huge", "zero", "inverted"]))
        x1 = draw(st.floats(-20, w + 10, width=32))
        y1 = draw(st.floats(-20, h + 10, width=32))
        if kind == "normal":
            bw, bh = (
                draw(st.floats(0.5, 1.5 * w, width=32)),
                draw(st.floats(0.5, 1.5 * h, width=32)),
            )
        elif kind == "tiny":
            bw, bh = draw(st.floats(0, 1e-3)), draw(st.floats(0, 1e-3))
        elif kind == "huge":
            huge = True
            bw, bh = draw(st.floats(500, 5000, width=32)), draw(st.floats(500, 5000, width=32))
        elif kind == "zero":
            bw, bh = draw(st.sampled_from([(0.0, 0.0), (0.0, 10.0), (10.0, 0.0)]))
        else:  # inverted along x, y or both (both: positive area)
            bw, bh = draw(st.sampled_from([(-1, 1), (1, -1), (-1, -1)]))
            bw, bh = bw * draw(st.floats(0.5, w, width=32)), bh * draw(st.floats(0.5, h, width=32))
        row = [x1, y1, x1 + bw, y1 + bh]
        if not finite and draw(st.integers(0, 2)) == 0:
            for j in draw(st.sets(st.integers(0, 3), min_size=1)):
                row[j] = draw(st.sampled_from(SPECIAL))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64).reshape(k, 4), huge


@st.composite
def msroi_case(draw, finite=True):
    levels = draw(st.integers(1, 4))
    k0 = draw(st.integers(0, 3))  # features[0] has stride 2 ** k0
    top = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))  # the coarsest level's size
    sizes = [(top[0] << (levels - 1 - i), top[1] << (levels - 1 - i)) for i in range(levels)]
    image = (sizes[0][0] << k0, sizes[0][1] << k0)
    batch = draw(st.integers(1, 2))
    shapes = [image] + [
        (
            image[0] - draw(st.integers(0, image[0] - 1)),
            image[1] - draw(st.integers(0, image[1] - 1)),
        )
        for _ in range(batch - 1)
    ]
    boxes, any_huge = [], False
    for s in shapes:
        b, huge = draw(box_rows(draw(st.integers(0, 8)), s, finite))
        boxes.append(b)
        any_huge |= huge
    # Adaptive sampling of a 5000-pixel box takes millions of samples per bin (and maskops
    # caps the count at 1024 per axis where torchvision does not): fixed counts for those.
    sr = draw(st.integers(1, 3) if any_huge or not finite else st.integers(-1, 3))
    output = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return dict(
        sizes=sizes,
        scales=[2.0 ** -(k0 + i) for i in range(levels)],
        shapes=shapes,
        boxes=boxes,
        channels=draw(st.integers(1, 5)),
        batch=batch,
        sr=sr,
        output=output,
        canonical=(draw(st.sampled_from([224, 56, 100])), draw(st.sampled_from([4, 2, 3]))),
        aligned=draw(st.booleans()),
        dtype=draw(st.sampled_from(FLOATS + [torch.float32] * 2)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "sliced"])),
        grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _reference_msroi(features, boxes, output, scales, sr, canonical, aligned):
    """torchvision's multi-level pooling (poolers._multiscale_roi_align), with `aligned`.

    Returns the pooled boxes and a mask of the boxes torchvision cannot pool: in aligned mode
    with adaptive sampling, a box inverted along exactly one axis has a negative sample
    count, and torchvision raises (maskops pools those boxes to zeros)."""
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output))
    failed = torch.zeros(rois.shape[0], dtype=torch.bool)
    if len(features) == 1:
        levels = torch.zeros(rois.shape[0], dtype=torch.int64)
    else:
        k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
        levels = LevelMapper(k_min, k_max, *canonical)(boxes)
    for level, (f, scale) in enumerate(zip(features, scales)):
        for i in torch.where(levels == level)[0].tolist():
            try:
                result[i] = torchvision.ops.roi_align(
                    f, rois[i : i + 1], output, scale, sr, aligned
                )[0]
            except (RuntimeError, ValueError):
                failed[i] = True
    return result, failed


def _msroi_inputs(case):
    g = gen(case["seed"])
    n, c = case["batch"], case["channels"]
    base = [
        torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(case["dtype"])
        for h, w in case["sizes"]
    ]
    names = [f"p{i}" for i in range(len(base))]
    return g, base, names


@SETTINGS
@given(msroi_case())
def test_multiscale_roi_align_equals_torchvision(case):
    g, base, names = _msroi_inputs(case)
    dtype = case["dtype"]
    ref_dtype = torch.float32 if dtype in HALF else dtype  # half types compute in float32
    ref_feats = [f.to(ref_dtype) for f in base]
    feats = [in_layout(f, case["layout"]) for f in base]
    boxes = [b.to(ref_dtype) for b in case["boxes"]]
    canonical_scale, canonical_level = case["canonical"]
    opts = dict(canonical_scale=canonical_scale, canonical_level=canonical_level)

    # The module (torchvision's constructor and forward), against torchvision's module.
    theirs = torchvision.ops.MultiScaleRoIAlign(names, case["output"], case["sr"], **opts)
    ours = maskops.MultiScaleRoIAlign(names, case["output"], case["sr"], **opts)
    x = OrderedDict(zip(names, feats))
    x["unused"] = torch.zeros(1)  # maps not named are ignored
    expected = theirs(OrderedDict(zip(names, ref_feats)), boxes, case["shapes"])
    got = ours(x, boxes, case["shapes"])
    assert got.dtype == dtype and got.shape == expected.shape
    assert ours.scales == theirs.scales == case["scales"]
    if dtype in HALF:  # float32 math, rounded once
        rel = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        torch.testing.assert_close(got.float(), expected, rtol=rel, atol=1e-5)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if (
        case["layout"] == "channels_last"
        and not feats[0].is_contiguous()
        and got.shape[1] > 1
        and got.shape[2:] != (1, 1)
    ):
        assert got.is_contiguous(memory_format=torch.channels_last)  # the layout of features[0]

    # The function, with aligned and a (non-contiguous) Tensor[K, 5] of rois.
    aligned = case["aligned"]
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    got = maskops.multiscale_roi_align(
        feats,
        sliced_rows(rois),
        case["output"],
        case["scales"],
        case["sr"],
        canonical_scale,
        canonical_level,
        aligned,
    )
    expected, failed = _reference_msroi(
        ref_feats, boxes, case["output"], case["scales"], case["sr"], case["canonical"], aligned
    )
    assert not failed.any() or (aligned and case["sr"] <= 0)
    assert (got[failed] == 0).all()
    if dtype in HALF:
        torch.testing.assert_close(got[~failed].float(), expected[~failed], rtol=rel, atol=1e-5)
    else:
        torch.testing.assert_close(got[~failed], expected[~failed], rtol=0, atol=1e-5)

    # Forward + backward, every level, against torchvision's autograd (float32 / float64).
    if not case["grad"] or dtype in HALF:
        return
    leaves_tv = [f.clone().requires_grad_() for f in base]
    leaves_mo = [f.detach().requires_grad_() for f in feats]  # keeps the layout
    out_tv = theirs(OrderedDict(zip(names, leaves_tv)), boxes, case["shapes"])
    out_mo = ours(OrderedDict(zip(names, leaves_mo)), boxes, case["shapes"])
    gout = torch.randn(out_tv.shape, generator=g, dtype=torch.float64).to(dtype)
    g_tv = torch.autograd.grad(out_tv, leaves_tv, gout, allow_unused=True)
    g_mo = torch.autograd.grad(out_mo, leaves_mo, gout, allow_unused=True)
    for a, b in zip(g_mo, g_tv):
        a = torch.zeros_like(leaves_tv[0]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@SETTINGS
@given(msroi_case(finite=False))
def test_multiscale_roi_align_non_finite_boxes_stay_finite(case):
    _, base, names = _msroi_inputs(case)
    feats = [in_layout(f, case["layout"]) for f in base]
    boxes = [
        b.to(torch.float64 if case["dtype"] == torch.float64 else torch.float32)
        for b in case["boxes"]
    ]
    canonical_scale, canonical_level = case["canonical"]
    ours = maskops.MultiScaleRoIAlign(
        names,
        case["output"],
        case["sr"],
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
        aligned=case["aligned"],
    )
    out = ours(OrderedDict(zip(names, feats)), boxes, case["shapes"])
    k = sum(b.shape[0] for b in boxes)
    assert out.shape == (k, case["channels"], *case["output"]) and out.dtype == case["dtype"]
    assert torch.isfinite(out).all()
    leaves = [f.detach().requires_grad_() for f in feats]
    out = ours(OrderedDict(zip(names, leaves)), boxes, case["shapes"])
    grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)


# ---------------------------------------------------------------------------------------------
# anchors
# ---------------------------------------------------------------------------------------------

anchor_size = st.one_of(st.integers(1, 1024), st.floats(0.5, 1000, width=32))
aspect_ratio = st.one_of(st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.05, 20))


@st.composite
def anchor_case(draw):
    levels = draw(st.integers(1, 4))
    sizes = tuple(tuple(draw(st.lists(anchor_size, min_size=1, max_size=3))) for _ in range(levels))
    ratios = tuple(
        tuple(draw(st.lists(aspect_ratio, min_size=1, max_size=3))) for _ in range(levels)
    )
    grids = [(draw(st.integers(0, 7)), draw(st.integers(0, 7))) for _ in range(levels)]
    # Strides up to 1000: past 2048 pixels the half types round, as torchvision's do.
    stride = st.one_of(st.integers(0, 64), st.integers(64, 1000))
    strides = [(draw(stride), draw(stride)) for _ in range(levels)]
    image = (draw(st.integers(1, 1500)), draw(st.integers(1, 1500)))
    return dict(
        sizes=sizes,
        ratios=ratios,
        grids=grids,
        strides=strides,
        image=image,
        dtype=draw(st.sampled_from(FLOATS)),
        cache=draw(st.booleans()),
    )


def assert_all_identical(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max difference {(a.double() - b.double()).abs().max()}"


@SETTINGS
@given(anchor_case())
def test_anchors_equal_torchvision(case):
    sizes, ratios, dtype = case["sizes"], case["ratios"], case["dtype"]
    tv = TVAnchorGenerator(sizes, ratios)
    mo = maskops.AnchorGenerator(sizes, ratios)
    assert mo.num_anchors_per_location() == tv.num_anchors_per_location()
    assert_all_identical(mo.cell_anchors, tv.cell_anchors)

    # Any grid (0-sized and 1x1 included) and any stride (0 included), every dtype.
    tv.set_cell_anchors(dtype, torch.device("cpu"))
    mo.set_cell_anchors(dtype, torch.device("cpu"))
    tv_strides = [[torch.tensor(s) for s in st_] for st_ in case["strides"]]
    expected = tv.grid_anchors([list(gs) for gs in case["grids"]], tv_strides)
    assert_all_identical(mo.grid_anchors(case["grids"], case["strides"]), expected)
    flat = maskops.generate_anchors(
        case["grids"], case["strides"], sizes, ratios, dtype=dtype, cache=case["cache"]
    )
    assert_all_identical([flat], [torch.cat(expected)])

    # forward: strides image_size // feature size, feature maps of the dtype (sliced: only
    # their shapes matter); an empty map has no stride and is refused.
    h, w = case["image"]
    images = ImageList(torch.zeros(1, 1, h, w), [(h, w)])
    feats = [torch.zeros(1, 1, gh, 2 * gw, dtype=dtype)[..., ::2] for gh, gw in case["grids"]]
    if any(gh == 0 or gw == 0 for gh, gw in case["grids"]):
        with pytest.raises(ValueError, match="empty grid"):
            maskops.AnchorGenerator(sizes, ratios)(images, feats)
        return
    expected = TVAnchorGenerator(sizes, ratios)(images, feats)
    assert_all_identical(maskops.AnchorGenerator(sizes, ratios)(images, feats), expected)


# ---------------------------------------------------------------------------------------------
# box coding
# ---------------------------------------------------------------------------------------------


@st.composite
def coder_case(draw):
    return dict(
        n=draw(st.integers(0, 40)),
        k=draw(st.integers(1, 3)),
        weights=tuple(
            draw(st.one_of(st.sampled_from([1.0, 5.0, 10.0]), st.floats(0.1, 20))) for _ in range(4)
        ),
        clip=draw(st.one_of(st.just(DEFAULT_CLIP), st.floats(0.1, 10))),
        dtype=draw(st.sampled_from(FLOATS)),
        sliced=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _coder_boxes(n, g, zero_frac=0.25):
    """float64 boxes, some zero-width / zero-height."""
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 800 - 100
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 300 + 0.5
    wh[torch.rand(n, 2, generator=g) < zero_frac] = 0
    return torch.cat([xy, xy + wh], dim=1)


def _coder_codes(n, k, g):
    """float64 codes: mostly ordinary, some huge (beyond the clamp, 1e4, 1e30, inf)."""
    codes = torch.randn(n, 4 * k, generator=g, dtype=torch.float64) * 2
    special = torch.tensor(
        [1e4, -1e4, 1e30, -1e30, math.inf, -math.inf, 50.0, -50.0], dtype=torch.float64
    )
    pick = torch.rand(n, 4 * k, generator=g) < 0.1
    codes[pick] = special[torch.randint(0, len(special), (int(pick.sum()),), generator=g)]
    return codes


@SETTINGS
@given(coder_case())
def test_box_coder_equals_torchvision(case):
    g, dtype, n, k = gen(case["seed"]), case["dtype"], case["n"], case["k"]
    ref_dtype = torch.float32 if dtype in HALF else dtype
    boxes, gt = _coder_boxes(n, g).to(dtype), _coder_boxes(n, g).to(dtype)
    codes = _coder_codes(n, k, g).to(dtype)
    if case["sliced"]:
        boxes, gt, codes = sliced_rows(boxes), sliced_rows(gt), sliced_rows(codes)
    tv = tv_utils.BoxCoder(case["weights"], case["clip"])
    mo = maskops.BoxCoder(case["weights"], case["clip"])
    up = lambda t: t.to(ref_dtype).contiguous()  # noqa: E731

    # decode: torchvision's float32/float64 result, bit for bit; half types round it once.
    expected = tv.decode_single(up(codes), up(boxes)).to(dtype)
    got = mo.decode_single(codes, boxes)
    exactly_equal(got, expected)
    if n:
        exactly_equal(
            mo.decode(codes, [boxes[: n // 2], boxes[n // 2 :]]),
            tv.decode(up(codes), [up(boxes[: n // 2]), up(boxes[n // 2 :])]).to(dtype),
        )
    exactly_equal(
        maskops.decode_boxes(codes, boxes, case["weights"], case["clip"]).flatten(1), expected
    )
    # Huge deltas are clamped: non-finite output only where torchvision's (computing in the
    # dtype itself, half types included) has it, and never from ordinary codes.
    tv_own = tv.decode_single(codes.contiguous(), boxes.contiguous())
    assert torch.isfinite(got[torch.isfinite(tv_own)]).all()
    ordinary = (torch.isfinite(codes) & (codes.abs() < 1e4)).all(1)
    if dtype != torch.float16:  # float16 overflows at 65504 pixels
        assert torch.isfinite(got[ordinary]).all()

    # encode: zero-width boxes give the same inf / NaN as torchvision.
    expected = tv.encode_single(up(gt), up(boxes)).to(dtype)
    exactly_equal(mo.encode_single(gt, boxes), expected)
    exactly_equal(maskops.encode_boxes(gt, boxes, case["weights"]), expected)


@st.composite
def round_trip_case(draw):
    return dict(
        n=draw(st.integers(0, 40)),
        weights=tuple(draw(st.floats(0.1, 20)) for _ in range(4)),
        clip=draw(st.one_of(st.just(DEFAULT_CLIP), st.floats(0.2, 6))),
        dtype=draw(st.sampled_from(FLOATS)),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(round_trip_case())
def test_box_coder_round_trip(case):
    """decode(encode(gt, anchors), anchors) == gt, for targets whose log size ratio is within
    the clamp (zero-width targets included: log 0 = -inf decodes to width 0), within an
    error bound derived from the dtype's unit roundoff; encode against a float64 reference."""
    g, dtype, n, clip = gen(case["seed"]), case["dtype"], case["n"], case["clip"]
    wx, wy, ww, wh = case["weights"]
    # Anchors at least 20 pixels wide: sides that survive rounding to bfloat16.
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 800 - 100
    anchors = torch.cat([xy, xy + torch.rand(n, 2, generator=g, dtype=torch.float64) * 300 + 20], 1)
    anchors = anchors.to(dtype).double()
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    # Size ratios in [exp(-3), exp(0.95 clip)], some exactly 0; centres moved by up to 2 sides.
    lr = torch.rand(n, 2, generator=g, dtype=torch.float64) * (3 + 0.95 * clip) - 3
    size = torch.stack([pw, ph], 1) * lr.exp()
    size[torch.rand(n, 2, generator=g) < 0.2] = 0
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2 + (
        torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5
    ) * 4 * torch.stack([pw, ph], 1)
    gt = torch.cat([ctr - size / 2, ctr + size / 2], 1).to(dtype)
    gt_ = gt.double()
    ex_w, ex_h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    gt_w, gt_h = gt_[:, 2] - gt_[:, 0], gt_[:, 3] - gt_[:, 1]
    ref_codes = torch.stack(
        [
            wx * ((gt_[:, 0] + 0.5 * gt_w) - (anchors[:, 0] + 0.5 * ex_w)) / ex_w,
            wy * ((gt_[:, 1] + 0.5 * gt_h) - (anchors[:, 1] + 0.5 * ex_h)) / ex_h,
            ww * torch.log(gt_w / ex_w),
            wh * torch.log(gt_h / ex_h),
        ],
        1,
    )
    assume(bool((ref_codes[:, 2:] / torch.tensor([ww, wh], dtype=torch.float64) <= clip).all()))

    coder = maskops.BoxCoder(case["weights"], clip)
    codes = coder.encode_single(gt, anchors.to(dtype))
    assert codes.dtype == dtype
    u = {
        torch.float64: 2.0**-53,
        torch.float32: 2.0**-24,
        torch.float16: 2.0**-11,
        torch.bfloat16: 2.0**-8,
    }[dtype]
    scale = 1 + gt_.abs().amax(1) + anchors.abs().amax(1)
    # Centre codes: the cancellation in (centre - centre) relative to the anchor side.
    tol_c = (
        4 * u * (torch.stack([wx * scale / ex_w, wy * scale / ex_h], 1) + ref_codes[:, :2].abs())
    )
    # Size codes: side differences are exact or off by u relative (Sterbenz), then log.
    tol_s = 4 * u * (torch.tensor([ww, wh], dtype=torch.float64) + ref_codes[:, 2:].abs())
    err_c = (codes[:, :2].double() - ref_codes[:, :2]).abs()
    assert (err_c <= tol_c).all(), (err_c - tol_c).max()
    finite = torch.isfinite(ref_codes[:, 2:])
    assert torch.equal(codes[:, 2:].double()[~finite], ref_codes[:, 2:][~finite])  # log 0 = -inf
    err_s = (codes[:, 2:].double() - ref_codes[:, 2:]).abs()
    assert (err_s[finite] <= tol_s[finite]).all()

    back = coder.decode_single(codes, anchors.to(dtype))
    assert back.dtype == dtype and back.shape == gt.shape
    # Errors: the codes' (above, times the anchor side), exp's relative error times the size,
    # and the final rounding of each coordinate.
    side = torch.stack([ex_w, ex_h, ex_w, ex_h], 1)
    tol = (
        8
        * u
        * (
            scale[:, None]
            + side * (1 + ref_codes[:, :2].abs().amax(1, keepdim=True))
            + torch.stack([gt_w, gt_h, gt_w, gt_h], 1) * (1 + lr.abs().amax(1, keepdim=True))
        )
    )
    err = (back.double() - gt_).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max()}"


# ---------------------------------------------------------------------------------------------
# RPN proposals
# ---------------------------------------------------------------------------------------------


@st.composite
def rpn_case(draw):
    batch = draw(st.integers(1, 2))
    return dict(
        batch=batch,
        per_level=draw(st.lists(st.integers(0, 150), min_size=1, max_size=3)),
        image_sizes=[(draw(st.integers(8, 300)), draw(st.integers(8, 300))) for _ in range(batch)],
        pre=draw(st.sampled_from([1, 10, 50, 200, 200, 10**6, 0])),
        post=draw(st.sampled_from([1, 20, 100, 1000, 1000, 0])),
        nms_thresh=draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0])),
        score_thresh=draw(st.sampled_from([0.0, 0.0, 0.3, 0.6])),
        min_size=draw(st.sampled_from([1e-3, 1.0, 10.0])),
        anchors_kind=draw(st.sampled_from(["shared", "per_image", "list"])),
        dtype=draw(st.sampled_from(FLOATS)),
        sliced=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@FEW
@given(rpn_case())
def test_rpn_proposals_equal_torchvision(case):
    g, b, dtype = gen(case["seed"]), case["batch"], case["dtype"]
    a = sum(case["per_level"])
    hmax = max(s[0] for s in case["image_sizes"])
    wmax = max(s[1] for s in case["image_sizes"])
    # Anchors over (and past) the padded image, some zero-area; one set per image.
    anchors = []
    for _ in range(b):
        xy = (
            torch.rand(a, 2, generator=g, dtype=torch.float64)
            * torch.tensor([wmax + 40.0, hmax + 40.0])
            - 20
        )
        wh = torch.rand(a, 2, generator=g, dtype=torch.float64) * 120
        wh[torch.rand(a, 2, generator=g) < 0.05] = 0
        anchors.append(torch.cat([xy, xy + wh], 1).to(dtype))
    if case["anchors_kind"] == "shared":
        anchors = [anchors[0]] * b
    # Distinct logits (a permutation over [-3, 3]), deltas mostly small, a few huge.
    n = b * a
    objectness = (
        (torch.randperm(n, generator=g).double() / max(n, 1) * 6 - 3).to(dtype).reshape(b, a)
    )
    deltas = torch.randn(b, a, 4, generator=g, dtype=torch.float64) * 0.5
    deltas[torch.rand(b, a, 4, generator=g) < 0.02] = 30.0
    deltas = deltas.to(dtype)
    if case["sliced"]:
        objectness = sliced_rows(objectness)
        deltas = torch.zeros(b, a, 8, dtype=dtype).index_copy_(2, torch.arange(0, 8, 2), deltas)[
            ..., ::2
        ]

    args = (
        case["image_sizes"],
        case["pre"],
        case["post"],
        case["nms_thresh"],
        case["score_thresh"],
        case["min_size"],
        case["per_level"],
    )
    if case["anchors_kind"] == "per_image":
        mo_anchors = torch.stack(anchors)
    elif case["anchors_kind"] == "shared":
        mo_anchors = anchors[0]
    else:
        mo_anchors = anchors
    boxes, scores = maskops.rpn_proposals(objectness, deltas, mo_anchors, *args)
    assert len(boxes) == len(scores) == b
    for bx, sc in zip(boxes, scores):
        assert bx.dtype == dtype and sc.dtype == dtype and bx.shape == (sc.shape[0], 4)
        assert sc.shape[0] <= case["post"]
        if a == 0:  # (torchvision cannot view 0 decoded boxes as [B, -1, 4])
            assert sc.shape[0] == 0

    # torchvision on the float32 (float64) values; half types compute in float32, rounded once.
    ref_dtype = torch.float32 if dtype in HALF else dtype
    ref_obj = objectness.to(ref_dtype).reshape(-1, 1)
    if a == 0:
        return
    assume(ref_obj.unique().numel() == ref_obj.numel())  # bfloat16 can round logits together
    rpn = make_rpn(case["pre"], case["post"], case["nms_thresh"], case["score_thresh"])
    images = ImageList(torch.zeros(b, 1, hmax, wmax), case["image_sizes"])
    eb, es = torchvision_proposals(
        rpn,
        images,
        [x.to(ref_dtype) for x in anchors],
        case["per_level"],
        ref_obj,
        deltas.to(ref_dtype).reshape(-1, 4),
        min_size=case["min_size"],
    )
    for gb, gs, rb, rs in zip(boxes, scores, eb, es):
        exactly_equal(gb, rb.to(dtype))
        exactly_equal(gs, rs.to(dtype))


# ---------------------------------------------------------------------------------------------
# batched NMS
# ---------------------------------------------------------------------------------------------


@st.composite
def batched_nms_case(draw):
    n = draw(st.one_of(st.integers(0, 60), st.integers(60, 300), st.integers(900, 999)))
    return dict(
        n=n,
        classes=draw(st.sampled_from(["single", "distinct", "few", "many"])),
        idx_dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.int16])),
        dtype=draw(st.sampled_from(FLOATS)),
        score_dtype=draw(st.sampled_from(FLOATS)),
        thresh=draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0])),
        inverted=draw(st.booleans()),
        sliced=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(batched_nms_case())
def test_batched_nms_equals_torchvision(case):
    g, n = gen(case["seed"]), case["n"]
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40
    wh[torch.rand(n, 2, generator=g) < 0.05] = 0  # zero-area boxes
    if case["inverted"]:
        wh[torch.rand(n, 2, generator=g) < 0.1] *= -1
    boxes = torch.cat([xy, xy + wh], 1).to(case["dtype"])
    if case["classes"] == "single":
        idxs = torch.full((n,), 3)
    elif case["classes"] == "distinct":
        idxs = torch.randperm(n, generator=g) * 7 - 300
    elif case["classes"] == "few":
        idxs = torch.randint(-2, 3, (n,), generator=g)
    else:
        idxs = torch.randint(0, max(n // 3, 1), (n,), generator=g)
    idxs = idxs.to(case["idx_dtype"])
    # Distinct scores that stay distinct in their dtype (bfloat16: at most 256 integers).
    score_dtype = case["score_dtype"]
    if score_dtype == torch.bfloat16 and n > 256:
        score_dtype = torch.float32
    scores = (torch.randperm(n, generator=g).double() + 1).to(score_dtype)
    assert scores.unique().numel() == n
    if case["sliced"]:
        boxes, idxs = sliced_rows(boxes), sliced_rows(idxs[:, None])[:, 0]
        scores = sliced_rows(scores[:, None])[:, 0]
    # torchvision's CPU nms has no half kernel (and wants the boxes' dtype for the scores):
    # maskops' result is torchvision's on the exactly converted values.
    ref_boxes = boxes.float() if boxes.dtype in HALF else boxes
    ref_scores = scores.to(ref_boxes.dtype)  # integers up to 999: exact
    got = maskops.batched_nms(boxes, scores, idxs, case["thresh"])
    exact = tv_boxes._batched_nms_vanilla(ref_boxes, ref_scores, idxs, case["thresh"])
    assert torch.equal(got, exact)
    assert torch.equal(
        got, torchvision.ops.batched_nms(ref_boxes, ref_scores, idxs, case["thresh"])
    )


# ---------------------------------------------------------------------------------------------
# COCO RLE
# ---------------------------------------------------------------------------------------------


@st.composite
def rle_case(draw):
    side = st.one_of(st.just(1), st.just(0), st.integers(1, 40))
    return dict(
        n=draw(st.sampled_from([0, 1, 2, 3])),
        h=draw(side),
        w=draw(side),
        fill=draw(st.sampled_from(["zeros", "ones", "random", "sparse", "dense", "blocks"])),
        dtype=draw(st.sampled_from([torch.bool, torch.uint8])),
        layout=draw(st.sampled_from(["contiguous", "sliced", "transposed", "4d"])),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(rle_case())
def test_masks_to_rle_equals_pycocotools(case):
    coco = pytest.importorskip("pycocotools.mask")
    g, n, h, w = gen(case["seed"]), case["n"], case["h"], case["w"]
    fill = case["fill"]
    if fill == "zeros":
        binary = torch.zeros(n, h, w, dtype=torch.bool)
    elif fill == "ones":
        binary = torch.ones(n, h, w, dtype=torch.bool)
    elif fill == "blocks":  # long runs, crossing columns
        binary = torch.zeros(n, h, w, dtype=torch.bool)
        for i in range(n):
            if h and w:
                y0 = torch.randint(0, h, (2,), generator=g).tolist()
                x0 = torch.randint(0, w, (2,), generator=g).tolist()
                binary[i, min(y0) : max(y0) + 1, min(x0) : max(x0) + 1] = True
    else:
        p = {"random": 0.5, "sparse": 0.05, "dense": 0.95}[fill]
        binary = torch.rand(n, h, w, generator=g) < p
    masks = binary
    if case["dtype"] == torch.uint8:  # any nonzero value is in the mask
        masks = binary.to(torch.uint8) * torch.randint(
            1, 256, (n, h, w), generator=g, dtype=torch.uint8
        )
    if case["layout"] == "sliced":
        wide = torch.zeros(n, h, 2 * w, dtype=masks.dtype)
        wide[..., ::2] = masks
        masks = wide[..., ::2]
    elif case["layout"] == "transposed":  # column-major, as pycocotools stores masks
        masks = masks.transpose(1, 2).contiguous().transpose(1, 2)
    elif case["layout"] == "4d":
        masks = masks[:, None]

    ours = maskops.masks_to_rle(masks)
    theirs = coco.encode(np.asfortranarray(binary.numpy().transpose(1, 2, 0).astype(np.uint8)))
    assert len(ours) == len(theirs) == n
    for a, b in zip(ours, theirs):
        assert a["size"] == list(b["size"]) == [h, w]
        assert a["counts"] == b["counts"]
    if n and h and w:
        decoded = coco.decode(ours)  # [H, W, N]
        assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), binary.numpy())
