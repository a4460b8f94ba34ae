"""Multi-level (FPN) RoIAlign: parity with torchvision.ops.MultiScaleRoIAlign, gradients,
level assignment, registration, layouts and bad input."""

from collections import OrderedDict

import pytest
import torch
import torchvision

import maskops
from maskops.testing import ops as testing_ops

ops = torch.ops.maskops
NAMES = ["0", "1", "2", "3"]


def _pyramid(generator, batch, channels, image, strides=(4, 8, 16, 32), dtype=torch.float32):
    h, w = image
    feats = OrderedDict()
    for name, s in zip(NAMES, strides):
        feats[name] = torch.randn(batch, channels, -(-h // s), -(-w // s), generator=generator).to(
            dtype
        )
    feats["pool"] = torch.randn(batch, channels, 2, 2, generator=generator).to(
        dtype
    )  # not selected
    return feats


def _boxes(generator, n, image):
    """Box sides log-uniform in [2, 1.2 * image] px, so every level (and the clamps) is hit."""
    h, w = image
    side = torch.exp(
        torch.rand(n, 2, generator=generator) * (torch.log(torch.tensor(1.2 * max(h, w))) - 0.7)
        + 0.7
    )
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w, h]) - side / 4
    return torch.cat([xy, xy + side], dim=1)


CASES = [
    # batch, channels, image shapes per image, output size, sampling ratio
    (1, 4, [(128, 128)], 7, 2),
    (2, 3, [(96, 160), (128, 100)], (5, 3), -1),
    (2, 5, [(200, 136), (200, 136)], 14, 0),
]


@pytest.mark.parametrize("batch,channels,shapes,output_size,sampling_ratio", CASES)
def test_matches_torchvision(rng, batch, channels, shapes, output_size, sampling_ratio):
    image = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    feats = _pyramid(rng, batch, channels, image)
    boxes = [_boxes(rng, n, s) for n, s in zip((40, 23)[:batch], shapes)]
    ours = maskops.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)
    expected = theirs(feats, boxes, shapes)
    got = ours(feats, boxes, shapes)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert ours.scales == theirs.scales

    # Backward, every level.
    def grads(module):
        leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())
        out = module(leaves, boxes, shapes)
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return torch.autograd.grad(out, [leaves[k] for k in NAMES], g, allow_unused=True)

    for a, b in zip(grads(ours), grads(theirs)):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # sums of many terms


def _rois_and_args(rng, feats, boxes, output, sampling_ratio=2):
    rois = torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i), device=b.device), b], 1)
            for i, b in enumerate(boxes)
        ]
    )
    levels = [feats[k] for k in NAMES]
    scales = [0.25, 0.125, 0.0625, 0.03125]
    return levels, rois, (scales, output, output, sampling_ratio, False, 224.0, 4.0, 2)


def test_cuda_algorithms_on_cpu(rng):
    """The CUDA forward body and both CUDA backward bodies, run on the CPU, against torchvision."""
    shapes = [(160, 160), (160, 160)]
    feats = _pyramid(rng, 2, 3, shapes[0], dtype=torch.float64)
    boxes = [_boxes(rng, 31, s).double() for s in shapes]
    levels, rois, args = _rois_and_args(rng, feats, boxes, 5)
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, 5, 2)
    leaves = OrderedDict((k, v.clone().requires_grad_()) for k, v in feats.items())
    expected = theirs(leaves, boxes, shapes)
    got = testing_ops._multiscale_roi_align_forward_elementwise(levels, rois, *args)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    g = torch.randn(expected.shape, generator=rng, dtype=torch.float64)
    ref = torch.autograd.grad(expected, [leaves[k] for k in NAMES], g, allow_unused=True)
    scales, ph, pw, sr, aligned, cs, cl, kmin = args
    for deterministic in (False, True):
        got = testing_ops._multiscale_roi_align_backward_cuda_algo(
            g,
            rois,
            scales,
            ph,
            pw,
            2,
            3,
            [f.shape[2] for f in levels],
            [f.shape[3] for f in levels],
            sr,
            aligned,
            cs,
            cl,
            kmin,
            deterministic,
        )
        for a, b in zip(got, ref):
            torch.testing.assert_close(
                a, torch.zeros_like(a) if b is None else b, rtol=0, atol=1e-12
            )


