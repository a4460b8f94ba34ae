"""maskops.rpn_proposals against torchvision's RegionProposalNetwork (decode + filter_proposals).

With distinct scores the proposals must be torchvision's bit for bit, order included. With
equal scores torchvision's NMS orders them with an unstable sort (and torch.topk picks among
equal logits in an unspecified order, which maskops reproduces by calling torch.topk the same
way), so tie cases are compared as sets of (box, score) rows. The test-only op
_rpn_proposals_elementwise runs the CUDA algorithm on the CPU, whose exp is the C library's:
it agrees to an ulp of each coordinate.
"""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)

import maskops
from maskops.testing import ops as testing_ops
from models.testing.equivalence import check_rpn_proposals

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = (4, 8, 16, 32, 64)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_rpn(pre=1000, post=1000, nms_thresh=0.7, score_thresh=0.0, channels=4):
    rpn = RegionProposalNetwork(
        TVAnchorGenerator(SIZES, RATIOS),
        RPNHead(channels, 3),
        0.7,
        0.3,
        256,
        0.5,
        dict(training=pre, testing=pre),
        dict(training=post, testing=post),
        nms_thresh,
        score_thresh,
    )
    return rpn.eval()


def make_case(image_size, batch, seed, ties=False, logit_range=6.0, dtype=torch.float32):
    """Images padded to image_size (the second one smaller), anchors and RPN outputs in
    torchvision's concat_box_prediction_layers layout. Logits are distinct (a permutation
    spread over [-logit_range / 2, logit_range / 2]) unless `ties`."""
    g = gen(seed)
    h, w = image_size
    images = ImageList(
        torch.zeros(batch, 3, h, w), [(h - 31 * i, w - 45 * i) for i in range(batch)]
    )
    feats = [torch.zeros(batch, 1, math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    anchors = TVAnchorGenerator(SIZES, RATIOS)(images, feats)
    per_level = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    n = batch * anchors[0].shape[0]
    if ties:
        objectness = torch.randint(-8, 8, (n,), generator=g).float() / 4
    else:
        objectness = torch.randperm(n, generator=g).float() / n * logit_range - logit_range / 2
    deltas = torch.randn(n, 4, generator=g) * 0.4
    return images, anchors, per_level, objectness[:, None].to(dtype), deltas.to(dtype)


def torchvision_proposals(rpn, images, anchors, per_level, objectness, deltas, min_size=1e-3):
    rpn.min_size = min_size
    with torch.no_grad():
        proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)


def maskops_proposals(rpn, images, anchors, per_level, objectness, deltas, min_size=1e-3, op=None):
    if op is None:
        return maskops.rpn_proposals(
            objectness,
            deltas,
            anchors,
            images.image_sizes,
            rpn.pre_nms_top_n(),
            rpn.post_nms_top_n(),
            rpn.nms_thresh,
            rpn.score_thresh,
            min_size,
            per_level,
        )
    b = len(images.image_sizes)
    return op(
        objectness.view(b, -1),
        deltas.view(b, -1, 4),
        torch.stack(anchors),
        [x for s in images.image_sizes for x in s],
        rpn.pre_nms_top_n(),
        rpn.post_nms_top_n(),
        rpn.nms_thresh,
        rpn.score_thresh,
        min_size,
        per_level,
    )


def assert_identical(got, expected):
    for (gb, gs), (eb, es) in zip(zip(*got), zip(*expected)):
        assert gb.dtype == eb.dtype and gs.dtype == es.dtype
        assert gb.shape == eb.shape and torch.equal(gs, es) and torch.equal(gb, eb)


def assert_same_sets(got, expected):
    for (gb, gs), (eb, es) in zip(zip(*got), zip(*expected)):
        rows = lambda b, s: sorted(map(tuple, torch.cat([b, s[:, None]], 1).tolist()))  # noqa: E731
        assert rows(gb, gs) == rows(eb, es)
        assert torch.equal(gs, es)  # the same scores, in the same (decreasing) order


@pytest.mark.parametrize(
    "image_size,batch",
    [((800, 800), 1), ((800, 800), 2), ((800, 1216), 2), ((517, 703), 1), ((333, 500), 2)],
)
def test_matches_torchvision(image_size, batch):
    case = make_case(image_size, batch, seed=batch)
    rpn = make_rpn()
    expected = torchvision_proposals(rpn, *case)
    got = maskops_proposals(rpn, *case)
    assert all(len(b) > 0 for b in got[0])
    assert_identical(got, expected)


@pytest.mark.parametrize(
    "pre,post,nms_thresh,score_thresh,min_size",
    [
        (2000, 2000, 0.7, 0.0, 1e-3),  # torchvision's training settings
        (300, 100, 0.5, 0.6, 1e-3),  # a score threshold that cuts (compared in float32)
        (50, 1000, 0.7, 0.0, 40.0),  # min_size that cuts; every level has more than pre anchors
        (100000, 50, 0.3, 0.0, 1e-3),  # pre beyond every level's size: all anchors are candidates
        (1000, 0, 0.7, 0.0, 1e-3),  # post = 0
        (0, 1000, 0.7, 0.0, 1e-3),  # pre = 0
        (1000, 1000, 0.7, 1.1, 1e-3),  # nothing passes the score threshold
    ],
)
def test_settings_match_torchvision(pre, post, nms_thresh, score_thresh, min_size):
    case = make_case((416, 352), 2, seed=7)
    rpn = make_rpn(pre, post, nms_thresh, score_thresh)
    expected = torchvision_proposals(rpn, *case, min_size=min_size)
    got = maskops_proposals(rpn, *case, min_size=min_size)
    assert_identical(got, expected)


def test_float64_matches_torchvision():
    case = make_case((517, 703), 2, seed=3, dtype=torch.float64)
    images, anchors, per_level, objectness, deltas = case
    anchors = [a.double() for a in anchors]
    rpn = make_rpn()
    expected = torchvision_proposals(rpn, images, anchors, per_level, objectness, deltas)
    got = maskops_proposals(rpn, images, anchors, per_level, objectness, deltas)
    assert_identical(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_compute_in_float32(dtype):
    images, anchors, per_level, objectness, deltas = make_case((333, 500), 2, seed=4)
    objectness, deltas, anchors = (
        objectness.to(dtype),
        deltas.to(dtype),
        [a.to(dtype) for a in anchors],
    )
    rpn = make_rpn()
    got = maskops_proposals(rpn, images, anchors, per_level, objectness, deltas)
    ref = maskops_proposals(
        rpn, images, [a.float() for a in anchors], per_level, objectness.float(), deltas.float()
    )
    for (gb, gs), (rb, rs) in zip(zip(*got), zip(*ref)):
        assert gb.dtype == dtype and gs.dtype == dtype
        assert torch.equal(gb, rb.to(dtype)) and torch.equal(gs, rs.to(dtype))


def test_ties_match_torchvision_as_sets():
    # Logits in steps of 1/4: many equal logits (the top-k picks among them as torchvision's
    # torch.topk does) and equal scores (NMS orders them differently). post_nms_top_n is large
    # so that no cut falls among equal scores.
    case = make_case((320, 416), 2, seed=5, ties=True)
    rpn = make_rpn(pre=700, post=100000)
    expected = torchvision_proposals(rpn, *case)
    got = maskops_proposals(rpn, *case)
    assert_same_sets(got, expected)


@pytest.mark.parametrize("pattern", ["spikes", "nan", "signed_zeros"])
def test_top_k_edge_cases(pattern):
    """The CPU top-k takes a threshold from a strided sample and defers to torch.topk where
    its result is not unique: exercise the sample missing the top values, NaN logits, and
    equal values (0.0 and -0.0) at the edge of the top k."""
    images, anchors, per_level, objectness, deltas = make_case((512, 512), 2, seed=12)
    obj = objectness.view(2, -1).clone()
    n0 = per_level[0]  # 49,152 anchors: large enough for the sampled threshold
    if pattern == "spikes":
        # The strided sample sees only the spikes, so its threshold is too high: second pass.
        step = n0 // 4096
        obj[:, :n0] = -5 + torch.rand(2, n0, generator=gen(1)) * 1e-3
        obj[:, :n0:step] = torch.linspace(0, 1, obj[:, :n0:step].numel()).view(2, -1)
    elif pattern == "nan":
        obj[0, 5:n0:977] = math.nan
        obj[1, n0 + 7] = math.nan
    else:
        obj[:, :n0] = obj[:, :n0].clamp(max=0.0)  # many zeros at the top
        obj[0, :n0:2] = torch.where(obj[0, :n0:2] == 0, -0.0, obj[0, :n0:2])
    obj = obj.reshape(-1, 1)
    rpn = make_rpn()
    expected = torchvision_proposals(rpn, images, anchors, per_level, obj, deltas)
    got = maskops_proposals(rpn, images, anchors, per_level, obj, deltas)
    if pattern == "signed_zeros":
        assert_same_sets(got, expected)  # equal scores: NMS orders them differently
    else:
        assert_identical(got, expected)


def test_full_rpn_module_matches():
    """A torchvision RPN with a random head on random features, run end to end, against the
    same head's outputs through maskops.AnchorGenerator and rpn_proposals."""
    torch.manual_seed(0)
    rpn = make_rpn(pre=1000, post=500, channels=8)
    torch.nn.init.normal_(rpn.head.cls_logits.weight, std=0.3)  # spread-out logits
    images = ImageList(torch.zeros(2, 3, 480, 640), [(480, 640), (451, 600)])
    features = {
        str(i): torch.randn(2, 8, math.ceil(480 / s), math.ceil(640 / s))
        for i, s in enumerate(STRIDES)
    }
    with torch.no_grad():
        expected, _ = rpn(images, features)
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        anchors = maskops.AnchorGenerator(SIZES, RATIOS)(images, feats)
        boxes, scores = maskops.rpn_proposals(
            objectness, deltas, anchors, images.image_sizes, 1000, 500, 0.7, 0.0, 1e-3, per_level
        )
    for got, exp in zip(boxes, expected):
        assert got.shape == exp.shape
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, exp.tolist()))


