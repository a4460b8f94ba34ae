"""maskops.nms / batched_nms / box_iou / box_area against torchvision and float64 references.

Kept indices must be identical to torchvision's (order included), not merely similar. Half
precision boxes are compared with torchvision on the float32-converted boxes: maskops reads
half boxes in float32 exactly, and torchvision's CPU nms has no half kernel.
"""

import math

import pytest
import torch
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import boxes as tv_boxes
from torchvision.ops import nms as tv_nms

import maskops
from maskops.check import inputs
from maskops.check.references import ref_iou
from maskops.testing import ops as testing_ops

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ---- inputs ----


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_boxes(n, g, scale=800.0, max_wh=100.0, dtype=torch.float32):
    """Tensor[n, 4] (x1, y1, x2, y2): corners uniform in [0, scale), sides in [1, max_wh + 1)."""
    return inputs.random_boxes(g, n, scale, 1.0, max_wh + 1, margin=0).to(dtype)


def heavy_overlap_boxes(n, g, dtype=torch.float32):
    return random_boxes(n, g, scale=50.0, max_wh=100.0, dtype=dtype)


def grid_boxes(n, g, size=8):
    """Small integer boxes: many exactly equal IoUs (1/2, 1/3, ...) and duplicates."""
    x1 = torch.randint(0, size, (n, 2), generator=g)
    wh = torch.randint(0, 4, (n, 2), generator=g)  # includes zero-area boxes
    return torch.cat([x1, x1 + wh], dim=1).float()


def distinct_scores(n, g):
    return torch.randperm(n, generator=g).float() / max(n, 1)


def tied_scores(n, g, levels=4):
    return torch.randint(0, levels, (n,), generator=g).float()


# ---- references ----


def reference_nms(boxes, scores, thr):
    """torchvision nms; half inputs go in as float32 (see the module docstring)."""
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    if scores.dtype != boxes.dtype:
        scores = scores.to(boxes.dtype)
    return tv_nms(boxes, scores, thr)


