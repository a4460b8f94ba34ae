"""maskops box coding (BoxCoder, encode_boxes, decode_boxes), clip_boxes and
remove_small_boxes against torchvision.

float32 and float64 results must equal torchvision's CPU results bit for bit. Half types
compute in float32 (torchvision rounds after every operation), so they are compared with
the float32 result. The test-only ops run the CUDA functors, whose exp / log are the C
library's rather than torch's vectorised ones: they agree to about an ulp.
"""

import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.ops import boxes as tv_boxes

import maskops
from maskops.check import inputs
from maskops.testing import ops as testing_ops

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EXACT = [torch.float32, torch.float64]
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (3.0, 7.0, 0.3, 1.7)]
CLIP = math.log(1000.0 / 16)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_boxes(n, g, scale=800.0, max_wh=300.0, dtype=torch.float32):
    """Tensor[n, 4]: corners uniform in [0, scale), sides in [0.5, max_wh + 0.5)."""
    return inputs.random_boxes(g, n, scale, 0.5, max_wh + 0.5, margin=0).to(dtype)


def random_codes(n, k, g, dtype=torch.float32):
    codes = torch.randn(n, 4 * k, generator=g, dtype=torch.float64)
    codes[:, 2::4] *= 3  # some beyond the clamp after dividing by small weights
    codes[:, 3::4] *= 3
    return codes.to(dtype)


def assert_equal(got, expected):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(got, expected), (
        f"max difference {(got.double() - expected.double()).abs().max()}"
    )


# ---- decode ----


@pytest.mark.parametrize("dtype", EXACT)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("k", [1, 3])
def test_decode_matches_torchvision(dtype, weights, k):
    g = gen(k)
    boxes, codes = random_boxes(5000, g, dtype=dtype), random_codes(5000, k, g, dtype)
    tv = tv_utils.BoxCoder(weights)
    mo = maskops.BoxCoder(weights)
    assert_equal(mo.decode_single(codes, boxes), tv.decode_single(codes, boxes))
    split = [boxes[:1234], boxes[1234:]]
    assert_equal(mo.decode(codes, split), tv.decode(codes, split))
    assert_equal(maskops.decode_boxes(codes, boxes, weights), tv.decode(codes, [boxes]))


def test_decode_shapes_and_edge_cases():
    tv, mo = tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)), maskops.BoxCoder((1.0, 1.0, 1.0, 1.0))
    empty = torch.zeros(0, 4)
    assert_equal(mo.decode(torch.zeros(0, 4), [empty]), tv.decode(torch.zeros(0, 4), [empty]))
    assert_equal(
        mo.decode_single(torch.zeros(0, 8), empty), tv.decode_single(torch.zeros(0, 8), empty)
    )
    g = gen(3)
    boxes = random_boxes(10, g)
    codes = random_codes(10, 2, g).flatten()  # decode accepts any layout of N * 4K values
    assert_equal(mo.decode(codes, [boxes]), tv.decode(codes, [boxes]))
    # Float64 boxes with float32 codes are read in float32, as torchvision converts them.
    codes2 = random_codes(10, 1, g)
    assert_equal(mo.decode_single(codes2, boxes.double()), tv.decode_single(codes2, boxes.double()))
    # A weights tensor works as well as a tuple.
    assert_equal(
        maskops.decode_boxes(codes2, boxes, torch.tensor([2.0, 2.0, 1.0, 1.0])),
        tv_utils.BoxCoder((2.0, 2.0, 1.0, 1.0)).decode(codes2, [boxes]),
    )
    # Non-contiguous inputs.
    wide = random_codes(10, 2, g)
    assert_equal(
        mo.decode_single(wide[:, :4], boxes), tv.decode_single(wide[:, :4].contiguous(), boxes)
    )