def test_anchor_layouts():
    images, anchors, per_level, objectness, deltas = make_case((256, 320), 2, seed=6)
    rpn = make_rpn(pre=300, post=200)
    # Different anchors per image (shifted), as a list and as a [B, A, 4] tensor.
    moved = [anchors[0], anchors[1] + 3.5]
    expected = torchvision_proposals(rpn, images, moved, per_level, objectness, deltas)
    assert_identical(maskops_proposals(rpn, images, moved, per_level, objectness, deltas), expected)
    assert_identical(
        maskops_proposals(rpn, images, torch.stack(moved), per_level, objectness, deltas), expected
    )
    # [B, A] / [B, A, 4] inputs work as well as torchvision's flattened ones.
    same = torchvision_proposals(rpn, images, anchors, per_level, objectness, deltas)
    got = maskops.rpn_proposals(
        objectness.view(2, -1),
        deltas.view(2, -1, 4),
        anchors[0],
        images.image_sizes,
        300,
        200,
        0.7,
        0.0,
        1e-3,
        per_level,
    )
    assert_identical(got, same)


def test_empty_inputs():
    obj, deltas, anchors = torch.zeros(2, 0), torch.zeros(2, 0, 4), torch.zeros(0, 4)
    boxes, scores = maskops.rpn_proposals(
        obj, deltas, anchors, [(10, 10), (10, 10)], 10, 10, 0.7, 0.0, 1e-3, [0, 0]
    )
    assert [b.shape for b in boxes] == [(0, 4), (0, 4)] and [s.shape for s in scores] == [
        (0,),
        (0,),
    ]
    boxes, scores = maskops.rpn_proposals(
        torch.zeros(0, 5), torch.zeros(0, 5, 4), torch.zeros(5, 4), [], 10, 10, 0.7, 0.0, 1e-3, [5]
    )
    assert boxes == [] and scores == []
    op = testing_ops._rpn_proposals_elementwise
    assert op(
        torch.zeros(0, 5), torch.zeros(0, 5, 4), torch.zeros(5, 4), [], 10, 10, 0.7, 0.0, 1e-3, [5]
    ) == ([], [])
    boxes, scores = op(obj, deltas, anchors, [10, 10, 10, 10], 10, 10, 0.7, 0.0, 1e-3, [0, 0])
    assert [b.shape for b in boxes] == [(0, 4), (0, 4)]