def test_level_assignment_at_exact_boundaries():
    """sqrt(area) = 224 maps to level 4, 112 to level 3, 111.9 to level 2, 448 to 5 (clamped)."""
    feats = [
        torch.full((1, 1, 64 // 2**i, 64 // 2**i), float(i + 2)) for i in range(4)
    ]  # value = level
    sides = [224.0, 112.0, 111.9, 448.0, 1000.0, 1.0, 0.0]
    boxes = torch.tensor([[0.0, 0.0, s, s] for s in sides])
    out = maskops.multiscale_roi_align(feats, [boxes], 1, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 1)
    # Each map holds its level number; the 1000 px box's one sample lies off the 8x8 map.
    assert out.flatten().tolist() == [4.0, 3.0, 2.0, 5.0, 0.0, 2.0, 2.0]
    ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 1, 1)(
        dict(zip("0123", feats)), [boxes], [(256, 256)]
    )
    assert torch.equal(out, ref)


def test_negative_area_box_pools_to_zero_like_torchvision(rng):
    feats = _pyramid(rng, 1, 2, (128, 128))
    boxes = [
        torch.tensor([[50.0, 10.0, 10.0, 60.0], [5.0, 5.0, 60.0, 70.0]])
    ]  # first inverted in x
    ours = maskops.MultiScaleRoIAlign(NAMES, 3, 2)(feats, boxes, [(128, 128)])
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, 3, 2)(feats, boxes, [(128, 128)])
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_single_level_equals_roi_align(rng):
    x = torch.randn(2, 4, 20, 20, generator=rng)
    boxes = [_boxes(rng, 9, (80, 80)) for _ in range(2)]
    got = maskops.multiscale_roi_align([x], boxes, 5, [0.25], 2, aligned=True)
    torch.testing.assert_close(got, maskops.roi_align(x, boxes, 5, 0.25, 2, True), rtol=0, atol=0)


def test_gradcheck(rng):
    feats = [
        torch.randn(
            1, 2, 16 // 2**i, 16 // 2**i, generator=rng, dtype=torch.float64
        ).requires_grad_()
        for i in range(3)
    ]
    boxes = [
        torch.tensor(
            [[1.0, 2.0, 9.0, 12.0], [0.0, 0.0, 60.0, 50.0], [3.0, 3.0, 30.0, 20.0]],
            dtype=torch.float64,
        )
    ]
    scales = [1.0, 0.5, 0.25]

    def f(*levels):
        return maskops.multiscale_roi_align(
            list(levels), boxes, 3, scales, 2, canonical_scale=16, canonical_level=1
        )

    assert torch.autograd.gradcheck(f, tuple(feats))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
)
def test_layouts_and_dtypes(rng, channels_last, dtype, tol):
    feats = _pyramid(rng, 2, 16, (128, 128))
    boxes = [_boxes(rng, 25, (128, 128)) for _ in range(2)]
    levels = [feats[k] for k in NAMES]
    expected = maskops.multiscale_roi_align(levels, boxes, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2)
    levels = [f.to(dtype) for f in levels]
    if channels_last:
        levels = [f.contiguous(memory_format=torch.channels_last) for f in levels]
    leaves = [f.requires_grad_() for f in levels]
    got = maskops.multiscale_roi_align(leaves, boxes, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2)
    assert got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    got.float().sum().backward()
    for leaf in leaves:
        assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
        assert leaf.grad.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )


@pytest.mark.parametrize(
    "channels,rois,output", [(256, 300, 7), (64, 40, 14), (70, 33, 7), (8, 20, (5, 3))]
)
@pytest.mark.parametrize("mixed", [False, True])
def test_bfloat16_channels_last_levels_are_read_as_stored(rng, channels, rois, output, mixed):
    """bfloat16 channels-last levels are read without a float copy (widened per load):
    bit for bit the float32 computation on the same (exactly widened) values, rounded once;
    with ``mixed``, one level is NCHW and takes the converting path in the same call."""
    image = (160, 224)
    feats = _pyramid(rng, 2, channels, image, dtype=torch.bfloat16)
    levels = [feats[k].contiguous(memory_format=torch.channels_last) for k in NAMES]
    if mixed:
        levels[1] = levels[1].contiguous()
    boxes = [_boxes(rng, rois, image) for _ in range(2)]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    got = maskops.multiscale_roi_align(levels, boxes, output, scales, 2)
    expected = maskops.multiscale_roi_align([f.float() for f in levels], boxes, output, scales, 2)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected.to(torch.bfloat16))
    # and against an independent reference, at bfloat16's rounding
    ref = torchvision.ops.MultiScaleRoIAlign(NAMES, output, 2)(
        OrderedDict((k, f.double()) for k, f in zip(NAMES, levels)),
        [b.double() for b in boxes],
        [image, image],
    )
    torch.testing.assert_close(got.double(), ref, rtol=1.6e-2, atol=1.6e-2)