def test_extreme_deltas_are_clamped():
    g = gen(4)
    boxes = random_boxes(100, g)
    codes = torch.tensor(
        [
            [50.0, -50.0, 1e6, -1e6],
            [-50.0, 50.0, math.inf, 1e30],
            [0.0, 0.0, -math.inf, 88.0],
            [3.0, 3.0, 1e4, 1e4],
        ]
    ).repeat(25, 1)
    out = maskops.decode_boxes(codes, boxes, (1.0, 1.0, 1.0, 1.0))
    assert torch.isfinite(out).all()
    assert_equal(out, tv_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(codes, [boxes]))
    # The clamp bounds the size at 1000 / 16 times the reference box.
    w = boxes[:, 2] - boxes[:, 0]
    assert ((out[:, 0, 2] - out[:, 0, 0]) <= w * (1000 / 16) * 1.0001).all()
    for dtype in (torch.float16, torch.bfloat16):
        half = maskops.decode_boxes(codes.to(dtype), boxes, (1.0, 1.0, 1.0, 1.0))
        assert not torch.isnan(half).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_types_compute_in_float32(dtype):
    g = gen(5)
    boxes, codes = random_boxes(2000, g), random_codes(2000, 2, g)
    boxes_h, codes_h = boxes.to(dtype), codes.to(dtype)
    got = maskops.decode_boxes(codes_h, boxes_h, (10.0, 10.0, 5.0, 5.0))
    assert got.dtype == dtype
    ref = maskops.decode_boxes(codes_h.float(), boxes_h.float(), (10.0, 10.0, 5.0, 5.0))
    assert torch.equal(got, ref.to(dtype))


# ---- encode ----


@pytest.mark.parametrize("dtype", EXACT)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision(dtype, weights):
    g = gen(6)
    anchors, gt = random_boxes(5000, g, dtype=dtype), random_boxes(5000, g, dtype=dtype)
    tv, mo = tv_utils.BoxCoder(weights), maskops.BoxCoder(weights)
    assert_equal(mo.encode_single(gt, anchors), tv.encode_single(gt, anchors))
    got, expected = (
        mo.encode([gt[:100], gt[100:]], [anchors[:100], anchors[100:]]),
        tv.encode([gt[:100], gt[100:]], [anchors[:100], anchors[100:]]),
    )
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(got, expected):
        assert_equal(a, b)
    w = torch.tensor(weights, dtype=dtype)
    assert_equal(maskops.encode_boxes(gt, anchors, w), tv_utils.encode_boxes(gt, anchors, w))


def test_encode_promotes_and_handles_half():
    g = gen(7)
    anchors, gt = random_boxes(100, g), random_boxes(100, g)
    got = maskops.encode_boxes(gt.double(), anchors, (1.0, 1.0, 1.0, 1.0))
    assert got.dtype == torch.float64
    assert_equal(
        got,
        tv_utils.encode_boxes(gt.double(), anchors.double(), torch.ones(4, dtype=torch.float64)),
    )
    for dtype in (torch.float16, torch.bfloat16):
        h = maskops.encode_boxes(gt.to(dtype), anchors.to(dtype), (10.0, 10.0, 5.0, 5.0))
        ref = maskops.encode_boxes(
            gt.to(dtype).float(), anchors.to(dtype).float(), (10.0, 10.0, 5.0, 5.0)
        )
        assert h.dtype == dtype and torch.equal(h, ref.to(dtype))
    assert maskops.encode_boxes(gt[:0], anchors[:0], (1.0, 1.0, 1.0, 1.0)).shape == (0, 4)


@pytest.mark.parametrize("dtype", EXACT)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_round_trip(dtype, weights):
    g = gen(8)
    anchors = random_boxes(3000, g, dtype=dtype)
    # Targets within the clamp: sizes up to 5x the anchor's.
    gt = anchors + (torch.rand(3000, 4, generator=g, dtype=dtype) - 0.3) * 60
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    coder = maskops.BoxCoder(weights)
    back = coder.decode(coder.encode_single(gt, anchors), [anchors])[:, 0]
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(back, gt, rtol=0, atol=tol)


# ---- the CUDA functors on the CPU ----


@pytest.mark.parametrize("dtype", FLOATS)
def test_elementwise_functors_agree(dtype):
    g = gen(9)
    boxes, codes = random_boxes(4000, g, dtype=dtype), random_codes(4000, 2, g, dtype)
    w = [10.0, 10.0, 5.0, 5.0]
    ref = maskops.decode_boxes(codes, boxes, w)
    got = testing_ops._decode_boxes_elementwise(codes, boxes, w, CLIP)
    # exp may differ by an ulp: relative to the box size, and the half types' own rounding.
    rtol = 1e-6 if dtype in EXACT else 1e-2
    scale = (boxes[:, 2:] - boxes[:, :2]).double().abs().max() * 1000 / 16 + 800
    assert (got.double() - ref.double()).abs().max() <= rtol * scale
    gt = random_boxes(4000, g, dtype=dtype)
    ref = maskops.encode_boxes(gt, boxes, w)
    got = testing_ops._encode_boxes_elementwise(gt, boxes, w)
    torch.testing.assert_close(got, ref, rtol=1e-6 if dtype in EXACT else 1e-2, atol=1e-6)