# ---- the CUDA algorithm on the CPU ----


@pytest.mark.parametrize("image_size,batch", [((800, 800), 1), ((517, 703), 2)])
def test_elementwise_op_agrees(image_size, batch):
    # Logits over a narrow range: the scores stay far apart compared with the ulp by which the
    # C library's exp and torch's may differ, so the order cannot change.
    case = make_case(image_size, batch, seed=8, logit_range=4.0)
    rpn = make_rpn()
    ref = maskops_proposals(rpn, *case)
    got = maskops_proposals(rpn, *case, op=testing_ops._rpn_proposals_elementwise)
    for (gb, gs), (rb, rs) in zip(zip(*got), zip(*ref)):
        assert gb.shape == rb.shape
        torch.testing.assert_close(gs, rs, rtol=0, atol=1e-6)
        torch.testing.assert_close(gb, rb, rtol=0, atol=2e-4)


def proposal_check(case, rpn, boxes, scores, i, min_size=1e-3, box_tol=1e-3, score_tol=1e-6):
    """check_rpn_proposals: ``boxes``/``scores`` of image ``i`` are a selection a correct RPN
    makes from these outputs when its exp and decoding round differently (by up to the
    tolerances), whatever it decides at the boundaries those cover."""
    images, anchors, per_level, objectness, deltas = case
    b = len(images.image_sizes)
    config = dict(
        pre_nms_top_n=rpn.pre_nms_top_n(),
        post_nms_top_n=rpn.post_nms_top_n(),
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_score_thresh=rpn.score_thresh,
        rpn_min_size=min_size,
    )
    return check_rpn_proposals(
        objectness.view(b, -1)[i],
        deltas.view(b, -1, 4)[i],
        anchors[i],
        images.image_sizes[i],
        per_level,
        config,
        boxes,
        scores,
        box_tol,
        score_tol,
    )