def test_results_do_not_depend_on_thread_count(rng):
    feats = _pyramid(rng, 2, 70, (160, 160))
    boxes = [_boxes(rng, 50, (160, 160)) for _ in range(2)]
    levels = [feats[k].requires_grad_() for k in NAMES]
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = maskops.multiscale_roi_align(levels, boxes, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2)
            results.append((out, torch.autograd.grad(out, levels, torch.ones_like(out))))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_cuda_backward_algorithms_skip_rois_that_give_nothing(rng):
    """RoIs with a batch index out of range (the CUDA kernels pool them to zero), NaN boxes or
    boxes far outside the maps add nothing; the deterministic gather (which visits each
    (level, image) group of RoIs only) equals the scatter and the CPU backward of the valid
    RoIs alone."""
    feats = _pyramid(rng, 3, 2, (96, 128), dtype=torch.float64)
    boxes = [_boxes(rng, n, (96, 128)).double() for n in (9, 0, 14)]  # image 1 has no RoI
    levels, rois, args = _rois_and_args(rng, feats, boxes, 3)
    bad = rois[:5].clone()
    bad[0, 0], bad[1, 0], bad[2, 0] = 3.0, -1.0, float("nan")  # batch index out of range
    bad[3, 1:] = float("nan")
    bad[4, 1:] = torch.tensor([1e4, 1e4, 2e4, 2e4], dtype=torch.float64)  # far outside
    mixed = torch.cat([bad[:3], rois, bad[3:]])
    scales, ph, pw, sr, aligned, cs, cl, kmin = args
    sizes = ([f.shape[2] for f in levels], [f.shape[3] for f in levels])
    g = torch.randn(len(mixed), 2, ph, pw, generator=rng, dtype=torch.float64)
    expected = ops._multiscale_roi_align_backward(
        g[3 : 3 + len(rois)], rois, scales, ph, pw, 3, 2, *sizes, sr, aligned, cs, cl, kmin
    )
    for deterministic in (True, False):
        got = testing_ops._multiscale_roi_align_backward_cuda_algo(
            g, mixed, scales, ph, pw, 3, 2, *sizes, sr, aligned, cs, cl, kmin, deterministic
        )
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "dtype,tol",
    [
        (torch.float64, 1e-12),
        (torch.float32, 1e-5),
        (torch.float16, 2e-3),
        (torch.bfloat16, 1.6e-2),
    ],
)
def test_cuda_backward_dtypes_and_layouts_on_cpu(rng, dtype, tol):
    """The CUDA backward's host side on the CPU: every level's gradient in grad's dtype and
    layout (channels-last written directly by the kernels), each its own tensor; the
    deterministic gather gives the same bits in either layout; both bodies match the float64
    CPU backward of the same (rounded) grad within the dtype's rounding."""
    feats = _pyramid(rng, 2, 5, (96, 128), dtype=torch.float64)
    boxes = [_boxes(rng, n, (96, 128)).double() for n in (23, 17)]
    levels, rois, args = _rois_and_args(rng, feats, boxes, 3)
    scales, ph, pw, sr, aligned, cs, cl, kmin = args
    sizes = ([f.shape[2] for f in levels], [f.shape[3] for f in levels])
    g = torch.randn(len(rois), 5, ph, pw, generator=rng, dtype=torch.float64).to(dtype)
    expected = ops._multiscale_roi_align_backward(
        g.double(), rois, scales, ph, pw, 2, 5, *sizes, sr, aligned, cs, cl, kmin
    )
    gathered = {}
    for channels_last in (False, True):
        grad = g.contiguous(memory_format=torch.channels_last) if channels_last else g
        assert grad.is_contiguous() != channels_last
        for det in (True, False):
            got = testing_ops._multiscale_roi_align_backward_cuda_algo(
                grad, rois, scales, ph, pw, 2, 5, *sizes, sr, aligned, cs, cl, kmin, det
            )
            assert len({t.untyped_storage().data_ptr() for t in got}) == len(got)
            for a, e in zip(got, expected):
                assert a.dtype == dtype and a.shape == e.shape
                assert a.is_contiguous(memory_format=torch.channels_last) == channels_last
                assert a.is_contiguous() != channels_last
                torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol)
            if det:
                gathered[channels_last] = got
    for a, b in zip(gathered[False], gathered[True]):
        assert torch.equal(a, b)
    # No RoI: zeros of every level, in grad's dtype.
    for det in (True, False):
        got = testing_ops._multiscale_roi_align_backward_cuda_algo(
            g[:0], rois[:0], scales, ph, pw, 2, 5, *sizes, sr, aligned, cs, cl, kmin, det
        )
        for a, e in zip(got, expected):
            assert a.dtype == dtype and a.shape == e.shape and not a.any()