# ---- clip, remove small ----


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1000,), (3, 50), (0,)])
def test_clip_matches_torchvision(dtype, shape):
    g = gen(10)
    n = math.prod(shape)
    boxes = (
        (random_boxes(n, g, scale=1200.0, dtype=torch.float64) - 200).to(dtype).reshape(*shape, 4)
    )
    if n:
        boxes.view(-1)[::97] = math.nan
    for size in [(517, 703), (800, 800), (0, 5)]:
        got = maskops.clip_boxes(boxes, size)
        expected = tv_boxes.clip_boxes_to_image(boxes, size)
        assert got.shape == expected.shape and got.dtype == dtype
        assert torch.equal(got.nan_to_num(-1), expected.nan_to_num(-1))
    assert torch.equal(
        maskops.clip_boxes(boxes, torch.Size([300, 400])).nan_to_num(-1),
        tv_boxes.clip_boxes_to_image(boxes, (300, 400)).nan_to_num(-1),
    )


@pytest.mark.parametrize("dtype", FLOATS)
def test_remove_small_matches_torchvision(dtype):
    g = gen(11)
    boxes = random_boxes(3000, g, max_wh=20.0, dtype=torch.float64)
    boxes[::5, 2] = boxes[::5, 0] + 3.0  # sides exactly at the threshold
    boxes[::7, 3] = boxes[::7, 1]
    boxes = boxes.to(dtype)
    for min_size in (0.0, 1e-3, 3.0, 7.3, 1e9):
        assert_equal(
            maskops.remove_small_boxes(boxes, min_size),
            tv_boxes.remove_small_boxes(boxes, min_size),
        )
    assert maskops.remove_small_boxes(boxes[:0], 1.0).shape == (0,)


# ---- autograd ----


def test_gradients():
    g = gen(12)
    boxes = random_boxes(6, g, dtype=torch.float64).requires_grad_()
    codes = random_codes(6, 2, g, torch.float64)
    codes[0, 2] = 10.0  # beyond the clamp: no gradient there
    codes.requires_grad_()
    w = (10.0, 10.0, 5.0, 5.0)
    torch.autograd.gradcheck(lambda c, b: maskops.decode_boxes(c, b, w), (codes, boxes))
    gt = random_boxes(6, g, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda r, p: maskops.encode_boxes(r, p, w), (gt, boxes))
    wide = (random_boxes(8, g, scale=900.0, dtype=torch.float64) - 100).requires_grad_()
    torch.autograd.gradcheck(lambda b: maskops.clip_boxes(b, (500, 600)), (wide,))
    # The same gradients as torchvision's formulas (autograd through torch ops).
    tv, mo = tv_utils.BoxCoder(w), maskops.BoxCoder(w)
    grad = torch.randn(6, 8, generator=g, dtype=torch.float64)
    a = torch.autograd.grad(tv.decode_single(codes, boxes), (codes, boxes), grad)
    b = torch.autograd.grad(mo.decode_single(codes, boxes), (codes, boxes), grad)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    a = torch.autograd.grad(tv.encode_single(gt, boxes), (gt, boxes), grad[:, :4])
    b = torch.autograd.grad(mo.encode_single(gt, boxes), (gt, boxes), grad[:, :4])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_gradients_at_the_bounds_are_torchvisions():
    """At a kink (a code at decode's clamp, a coordinate at the image's edge, touching boxes)
    the gradient passes or not as autograd through torchvision's ops on this torch says:
    torch 2.11's clamp passes it at its bound, 2.14's does not."""
    g = gen(21)
    w = (1.0, 1.0, 1.0, 1.0)
    tv, mo = tv_utils.BoxCoder(w), maskops.BoxCoder(w)
    boxes = random_boxes(4, g, dtype=torch.float64).requires_grad_()
    codes = random_codes(4, 1, g, torch.float64)
    codes[:2, 2:] = tv.bbox_xform_clip  # exactly at the clamp (weights 1: no rounding)
    codes.requires_grad_()
    grad = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = torch.autograd.grad(tv.decode_single(codes, boxes), (codes, boxes), grad)
    b = torch.autograd.grad(mo.decode_single(codes, boxes), (codes, boxes), grad)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=0)
    edge = torch.tensor([[0.0, 3, 40, 50], [-5, 0, 60, 30], [10, 10, 60, 50]], dtype=torch.float64)
    leaf, leaf_tv = edge.clone().requires_grad_(), edge.clone().requires_grad_()
    (got,) = torch.autograd.grad(maskops.clip_boxes(leaf, (50, 60)).sum(), leaf)
    (exp,) = torch.autograd.grad(tv_boxes.clip_boxes_to_image(leaf_tv, (50, 60)).sum(), leaf_tv)
    assert torch.equal(got, exp)
    r = 1.0 if _clamp_passes_at_bound() else 0.0  # x1 = 0 and y2 = height are at the bounds
    assert got[0].tolist() == [r, 1.0, 1.0, r]