def test_elementwise_op_is_a_valid_selection_even_at_boundaries():
    # Logits over a wide range with many near-equal values: this is what a GPU's expf may
    # decide differently; the check accepts any selection correct up to rounding, and no other.
    case = make_case((517, 703), 2, seed=12, logit_range=0.05)
    rpn = make_rpn(pre=300, post=200)
    boxes, scores = maskops_proposals(rpn, *case, op=testing_ops._rpn_proposals_elementwise)
    for i in range(2):
        check = proposal_check(case, rpn, boxes[i], scores[i], i)
        assert check.ok, check.detail
    lost = proposal_check(case, rpn, boxes[0][1:], scores[0][1:], 0)  # the best dropped
    assert not lost.ok and "robustly kept but lost: 1" in lost.detail
    moved = boxes[0].clone()
    moved[5] += 0.5  # one box moved
    assert "not from a candidate: 1" in proposal_check(case, rpn, moved, scores[0], 0).detail


def test_elementwise_op_settings():
    case = make_case((300, 200), 2, seed=9, logit_range=4.0)
    for pre, post, score_thresh, min_size in [
        (50, 30, 0.5, 1e-3),
        (0, 10, 0.0, 1e-3),
        (100, 100, 0.0, 30.0),
        (100, 100, 0.99, 1e-3),
    ]:
        rpn = make_rpn(pre, post, 0.6, score_thresh)
        ref = maskops_proposals(rpn, *case, min_size=min_size)
        got = maskops_proposals(
            rpn, *case, min_size=min_size, op=testing_ops._rpn_proposals_elementwise
        )
        for (gb, gs), (rb, rs) in zip(zip(*got), zip(*ref)):
            assert gb.shape == rb.shape
            torch.testing.assert_close(gb, rb, rtol=0, atol=1e-4)