@pytest.mark.parametrize("aligned,sampling_ratio", [(False, 2), (True, -1), (True, 3)])
def test_cuda_deterministic_gather_tiles_and_term_batches(rng, aligned, sampling_ratio):
    """The deterministic gather's culling (tiles of 16 x 16 cells, bin spans) and its batches
    of 32 terms: 70 copies of one box (every position under it takes more than 32 terms),
    boxes straddling tile edges, inverted boxes (samples moving backwards) and boxes partly
    off the map, on maps of sizes that are not multiples of 16, and an RoI count past one
    64-bit mask word. Equal to the scatter, and to itself bit for bit."""
    feats = _pyramid(rng, 2, 3, (150, 170), dtype=torch.float64)
    boxes = [_boxes(rng, 90, (150, 170)).double(), _boxes(rng, 20, (150, 170)).double()]
    boxes[0][:70] = torch.tensor([60.0, 50.0, 170.0, 148.0], dtype=torch.float64)
    boxes[1][:6] = torch.tensor(
        [
            [63.0, 63.0, 65.0, 129.0],
            [127.5, 0.0, 128.5, 64.5],
            [90.0, 80.0, 30.0, 20.0],
            [140.0, 100.0, 120.0, 40.0],
            [-40.0, -30.0, 50.0, 40.0],
            [150.0, 120.0, 260.0, 230.0],
        ],
        dtype=torch.float64,
    )
    levels, rois, args = _rois_and_args(rng, feats, boxes, 5, sampling_ratio)
    scales, ph, pw, sr, _, cs, cl, kmin = args
    sizes = ([f.shape[2] for f in levels], [f.shape[3] for f in levels])
    g = torch.randn(len(rois), 3, ph, pw, generator=rng, dtype=torch.float64)
    call = lambda det: testing_ops._multiscale_roi_align_backward_cuda_algo(  # noqa: E731
        g, rois, scales, ph, pw, 2, 3, *sizes, sr, aligned, cs, cl, kmin, det
    )
    scatter, gather, again = call(False), call(True), call(True)
    expected = ops._multiscale_roi_align_backward(
        g, rois, scales, ph, pw, 2, 3, *sizes, sr, aligned, cs, cl, kmin
    )
    for a, b, c, e in zip(gather, again, scatter, expected):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
)
def test_opcheck(rng, device):
    """Schema, fake kernel, autograd registration and aliasing: each level's gradient must be
    a tensor of its own, as the fake kernel says (on CUDA too)."""
    feats = OrderedDict((k, v.to(device)) for k, v in _pyramid(rng, 2, 3, (64, 64)).items())
    boxes = [_boxes(rng, 7, (64, 64)).to(device) for _ in range(2)]
    levels, rois, args = _rois_and_args(rng, feats, boxes, 3)
    torch.library.opcheck(ops.multiscale_roi_align.default, (levels, rois, *args))
    torch.library.opcheck(
        ops.multiscale_roi_align.default, ([f.requires_grad_() for f in levels], rois, *args)
    )
    scales, ph, pw, sr, aligned, cs, cl, kmin = args
    grad = torch.randn(rois.shape[0], 3, 3, 3, generator=rng).to(device)
    torch.library.opcheck(
        ops._multiscale_roi_align_backward.default,
        (
            grad,
            rois,
            scales,
            ph,
            pw,
            2,
            3,
            [f.shape[2] for f in levels],
            [f.shape[3] for f in levels],
            sr,
            aligned,
            cs,
            cl,
            kmin,
        ),
    )
    grads = ops._multiscale_roi_align_backward(
        grad,
        rois,
        scales,
        ph,
        pw,
        2,
        3,
        [f.shape[2] for f in levels],
        [f.shape[3] for f in levels],
        sr,
        aligned,
        cs,
        cl,
        kmin,
    )
    assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)
    assert all(g.storage_offset() == 0 for g in grads)