def _clamp_passes_at_bound():
    """This torch's rule at a clamp's bound (2.11: the gradient passes there; 2.14: not)."""
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    return bool(torch.autograd.grad(x.clamp(min=0.0), x)[0] != 0)


def _clip_backward_reference(boxes, grad, height, width):
    """The clip gradient as a tensor of bounds in boxes' dtype computes it, at the bounds as
    this torch's clamp does."""
    bound = torch.tensor([width, height] * 2, dtype=boxes.dtype)
    if _clamp_passes_at_bound():
        inside = (boxes >= 0) & (boxes <= bound)
    else:
        inside = (boxes > 0) & (boxes < bound)
    return torch.where(inside, grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(300,), (7, 40), (0,)])
def test_clip_gradient_is_the_bounds_rule(dtype, shape):
    """Random boxes around the image with NaN, infinities, -0 and values at, just below and just
    above the bounds (in boxes' dtype, which also rounds the bounds)."""
    g = gen(16)
    n = math.prod(shape)
    for height, width in ((517, 703), (800, 1333), (0, 5), (70000, 1)):
        boxes = (
            (
                (torch.rand(n, 4, generator=g, dtype=torch.float64) * 1.4 - 0.2)
                * torch.tensor([width, height] * 2, dtype=torch.float64)
            )
            .to(dtype)
            .reshape(*shape, 4)
        )
        flat = boxes.view(-1)
        if n:
            for k, v in enumerate([math.nan, math.inf, -math.inf, -0.0, 0.0]):
                flat[k::53] = v
            for k, bound in enumerate((width, height)):
                b = torch.tensor(float(bound), dtype=dtype)
                flat[4 + k :: 41] = b
                flat[6 + k :: 43] = torch.nextafter(b, torch.tensor(math.inf, dtype=dtype))
                flat[8 + k :: 47] = torch.nextafter(b, torch.tensor(-math.inf, dtype=dtype))
        leaf = boxes.clone().requires_grad_()
        grad = torch.randn(leaf.shape, generator=g, dtype=torch.float64).to(dtype)
        (got,) = torch.autograd.grad(maskops.clip_boxes(leaf, (height, width)), leaf, grad)
        assert got.dtype == dtype
        assert torch.equal(got, _clip_backward_reference(boxes, grad, height, width))
        if dtype in EXACT:  # autograd through torchvision's clamps, bounds included
            leaf_tv = boxes.clone().requires_grad_()
            (tv,) = torch.autograd.grad(
                tv_boxes.clip_boxes_to_image(leaf_tv, (height, width)), leaf_tv, grad
            )
            assert torch.equal(got, tv)


# ---- registration ----