def test_elementwise_op_per_image_segments():
    """The GPU algorithm's NMS runs one segment per image over its candidates that were not
    rejected: images whose candidates are all, some or none rejected (a tiny image clips every
    box below min_size), post_nms_top_n of 0 and of fewer than the image keeps."""
    case = make_case((300, 200), 3, seed=10, logit_range=4.0)
    images, anchors, per_level, objectness, deltas = case
    images.image_sizes[1] = (2, 2)
    for pre, post, score_thresh, min_size in [
        (100, 100, 0.0, 3.0),
        (100, 0, 0.0, 1e-3),
        (200, 7, 0.3, 1e-3),
        (50, 1000, 0.6, 1e-3),
    ]:
        rpn = make_rpn(pre, post, 0.6, score_thresh)
        ref = maskops_proposals(rpn, *case, min_size=min_size)
        got = maskops_proposals(
            rpn, *case, min_size=min_size, op=testing_ops._rpn_proposals_elementwise
        )
        assert len(got[0]) == 3
        for (gb, gs), (rb, rs) in zip(zip(*got), zip(*ref)):
            assert gb.shape == rb.shape
            torch.testing.assert_close(gs, rs, rtol=0, atol=1e-6)
            torch.testing.assert_close(gb, rb, rtol=0, atol=1e-4)


# ---- registration, bad input ----


def _opcheck_args(anchor_batch=False):
    images, anchors, per_level, objectness, deltas = make_case((96, 128), 2, seed=10)
    anc = torch.stack(anchors) if anchor_batch else anchors[0]
    return (
        objectness.view(2, -1),
        deltas.view(2, -1, 4),
        anc,
        [96, 128, 65, 83],
        100,
        50,
        0.7,
        0.0,
        1e-3,
        per_level,
    )


def _op(name):
    """The product op, or its test-only twin (torch.ops.maskops_testing)."""
    return getattr(testing_ops if name == "_rpn_proposals_elementwise" else torch.ops.maskops, name)


@pytest.mark.parametrize("op", ["rpn_proposals", "_rpn_proposals_elementwise"])
@pytest.mark.parametrize("anchor_batch", [False, True])
def test_opcheck(op, anchor_batch):
    torch.library.opcheck(_op(op).default, _opcheck_args(anchor_batch))


def test_torch_compile_fullgraph():
    # Anchors (not cached while compiling) and proposals whose count per image depends on the
    # data (an unbacked size from the fake kernel), in one graph.
    torch._dynamo.reset()
    gen_ = maskops.AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    sizes = [(64, 96), (60, 90)]
    levels = [16 * 24 * 3, 8 * 12 * 3]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(images, f0, f1, objectness, deltas):
        anchors = gen_(ImageList(images, sizes), [f0, f1])
        return maskops.rpn_proposals(
            objectness, deltas, anchors, sizes, 100, 50, 0.7, 0.0, 1e-3, levels
        )

    images, feats = torch.zeros(2, 3, 64, 96), [torch.zeros(2, 1, 16, 24), torch.zeros(2, 1, 8, 12)]
    g = gen(13)
    objectness, deltas = (
        torch.randn(2, sum(levels), generator=g),
        torch.randn(2, sum(levels), 4, generator=g) * 0.2,
    )
    got = f(images, *feats, objectness, deltas)
    expected = maskops.rpn_proposals(
        objectness,
        deltas,
        gen_(ImageList(images, sizes), feats),
        sizes,
        100,
        50,
        0.7,
        0.0,
        1e-3,
        levels,
    )
    assert_identical(got, expected)


O, D, A = (
    torch.randn(2, 30),
    torch.randn(2, 30, 4),
    torch.rand(30, 4) * 10 + torch.tensor([0, 0, 10, 10]),
)
SZ = [(40, 40), (40, 40)]


def call(
    o=O, d=D, a=A, sizes=SZ, pre=10, post=10, nms=0.7, score=0.0, min_size=1e-3, levels=(20, 10)
):
    return maskops.rpn_proposals(o, d, a, sizes, pre, post, nms, score, min_size, levels)