def test_torch_compile(rng):
    torch._dynamo.reset()
    feats = _pyramid(rng, 1, 4, (64, 64))
    boxes = [_boxes(rng, 12, (64, 64))]
    module = maskops.MultiScaleRoIAlign(NAMES, 4, 2)
    f = torch.compile(
        lambda x, b: module(x, b, [(64, 64)]).sum(dim=1), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(f(feats, boxes), module(feats, boxes, [(64, 64)]).sum(dim=1))


def test_repr():
    m = maskops.MultiScaleRoIAlign(["feat1", "feat3"], 3, 2)
    expected = (
        "MultiScaleRoIAlign(featmap_names=['feat1', 'feat3'], output_size=(3, 3), sampling_ratio=2)"
    )
    assert repr(m) == expected


L0 = torch.randn(1, 2, 16, 16)
L1 = torch.randn(1, 2, 8, 8)
B = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]

BAD_CALLS = [
    (
        lambda: maskops.multiscale_roi_align([], B, 2, []),
        TypeError,
        "features must be a non-empty list",
    ),
    (
        lambda: maskops.multiscale_roi_align(L0, B, 2, [1.0]),
        TypeError,
        "features must be a non-empty list",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1[:, :1]], B, 2, [0.25, 0.125]),
        ValueError,
        r"features\[1\] must have the dtype, batch size and channels",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1.double()], B, 2, [0.25, 0.125]),
        ValueError,
        r"features\[1\] must have the dtype",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1[0]], B, 2, [0.25, 0.125]),
        ValueError,
        r"features\[1\] must be a 4-d tensor",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1], B, 2, [0.25]),
        ValueError,
        "one scale per level",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1], B, 2, [0.25, 0.2]),
        ValueError,
        "consecutive powers of two",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1], B, 2, [0.25, 0.0625]),
        ValueError,
        "consecutive powers of two",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1], B, 2, [0.25, -0.125]),
        ValueError,
        r"spatial_scales\[1\]",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0] * 9, B, 2, [0.25] * 9),
        ValueError,
        "at most 8 levels",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1], [B[0][:, :3]], 2, [0.25, 0.125]),
        ValueError,
        r"boxes\[0\] must have shape \[L, 4\]",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1], B, 2, [0.25, 0.125], canonical_scale=0),
        ValueError,
        "canonical_scale",
    ),
    (
        lambda: maskops.multiscale_roi_align([L0, L1], B, 2, [0.25, 0.125], canonical_level="4"),
        TypeError,
        "canonical_level",
    ),
    (
        lambda: maskops.MultiScaleRoIAlign(["0"], 2, 2)([L0], B, [(64, 64)]),
        TypeError,
        "x must be a dict",
    ),
    (
        lambda: maskops.MultiScaleRoIAlign(["a"], 2, 2)({"0": L0}, B, [(64, 64)]),
        ValueError,
        "none of the feature maps",
    ),
    (
        lambda: ops.multiscale_roi_align(
            [L0, L1], torch.zeros(1, 5), [0.25], 2, 2, 2, False, 224.0, 4.0, 2
        ),
        RuntimeError,
        "spatial_scales must have one entry per level",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.cuda
def test_cuda_matches_cpu(rng):
    feats = _pyramid(rng, 2, 8, (128, 96))
    boxes = [_boxes(rng, 30, (128, 96)) for _ in range(2)]
    shapes = [(128, 96)] * 2
    module = maskops.MultiScaleRoIAlign(NAMES, 7, 2)
    results = []
    for device in ("cpu", "cuda"):
        leaves = OrderedDict((k, v.to(device).requires_grad_()) for k, v in feats.items())
        out = module(leaves, [b.to(device) for b in boxes], shapes)
        grads = torch.autograd.grad(out, [leaves[k] for k in NAMES], torch.ones_like(out))
        results.append((out.cpu(), [g.cpu() for g in grads]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