def _opcheck_samples():
    g = gen(13)
    boxes, codes = random_boxes(50, g), random_codes(50, 2, g)
    gt = random_boxes(50, g)
    ops = torch.ops.maskops
    w = [10.0, 10.0, 5.0, 5.0]
    return [
        (ops.decode_boxes.default, (codes, boxes, w, CLIP)),
        (
            ops.decode_boxes.default,
            (codes.double().requires_grad_(), boxes.double().requires_grad_(), w, CLIP),
        ),
        (ops.decode_boxes.default, (codes.half(), boxes, w, 2.0)),
        (testing_ops._decode_boxes_elementwise.default, (codes, boxes, w, CLIP)),
        (ops.encode_boxes.default, (gt, boxes, w)),
        (
            ops.encode_boxes.default,
            (gt.double().requires_grad_(), boxes.double().requires_grad_(), w),
        ),
        (testing_ops._encode_boxes_elementwise.default, (gt, boxes, w)),
        (ops.clip_boxes.default, ((boxes - 100).reshape(5, 10, 4), 300, 400)),
        (ops.clip_boxes.default, ((boxes - 100).double().requires_grad_(), 300, 400)),
        (ops.remove_small_boxes.default, (boxes, 100.0)),
        (ops.remove_small_boxes.default, (boxes.bfloat16(), 100.0)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_opcheck(case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args)


B4 = torch.rand(10, 4) * 10 + torch.tensor([0.0, 0.0, 20.0, 20.0])
C4 = torch.randn(10, 8)
BAD = [
    (lambda: maskops.decode_boxes(C4[:, :6], B4, (1, 1, 1, 1)), ValueError, "rel_codes"),
    (lambda: maskops.decode_boxes(C4[0], B4, (1, 1, 1, 1)), ValueError, "rel_codes"),
    (lambda: maskops.decode_boxes(C4.long(), B4, (1, 1, 1, 1)), TypeError, "rel_codes"),
    (lambda: maskops.decode_boxes(C4, B4[:, :3], (1, 1, 1, 1)), ValueError, "boxes"),
    (lambda: maskops.decode_boxes(C4, B4[:9], (1, 1, 1, 1)), ValueError, "rel_codes"),
    (lambda: maskops.decode_boxes(C4, B4.bool(), (1, 1, 1, 1)), TypeError, "boxes"),
    (lambda: maskops.decode_boxes(C4, B4, (1, 1, 1)), ValueError, "weights"),
    (lambda: maskops.decode_boxes(C4, B4, (1, 1, 0, 1)), ValueError, "weights"),
    (lambda: maskops.decode_boxes(C4, B4, (1, -1, 1, 1)), ValueError, "weights"),
    (lambda: maskops.decode_boxes(C4, B4, (1, 1, math.nan, 1)), ValueError, "weights"),
    (lambda: maskops.decode_boxes(C4, B4, (1, 1, "a", 1)), TypeError, "weights"),
    (lambda: maskops.decode_boxes(C4, B4, 1.0), ValueError, "weights"),
    (lambda: maskops.decode_boxes(C4, B4, (1, 1, 1, 1), clamp=math.nan), ValueError, "clamp"),
    (lambda: maskops.decode_boxes(C4, B4.to("meta"), (1, 1, 1, 1)), ValueError, "boxes"),
    (lambda: maskops.BoxCoder((1, 1, 1)), ValueError, "weights"),
    (lambda: maskops.BoxCoder((1, 1, 1, 1)).decode(C4, B4), TypeError, "boxes"),
    (lambda: maskops.encode_boxes(B4, B4[:5], (1, 1, 1, 1)), ValueError, "proposals"),
    (lambda: maskops.encode_boxes(B4[:, :2], B4, (1, 1, 1, 1)), ValueError, "reference_boxes"),
    (lambda: maskops.encode_boxes(B4, B4.long(), (1, 1, 1, 1)), TypeError, "proposals"),
    (lambda: maskops.encode_boxes(B4, B4, torch.ones(3)), ValueError, "weights"),
    (lambda: maskops.clip_boxes(B4[:, :3], (10, 10)), ValueError, "boxes"),
    (lambda: maskops.clip_boxes(B4, (10, -10)), ValueError, "image_size"),
    (lambda: maskops.clip_boxes(B4, (10,)), ValueError, "image_size"),
    (lambda: maskops.clip_boxes(B4, (10.5, 10)), TypeError, "image_size"),
    (lambda: maskops.clip_boxes(B4.bool(), (10, 10)), TypeError, "boxes"),
    (lambda: maskops.remove_small_boxes(B4, -1.0), ValueError, "min_size"),
    (lambda: maskops.remove_small_boxes(B4, "1"), TypeError, "min_size"),
    (lambda: maskops.remove_small_boxes(B4[None], 1.0), ValueError, "boxes"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case):
    fn, err, name = BAD[case]
    with pytest.raises(err, match=name):
        fn()


BAD_DIRECT = [
    (lambda: torch.ops.maskops.decode_boxes(C4[:, :5], B4, [1.0] * 4, 1.0), "rel_codes"),
    (lambda: torch.ops.maskops.decode_boxes(C4, B4[:4], [1.0] * 4, 1.0), "rel_codes"),
    (lambda: torch.ops.maskops.decode_boxes(C4, B4, [1.0] * 3, 1.0), "weights"),
    (lambda: torch.ops.maskops.decode_boxes(C4, B4, [1.0, 1.0, -1.0, 1.0], 1.0), "weights"),
    (lambda: torch.ops.maskops.decode_boxes(C4, B4, [1.0] * 4, math.nan), "clamp"),
    (lambda: torch.ops.maskops.encode_boxes(B4, B4.double(), [1.0] * 4), "dtype"),
    (lambda: torch.ops.maskops.encode_boxes(B4, B4[:3], [1.0] * 4), "proposals"),
    (lambda: torch.ops.maskops.clip_boxes(B4, -1, 4), "image_size"),
    (lambda: torch.ops.maskops.clip_boxes(B4.long(), 1, 4), "boxes"),
    (lambda: torch.ops.maskops.remove_small_boxes(B4[:, :2], 1.0), "boxes"),
    (lambda: testing_ops._decode_boxes_elementwise(C4, B4, [0.0] * 4, 1.0), "weights"),
]


@pytest.mark.parametrize("case", range(len(BAD_DIRECT)))
def test_bad_input_direct(case):
    fn, name = BAD_DIRECT[case]
    with pytest.raises(RuntimeError, match=name):
        fn()


# ---- CUDA ----


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_matches_cpu_functors(dtype):
    g = gen(14)
    boxes, codes, gt = (
        random_boxes(5000, g, dtype=dtype),
        random_codes(5000, 2, g, dtype),
        random_boxes(5000, g, dtype=dtype),
    )
    w = [10.0, 10.0, 5.0, 5.0]
    rtol = 1e-6 if dtype in EXACT else 1e-2
    torch.testing.assert_close(
        maskops.decode_boxes(codes.cuda(), boxes.cuda(), w).cpu(),
        testing_ops._decode_boxes_elementwise(codes, boxes, w, CLIP),
        rtol=rtol,
        atol=1e-3,
    )
    torch.testing.assert_close(
        maskops.encode_boxes(gt.cuda(), boxes.cuda(), w).cpu(),
        testing_ops._encode_boxes_elementwise(gt, boxes, w),
        rtol=rtol,
        atol=1e-5,
    )
    wide = boxes - 300
    assert torch.equal(
        maskops.clip_boxes(wide.cuda(), (500, 600)).cpu(), maskops.clip_boxes(wide, (500, 600))
    )
    assert torch.equal(
        maskops.remove_small_boxes(boxes.cuda(), 100.0).cpu(),
        maskops.remove_small_boxes(boxes, 100.0),
    )


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck():
    g = gen(15)
    boxes, codes = random_boxes(50, g).cuda(), random_codes(50, 2, g).cuda()
    torch.library.opcheck(torch.ops.maskops.decode_boxes.default, (codes, boxes, [1.0] * 4, CLIP))
    torch.library.opcheck(torch.ops.maskops.encode_boxes.default, (boxes, boxes.flip(0), [1.0] * 4))
    torch.library.opcheck(torch.ops.maskops.clip_boxes.default, (boxes, 300, 400))
    torch.library.opcheck(torch.ops.maskops.remove_small_boxes.default, (boxes, 100.0))


@pytest.mark.cuda
@needs_cuda
def test_cuda_clip_backward_never_waits():
    g = gen(17)
    boxes = random_boxes(500, g, scale=900.0) - 100
    boxes[::13, 1] = math.nan
    grad = torch.randn(500, 4, generator=g)
    expected = _clip_backward_reference(boxes, grad, 500, 600)
    leaf = boxes.cuda().requires_grad_()
    out = maskops.clip_boxes(leaf, (500, 600))
    torch.cuda.set_sync_debug_mode("error")
    try:
        (got,) = torch.autograd.grad(out, leaf, grad.cuda())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got.cpu(), expected)