def reference_batched(boxes, scores, idxs, thr):
    """Per-class torchvision nms, merged by decreasing score with ties by index."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for c in torch.unique(idxs):
        where = torch.where(idxs == c)[0]
        keep[where[reference_nms(boxes[where], scores[where], thr)]] = True
    kept = torch.where(keep)[0]
    return kept[torch.sort(scores[kept], descending=True, stable=True)[1]]


def filtered(keep, scores, score_threshold, max_output):
    if score_threshold is not None:
        keep = keep[scores[keep].double() > score_threshold]
    if max_output is not None:
        keep = keep[:max_output]
    return keep


def assert_same(actual, expected):
    assert actual.dtype == torch.int64
    assert torch.equal(actual, expected), (
        f"{len(actual)} kept vs {len(expected)}; first difference at "
        f"{(actual[: len(expected)] != expected[: len(actual)]).nonzero()[:1].flatten().tolist()}"
    )


def all_nms(boxes, scores, thr, **kw):
    """maskops.nms and the GPU algorithm on the CPU (the test-only op)."""
    return (
        maskops.nms(boxes, scores, thr, **kw),
        testing_ops._nms_bitmask(
            boxes, scores, None, thr, kw.get("score_threshold"), kw.get("max_output")
        ),
    )


# ---- nms against torchvision ----


@pytest.mark.parametrize("n", [0, 1, 2, 1000])
@pytest.mark.parametrize("thr", [0.0, 0.5, 1.0])
def test_nms_random(n, thr):
    g = gen(n * 10 + int(thr * 10))
    boxes, scores = random_boxes(n, g), torch.rand(n, generator=g)
    expected = reference_nms(boxes, scores, thr)
    for got in all_nms(boxes, scores, thr):
        assert_same(got, expected)


@pytest.mark.parametrize("n,thr", [(20000, 0.5), (20000, 0.7), (5000, 1.0)])
def test_nms_large(n, thr):
    g = gen(n + int(thr * 10))
    boxes, scores = random_boxes(n, g), torch.rand(n, generator=g)  # rand ties happen at 20k
    assert_same(maskops.nms(boxes, scores, thr), reference_nms(boxes, scores, thr))


@pytest.mark.parametrize("n", [1000, 5000])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.9])
def test_nms_heavy_overlap(n, thr):
    g = gen(n + int(thr * 100))
    boxes, scores = heavy_overlap_boxes(n, g), torch.rand(n, generator=g)
    expected = reference_nms(boxes, scores, thr)
    got, bitmask = all_nms(boxes, scores, thr)
    assert_same(got, expected)
    if n <= 1000:
        assert_same(bitmask, expected)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.0, 0.1, 0.25, 1 / 3, 0.5, 2 / 3, 1.0])
def test_nms_exact_ties_and_exact_ious(seed, thr):
    # Integer boxes on a small grid: duplicates, zero-area boxes, IoUs exactly at the
    # threshold (and 1/3, not representable in float, a hair above it); few score levels.
    g = gen(seed)
    n = 300
    boxes, scores = grid_boxes(n, g), tied_scores(n, g)
    expected = reference_nms(boxes, scores, thr)
    for got in all_nms(boxes, scores, thr):
        assert_same(got, expected)


def test_nms_duplicates_and_zero_area():
    g = gen(7)
    b = random_boxes(200, g)
    b[::5, 2] = b[::5, 0]  # zero width
    b[1::7, 3] = b[1::7, 1]  # zero height
    boxes = torch.cat([b, b, b])
    for scores in (torch.ones(600), torch.rand(600, generator=g), tied_scores(600, g, 3)):
        for thr in (0.0, 0.5, 1.0):
            expected = reference_nms(boxes, scores, thr)
            for got in all_nms(boxes, scores, thr):
                assert_same(got, expected)


def test_nms_nan_scores_and_odd_boxes():
    # NaN scores sort first (torch.sort), inverted and NaN boxes take torchvision's arithmetic.
    g = gen(11)
    n = 500
    boxes = random_boxes(n, g, scale=100.0)
    boxes[::9] = boxes[::9][:, [2, 3, 0, 1]]  # x2 < x1, y2 < y1
    boxes[3::31, 1] = float("nan")
    scores = torch.rand(n, generator=g)
    scores[::13] = float("nan")
    scores[1::17] = float("inf")
    scores[2::19] = -float("inf")
    for thr in (0.0, 0.5):
        expected = reference_nms(boxes, scores, thr)
        for got in all_nms(boxes, scores, thr):
            assert_same(got, expected)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float16])
def test_nms_dtypes(dtype, score_dtype):
    g = gen(3)
    boxes = random_boxes(2000, g, scale=400.0, dtype=dtype)
    scores = torch.rand(2000, generator=g).to(score_dtype)
    for thr in (0.3, 0.5):
        expected = reference_nms(
            boxes, scores.to(torch.float64 if dtype == torch.float64 else torch.float32), thr
        )
        for got in all_nms(boxes, scores, thr):
            assert_same(got, expected)


def test_nms_non_contiguous():
    g = gen(5)
    full = random_boxes(1000, g).t().contiguous().t()  # column-major [N, 4]
    scores = torch.rand(2000, generator=g)[::2]
    assert not full.is_contiguous() and not scores.is_contiguous()
    assert_same(
        maskops.nms(full, scores, 0.5), reference_nms(full.contiguous(), scores.contiguous(), 0.5)
    )


def test_nms_independent_of_thread_count():
    # Large enough for the parallel pass over candidates.
    g = gen(9)
    boxes, scores = random_boxes(60000, g, scale=2000.0), torch.rand(60000, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = maskops.nms(boxes, scores, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert_same(maskops.nms(boxes, scores, 0.5), one)


# ---- batched_nms ----


@pytest.mark.parametrize("n", [0, 1, 2, 1000, 5000])
def test_batched_matches_torchvision(n):
    # Distinct scores: torchvision's result then has no tie-order freedom. Up to 1000 boxes
    # torchvision offsets coordinates by class; with coordinates on a 1/16 grid the offsets
    # are exact, so its decisions are the exact per-class ones.
    g = gen(n)
    boxes = random_boxes(n, g)
    if n <= 1000:
        boxes = (boxes * 16).round() / 16
    scores, idxs = distinct_scores(n, g), torch.randint(0, 80, (n,), generator=g)
    for thr in (0.0, 0.5, 1.0):
        expected = tv_batched_nms(boxes, scores, idxs, thr)
        assert_same(maskops.batched_nms(boxes, scores, idxs, thr), expected)
        assert_same(testing_ops._nms_bitmask(boxes, scores, idxs, thr), expected)


@pytest.mark.parametrize("seed", range(3))
def test_batched_ties_heavy_overlap(seed):
    g = gen(100 + seed)
    n = 3000
    boxes, scores = heavy_overlap_boxes(n, g), tied_scores(n, g, 5)
    idxs = torch.randint(0, 7, (n,), generator=g)
    for thr in (0.3, 0.5):
        expected = reference_batched(boxes, scores, idxs, thr)
        assert_same(maskops.batched_nms(boxes, scores, idxs, thr), expected)
        assert_same(testing_ops._nms_bitmask(boxes, scores, idxs, thr), expected)
        # torchvision (vanilla path here) orders equal scores of different classes by an
        # unstable sort: same kept set, same score sequence.
        tv = tv_batched_nms(boxes, scores, idxs, thr)
        assert sorted(tv.tolist()) == sorted(expected.tolist())
        assert torch.equal(scores[tv], scores[expected])


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32, torch.uint8])
def test_batched_class_id_values(idx_dtype):
    g = gen(21)
    n = 2500
    boxes, scores = random_boxes(n, g, scale=300.0), distinct_scores(n, g)
    small = torch.randint(0, 9, (n,), generator=g)
    ids = {
        torch.uint8: small,
        torch.int32: small * 100_003 - 50,
        torch.int64: small * 1_000_000_007 - 5_000_000_000,
    }[idx_dtype].to(idx_dtype)
    expected = reference_batched(boxes, scores, small, 0.5)
    assert_same(maskops.batched_nms(boxes, scores, ids, 0.5), expected)
    assert_same(testing_ops._nms_bitmask(boxes, scores, ids, 0.5), expected)


def test_batched_big_and_small_classes():
    # One class large enough for the parallel inner loop, many small ones in parallel.
    g = gen(31)
    n = 9000
    boxes, scores = random_boxes(n, g, scale=600.0), distinct_scores(n, g)
    idxs = torch.where(
        torch.rand(n, generator=g) < 0.6,
        torch.zeros(n, dtype=torch.int64),
        torch.randint(1, 200, (n,), generator=g),
    )
    for kw in ({}, {"max_output": 50}, {"score_threshold": 0.5}):
        expected = filtered(
            tv_batched_nms(boxes, scores, idxs, 0.5),
            scores,
            kw.get("score_threshold"),
            kw.get("max_output"),
        )
        assert_same(maskops.batched_nms(boxes, scores, idxs, 0.5, **kw), expected)


# ---- score_threshold and max_output ----


@pytest.mark.parametrize("score_threshold", [None, -math.inf, 0.0, 0.3, 0.9, 2.0])
@pytest.mark.parametrize("max_output", [None, 0, 1, 10, 10**6])
def test_score_threshold_and_max_output(score_threshold, max_output):
    g = gen(41)
    n = 1500
    boxes, scores = heavy_overlap_boxes(n, g, dtype=torch.float64), torch.rand(n, generator=g)
    scores[::23] = float("nan")  # NaN boxes suppress but are filtered out
    kw = dict(score_threshold=score_threshold, max_output=max_output)
    plain = reference_nms(boxes, scores.double(), 0.5)
    expected = filtered(plain, scores, score_threshold, max_output)
    for got in all_nms(boxes, scores, 0.5, **kw):
        assert_same(got, expected)
    idxs = torch.randint(0, 5, (n,), generator=g)
    expected = filtered(
        reference_batched(boxes, scores.double(), idxs, 0.5), scores, score_threshold, max_output
    )
    assert_same(maskops.batched_nms(boxes, scores, idxs, 0.5, **kw), expected)
    assert_same(
        testing_ops._nms_bitmask(boxes, scores, idxs, 0.5, score_threshold, max_output), expected
    )


def test_score_threshold_is_exact_for_half_scores():
    # 0.3 is not a float16 value; the comparison is exact, not against float16(0.3).
    boxes = torch.tensor([[0.0, 0, 1, 1], [5, 5, 6, 6]])
    scores = torch.tensor([0.3, 0.2998], dtype=torch.float16)
    above = float(scores[0]) > 0.3
    assert maskops.nms(boxes, scores, 0.5, score_threshold=0.3).tolist() == ([0] if above else [])


# ---- box_iou / box_area ----


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (1, 1), (37, 53), (300, 200)])
def test_box_iou(dtype, shape):
    g = gen(shape[0] * 1000 + shape[1])
    a = random_boxes(shape[0], g, scale=100.0, max_wh=40.0)
    b = random_boxes(shape[1], g, scale=100.0, max_wh=40.0)
    a[::4, 2] = a[::4, 0]  # zero-area boxes
    b[::3] = b[::3, :2].repeat(1, 2)  # points
    if shape[1] > 2:
        a[1::5] = b[0]  # zero-area against zero-area: union 0
    a, b = a.to(dtype), b.to(dtype)
    got = maskops.box_iou(a, b)
    assert got.dtype == dtype and got.shape == shape
    assert not got.isnan().any()
    atol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}[
        dtype
    ]
    torch.testing.assert_close(got.double(), ref_iou(a, b), atol=atol, rtol=0)


def test_box_iou_matches_torchvision_away_from_zero_area():
    g = gen(2)
    a, b = random_boxes(100, g, scale=100.0), random_boxes(80, g, scale=100.0)
    torch.testing.assert_close(maskops.box_iou(a, b), tv_boxes.box_iou(a, b))
    z = torch.zeros(1, 4)
    assert tv_boxes.box_iou(z, z).isnan().all() and maskops.box_iou(z, z).item() == 0.0


def test_box_iou_promotes_and_propagates_nan():
    a = torch.tensor([[0.0, 0, 2, 2], [0, float("nan"), 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3]], dtype=torch.float64)
    got = maskops.box_iou(a, b)
    assert got.dtype == torch.float64
    assert got[0, 0].item() == pytest.approx(1 / 7) and got[1, 0].isnan()


@pytest.mark.parametrize("dtype", FLOATS)
def test_box_area(dtype):
    g = gen(4)
    boxes = random_boxes(500, g, scale=200.0)
    boxes[::6, 3] = boxes[::6, 1]
    boxes = boxes.to(dtype)
    got = maskops.box_area(boxes)
    b = boxes.double()
    expected = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    assert got.dtype == dtype and got.shape == (500,)
    # Half types compute in float32 and round once at the end.
    torch.testing.assert_close(
        got.double(),
        expected,
        atol=0,
        rtol={torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(dtype, 3e-7),
    )
    if dtype in (torch.float32, torch.float64):  # the same operations as torchvision
        assert torch.equal(got, tv_boxes.box_area(boxes))
    assert maskops.box_area(torch.zeros(0, 4, dtype=dtype)).shape == (0,)


def test_box_ops_gradients():
    g = gen(13)
    a = random_boxes(9, g, scale=30.0, max_wh=20.0, dtype=torch.float64).requires_grad_()
    b = random_boxes(6, g, scale=30.0, max_wh=20.0, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(maskops.box_iou, (a, b))
    assert torch.autograd.gradcheck(maskops.box_area, (a,))
    go = torch.rand(9, 6, generator=g, dtype=torch.float64)
    for got, expected in zip(
        torch.autograd.grad(maskops.box_iou(a, b), (a, b), go),
        torch.autograd.grad(ref_iou(a, b), (a, b), go),
    ):
        torch.testing.assert_close(got, expected)
    # Ties (identical boxes), touching boxes, zero-area pairs: torch's conventions, no NaN.
    a = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 5, 5]], requires_grad=True)
    b = torch.tensor([[0.0, 0, 2, 2], [2, 0, 4, 2], [5, 5, 5, 5]], requires_grad=True)
    ga, gb = torch.autograd.grad(maskops.box_iou(a, b).sum(), (a, b))
    ra, rb = torch.autograd.grad(tv_boxes.box_iou(a[:2], b[:2]).sum(), (a, b))
    torch.testing.assert_close(ga[:2], ra[:2])
    torch.testing.assert_close(gb[:2], rb[:2])
    assert not ga.isnan().any() and (ga[2] == 0).all() and (gb[2] == 0).all()
    half = a.detach().half().requires_grad_()
    assert maskops.box_area(half).sum().backward() is None and half.grad.dtype == torch.float16


# ---- the GPU gather's removed bits in global memory ----
# The walk keeps its removed bits (one per sorted box) in shared memory up to 5,632 words and in
# a global buffer beyond; the test-only ops take a smaller limit (removed_shared_words) so that
# the global-memory layout runs here at small sizes.

SHARED_LIMIT = 5632  # nms.h's kSharedRemovedWords


def in_global_memory(n, limit):
    return (n + 63) // 64 > limit


def nms_inputs(kind, n, g):
    if kind == "random":
        return random_boxes(n, g), distinct_scores(n, g)
    if kind == "overlap_ties":
        return heavy_overlap_boxes(n, g), tied_scores(n, g)
    if kind == "exact_ious":
        return grid_boxes(n, g), tied_scores(n, g, levels=3)
    if kind == "all_suppressed":  # one box repeated: only the best-scored copy is kept
        return torch.tensor([[10.0, 20.0, 50.0, 60.0]]).repeat(n, 1), torch.rand(n, generator=g)
    raise ValueError(kind)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 130, 1000])
@pytest.mark.parametrize("kind", ["random", "overlap_ties", "exact_ious", "all_suppressed"])
def test_bitmask_removed_bits_in_global_memory(n, kind):
    """_nms_bitmask with its walk's removed bits in global memory (limits 0 and 1) and in shared
    memory (limit 3 below 193 boxes, the real limit): the same kept indices as torchvision,
    for plain and batched NMS, with a score threshold and max_output too."""
    g = gen(7000 + n)
    boxes, scores = nms_inputs(kind, n, g)
    idxs = torch.randint(0, 3, (n,), generator=g)
    thr = 0.5
    plain, batched = reference_nms(boxes, scores, thr), reference_batched(boxes, scores, idxs, thr)
    if kind == "all_suppressed" and n > 0:
        assert len(plain) == 1
    paths = set()
    for limit in (0, 1, 3, None):
        paths.add(in_global_memory(n, SHARED_LIMIT if limit is None else limit))
        op = testing_ops._nms_bitmask
        assert_same(op(boxes, scores, None, thr, None, None, limit), plain)
        assert_same(op(boxes, scores, idxs, thr, None, None, limit), batched)
        assert_same(op(boxes, scores, idxs, thr, 0.3, 7, limit), filtered(batched, scores, 0.3, 7))
        assert_same(op(boxes, scores, None, thr, None, 1, limit), plain[:1])
    assert paths == ({True, False} if n > 0 else {False})  # both layouts ran


def segmented_case(g, segments, seg_len, kind, classes=3):
    """S segments laid end to end, each sorted by decreasing score; valid counts include 0 and
    seg_len; order maps rows to distinct output values."""
    rows = segments * seg_len
    boxes, scores = nms_inputs(kind, rows, g)
    scores = scores.view(segments, seg_len)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True)
    perm = (by_score.indices + torch.arange(segments)[:, None] * seg_len).reshape(-1)
    boxes, scores = boxes[perm], by_score.values.reshape(-1)
    cls = torch.randint(0, classes, (rows,), generator=g)
    valid = torch.randint(0, seg_len + 1, (segments,), generator=g)
    valid[0] = seg_len
    if segments > 1:
        valid[1] = 0
    order = torch.randperm(10 * max(rows, 1), generator=g)[:rows]
    return boxes, scores, cls, order, valid


def reference_segments(boxes, scores, cls, order, valid, seg_len, thr, max_output):
    """Per segment: torchvision NMS (per class) over its valid rows, as order values."""
    out = []
    for s, v in enumerate(valid.tolist()):
        rows = slice(s * seg_len, s * seg_len + v)
        b, sc = boxes[rows], scores[rows]
        keep = (
            reference_batched(b, sc, cls[rows], thr)
            if cls is not None
            else reference_nms(b, sc, thr)
        )
        if max_output >= 0:
            keep = keep[:max_output]
        out.append(order[rows][keep])
    return out


@pytest.mark.parametrize("segments,seg_len", [(1, 1), (3, 64), (4, 100), (5, 130), (2, 0)])
@pytest.mark.parametrize("kind", ["random", "overlap_ties", "exact_ious", "all_suppressed"])
def test_segmented_nms_removed_bits_in_global_memory(segments, seg_len, kind):
    """The RPN's segmented NMS (the CUDA algorithm, one walk per segment) with the removed bits
    of every segment in one global buffer (limits 0, 1) or in shared memory: per segment the
    same kept indices as torchvision, with and without classes and max_output."""
    g = gen(9000 + segments * 1000 + seg_len)
    boxes, scores, cls, order, valid = segmented_case(g, segments, seg_len, kind)
    for classes in (None, cls):
        for max_output in (-1, 0, 5):
            expected = reference_segments(
                boxes, scores, classes, order, valid, seg_len, 0.5, max_output
            )
            for limit in (0, 1, None):
                index, count = testing_ops._segmented_nms(
                    boxes, classes, order, valid, seg_len, 0.5, max_output, limit
                )
                assert index.shape == (segments * seg_len,) and count.shape == (segments,)
                for s in range(segments):
                    got = index[s * seg_len : (s + 1) * seg_len]
                    assert_same(got[: count[s]], expected[s])
                    assert (got[count[s] :] == -1).all()


def test_removed_shared_words_is_checked():
    for bad in (-1, SHARED_LIMIT + 1):
        with pytest.raises(RuntimeError, match="removed_shared_words"):
            testing_ops._nms_bitmask(B, S, None, 0.5, None, None, bad)
        with pytest.raises(RuntimeError, match="removed_shared_words"):
            testing_ops._segmented_nms(
                B, None, torch.arange(10), torch.tensor([10]), 10, 0.5, -1, bad
            )


def test_bitmask_and_segmented_opcheck():
    g = gen(21)
    boxes, scores = random_boxes(150, g, scale=200.0), torch.rand(150, generator=g)
    torch.library.opcheck(
        testing_ops._nms_bitmask.default, (boxes, scores, None, 0.5, None, None, 0)
    )
    b, _, cls, order, valid = segmented_case(g, 3, 50, "overlap_ties")
    torch.library.opcheck(
        testing_ops._segmented_nms.default, (b, cls, order, valid, 50, 0.5, -1, 0)
    )


# ---- registration: opcheck, torch.compile ----


def _opcheck_samples():
    g = gen(8)
    boxes, scores = random_boxes(300, g, scale=200.0), torch.rand(300, generator=g)
    idxs = torch.randint(0, 4, (300,), generator=g)
    half = boxes.half()
    return [
        (torch.ops.maskops.nms.default, (boxes, scores, 0.5), {}),
        (
            torch.ops.maskops.nms.default,
            (half, scores, 0.5),
            {"score_threshold": 0.2, "max_output": 40},
        ),
        (torch.ops.maskops.nms.default, (boxes[:0], scores[:0], 0.5), {}),
        (torch.ops.maskops.batched_nms.default, (boxes, scores, idxs, 0.5), {}),
        (
            torch.ops.maskops.batched_nms.default,
            (boxes.double(), scores, idxs, 0.3),
            {"max_output": 7},
        ),
        (testing_ops._nms_bitmask.default, (boxes, scores, idxs, 0.5), {}),
        (testing_ops._nms_bitmask.default, (boxes, scores, None, 0.5, 0.1, 30), {}),
        (torch.ops.maskops.box_iou.default, (boxes[:20], boxes[5:50]), {}),
        (torch.ops.maskops.box_iou.default, (half[:3], half[:0]), {}),
        (torch.ops.maskops.box_area.default, (boxes.bfloat16(),), {}),
        (
            torch.ops.maskops.box_iou.default,
            (boxes[:20].double().requires_grad_(), boxes[5:50].double().requires_grad_()),
            {},
        ),
        (torch.ops.maskops.box_area.default, (boxes.double().requires_grad_(),), {}),
    ]


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    op, args, kwargs = _opcheck_samples()[case]
    torch.library.opcheck(op, args, kwargs)


def test_torch_compile_fullgraph():
    # Custom ops with a data-dependent output size need no dynamo config: the fake kernel's
    # new_dynamic_size() gives dynamo an unbacked size to trace with.
    torch._dynamo.reset()

    def post(boxes, scores, labels):
        keep = maskops.batched_nms(boxes, scores, labels, 0.5, score_threshold=0.05, max_output=100)
        kept = boxes[keep]
        return keep, kept, maskops.box_iou(kept, boxes[:10]), maskops.box_area(kept)

    compiled = torch.compile(post, fullgraph=True)
    g = gen(12)
    for n in (400, 900):  # a second size exercises the dynamic-shape graph
        boxes, scores = random_boxes(n, g), torch.rand(n, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        for got, expected in zip(compiled(boxes, scores, labels), post(boxes, scores, labels)):
            assert torch.equal(got, expected)


# ---- bad inputs ----

B = torch.rand(10, 4)
S = torch.rand(10)
I = torch.zeros(10, dtype=torch.int64)
BAD = [
    (lambda: maskops.nms([[0, 0, 1, 1]], S, 0.5), TypeError, "boxes"),
    (lambda: maskops.nms(B.long(), S, 0.5), TypeError, "boxes"),
    (lambda: maskops.nms(B[:, :3], S, 0.5), ValueError, "boxes"),
    (lambda: maskops.nms(B[None], S, 0.5), ValueError, "boxes"),
    (lambda: maskops.nms(B, S[:9], 0.5), ValueError, "scores"),
    (lambda: maskops.nms(B, S[:, None], 0.5), ValueError, "scores"),
    (lambda: maskops.nms(B, S.long(), 0.5), TypeError, "scores"),
    (lambda: maskops.nms(B, S.tolist(), 0.5), TypeError, "scores"),
    (lambda: maskops.nms(B, S, "0.5"), TypeError, "iou_threshold"),
    (lambda: maskops.nms(B, S, None), TypeError, "iou_threshold"),
    (lambda: maskops.nms(B, S, True), TypeError, "iou_threshold"),
    (lambda: maskops.nms(B, S, float("nan")), ValueError, "iou_threshold"),
    (lambda: maskops.nms(B, S, 0.5, score_threshold="x"), TypeError, "score_threshold"),
    (lambda: maskops.nms(B, S, 0.5, score_threshold=math.nan), ValueError, "score_threshold"),
    (lambda: maskops.nms(B, S, 0.5, max_output=-1), ValueError, "max_output"),
    (lambda: maskops.nms(B, S, 0.5, max_output=2.0), TypeError, "max_output"),
    (lambda: maskops.nms(B, S.to("meta"), 0.5), ValueError, "scores"),
    (lambda: maskops.batched_nms(B, S, I.float(), 0.5), TypeError, "idxs"),
    (lambda: maskops.batched_nms(B, S, I.bool(), 0.5), TypeError, "idxs"),
    (lambda: maskops.batched_nms(B, S, I[:5], 0.5), ValueError, "idxs"),
    (lambda: maskops.batched_nms(B, S, I[None], 0.5), ValueError, "idxs"),
    (lambda: maskops.batched_nms(B, S, I.tolist(), 0.5), TypeError, "idxs"),
    (lambda: maskops.batched_nms(B, S, I.to("meta"), 0.5), ValueError, "idxs"),
    (lambda: maskops.batched_nms(B, S, I, [0.5]), TypeError, "iou_threshold"),
    (lambda: maskops.box_iou(B, B[:, :2]), ValueError, "boxes2"),
    (lambda: maskops.box_iou(B.bool(), B), TypeError, "boxes1"),
    (lambda: maskops.box_iou(B, B.to("meta")), ValueError, "boxes2"),
    (lambda: maskops.box_area(B[:, 0]), ValueError, "boxes"),
    (lambda: maskops.box_area(None), TypeError, "boxes"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case):
    fn, err, name = BAD[case]
    with pytest.raises(err, match=name):
        fn()


BAD_DIRECT = [  # the C++ checks, for callers of torch.ops.maskops directly
    (lambda: torch.ops.maskops.nms(B[:, :3], S, 0.5), "boxes"),
    (lambda: torch.ops.maskops.nms(B.long(), S, 0.5), "boxes"),
    (lambda: torch.ops.maskops.nms(B, S[:4], 0.5), "scores"),
    (lambda: torch.ops.maskops.nms(B, S, math.nan), "iou_threshold"),
    (lambda: torch.ops.maskops.nms(B, S, 0.5, None, -2), "max_output"),
    (lambda: torch.ops.maskops.batched_nms(B, S, I.float(), 0.5), "idxs"),
    (lambda: torch.ops.maskops.batched_nms(B, S, I[:3], 0.5), "idxs"),
    (lambda: testing_ops._nms_bitmask(B, S, I[:3], 0.5), "idxs"),
    (lambda: torch.ops.maskops.box_iou(B, B.double()), "dtype"),
    (lambda: torch.ops.maskops.box_area(B[:, :2]), "boxes"),
]


@pytest.mark.parametrize("case", range(len(BAD_DIRECT)))
def test_bad_input_direct(case):
    fn, name = BAD_DIRECT[case]
    with pytest.raises(RuntimeError, match=name):
        fn()


# ---- CUDA: identical to the CPU ----


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("n", [0, 1, 2, 1000, 20000])
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_nms_matches_cpu(n, dtype):
    g = gen(n + 1)
    boxes, scores = random_boxes(n, g, dtype=dtype), torch.rand(n, generator=g)
    idxs = torch.randint(0, 80, (n,), generator=g)
    for thr in (0.0, 0.5, 1.0):
        for kw in ({}, {"score_threshold": 0.4, "max_output": 100}):
            assert_same(
                maskops.nms(boxes.cuda(), scores.cuda(), thr, **kw).cpu(),
                maskops.nms(boxes, scores, thr, **kw),
            )
            assert_same(
                maskops.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), thr, **kw).cpu(),
                maskops.batched_nms(boxes, scores, idxs, thr, **kw),
            )


@pytest.mark.cuda
@needs_cuda
def test_cuda_nms_ties_nan_heavy_overlap():
    g = gen(5)
    n = 5000
    boxes, scores = heavy_overlap_boxes(n, g), tied_scores(n, g)
    scores[::37] = float("nan")
    idxs = torch.randint(0, 3, (n,), generator=g)
    for thr in (0.3, 0.7):
        assert_same(
            maskops.nms(boxes.cuda(), scores.cuda(), thr).cpu(), maskops.nms(boxes, scores, thr)
        )
        assert_same(
            maskops.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), thr).cpu(),
            maskops.batched_nms(boxes, scores, idxs, thr),
        )


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_box_ops_match_cpu(dtype):
    g = gen(6)
    a, b = random_boxes(300, g, dtype=dtype), random_boxes(200, g, dtype=dtype)
    a[::4, 2] = a[::4, 0]
    assert torch.equal(maskops.box_iou(a.cuda(), b.cuda()).cpu(), maskops.box_iou(a, b))
    assert torch.equal(maskops.box_area(a.cuda()).cpu(), maskops.box_area(a))


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck():
    g = gen(8)
    boxes, scores = random_boxes(300, g).cuda(), torch.rand(300, generator=g).cuda()
    idxs = torch.randint(0, 4, (300,), generator=g).cuda()
    torch.library.opcheck(torch.ops.maskops.nms.default, (boxes, scores, 0.5))
    torch.library.opcheck(torch.ops.maskops.batched_nms.default, (boxes, scores, idxs, 0.5))
    torch.library.opcheck(torch.ops.maskops.box_iou.default, (boxes, boxes[:7]))