BAD = [
    (lambda: call(o=O.long()), TypeError, "objectness"),
    (lambda: call(o=O[0]), ValueError, "objectness"),
    (lambda: call(o=O[:1]), ValueError, "objectness"),
    (lambda: call(d=D[:, :20]), ValueError, "deltas"),
    (lambda: call(d=D[..., :3]), ValueError, "deltas"),
    (lambda: call(d=D.int()), TypeError, "deltas"),
    (lambda: call(a=A[:20]), ValueError, "anchors"),
    (lambda: call(a=[A]), ValueError, "anchors"),
    (lambda: call(a=[A, A[:5]]), ValueError, "anchors"),
    (lambda: call(a=A.long()), TypeError, "anchors"),
    (lambda: call(a=A.to("meta")), ValueError, "anchors"),
    (lambda: call(sizes=[(40, 40)]), ValueError, "objectness"),
    (lambda: call(sizes=[(40, -1), (40, 40)]), ValueError, "image_sizes"),
    (lambda: call(sizes=[(40,), (40, 40)]), ValueError, "image_sizes"),
    (lambda: call(pre=-1), ValueError, "pre_nms_top_n"),
    (lambda: call(post=2.5), TypeError, "post_nms_top_n"),
    (lambda: call(nms=math.nan), ValueError, "nms_thresh"),
    (lambda: call(score=None), TypeError, "score_thresh"),
    (lambda: call(min_size=-1.0), ValueError, "min_size"),
    (lambda: call(levels=(20, 11)), ValueError, "num_anchors_per_level"),
    (lambda: call(levels=(40, -10)), ValueError, "num_anchors_per_level"),
    (lambda: call(levels=30), TypeError, "num_anchors_per_level"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case):
    fn, err, name = BAD[case]
    with pytest.raises(err, match=name):
        fn()


def direct(
    o=O,
    d=D,
    a=A,
    sizes=(40, 40, 40, 40),
    pre=10,
    post=10,
    nms=0.7,
    score=0.0,
    min_size=1e-3,
    levels=(20, 10),
    op="rpn_proposals",
):
    return _op(op)(o, d, a, list(sizes), pre, post, nms, score, min_size, list(levels))


BAD_DIRECT = [
    (lambda: direct(o=O[0]), "objectness"),
    (lambda: direct(d=D[:1]), "deltas"),
    (lambda: direct(a=A[:3]), "anchors"),
    (lambda: direct(a=A.int()), "anchors"),
    (lambda: direct(sizes=(40, 40)), "image_sizes"),
    (lambda: direct(sizes=(40, 40, -1, 40)), "image_sizes"),
    (lambda: direct(pre=-1), "pre_nms_top_n"),
    (lambda: direct(post=-1), "post_nms_top_n"),
    (lambda: direct(min_size=-1.0), "min_size"),
    (lambda: direct(score=math.nan), "score_thresh"),
    (lambda: direct(levels=(20, 20)), "num_anchors_per_level"),
    (lambda: direct(levels=(20, 20), op="_rpn_proposals_elementwise"), "num_anchors_per_level"),
]


@pytest.mark.parametrize("case", range(len(BAD_DIRECT)))
def test_bad_input_direct(case):
    fn, name = BAD_DIRECT[case]
    with pytest.raises(RuntimeError, match=name):
        fn()


# ---- CUDA ----


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batch", [1, 2])
def test_cuda_matches_cpu(batch):
    images, anchors, per_level, objectness, deltas = make_case(
        (800, 1216), batch, seed=11, logit_range=4.0
    )
    rpn = make_rpn()
    ref = maskops_proposals(rpn, images, anchors, per_level, objectness, deltas)
    got = maskops_proposals(
        rpn, images, [a.cuda() for a in anchors], per_level, objectness.cuda(), deltas.cuda()
    )
    case = images, anchors, per_level, objectness, deltas
    for i, ((gb, gs), (rb, rs)) in enumerate(zip(zip(*got), zip(*ref))):
        assert gb.is_cuda and gs.is_cuda
        # The device's expf against the CPU's: an ulp or two of each coordinate, which may
        # decide a near-tie differently; any selection correct up to that passes.
        check = proposal_check(case, rpn, gb.cpu(), gs.cpu(), i)
        assert check.ok, check.detail
        if gb.shape == rb.shape:
            torch.testing.assert_close(gs.cpu(), rs, rtol=0, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck():
    args = list(_opcheck_args())
    args[:3] = [t.cuda() for t in args[:3]]
    torch.library.opcheck(torch.ops.maskops.rpn_proposals.default, tuple(args))
