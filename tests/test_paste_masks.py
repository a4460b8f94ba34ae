"""Mask paste and COCO RLE: parity with torchvision and pycocotools, registration, bad input."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import maskops
from maskops.testing import ops as testing_ops

ops = torch.ops.maskops


@pytest.fixture
def pycocotools_mask():
    return pytest.importorskip("pycocotools.mask")  # absent on some GPU machines


def _case(generator, n, image, m=28, channels=1, max_side=None):
    h, w = image
    max_side = max_side or max(h, w) * 0.6
    masks = torch.rand(n, channels, m, m, generator=generator)
    side = torch.rand(n, 2, generator=generator) * max_side + 0.1
    # Boxes overlap the image (some cross its borders): torchvision's paste mis-slices boxes
    # lying wholly outside it, so those are tested on their own.
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w, h]) - torch.tensor(
        [w * 0.1, h * 0.1]
    )
    xy = torch.minimum(xy, torch.tensor([w * 0.9, h * 0.9]))
    side = torch.maximum(side, 2.0 - xy.clamp(max=0))  # right/bottom edge inside the image
    boxes = torch.cat([xy, xy + side], dim=1)
    return masks, boxes


def _reference(masks, boxes, image, padding=1):
    """torchvision pastes channel 0 only; paste each channel for multi-channel masks."""
    return torch.cat(
        [tv_paste(masks[:, c : c + 1], boxes, image, padding) for c in range(masks.shape[1])], dim=1
    )


@pytest.mark.parametrize("image", [(120, 160), (97, 61)])
@pytest.mark.parametrize("m,padding", [(28, 1), (14, 0), (7, 2)])
def test_float_output_matches_torchvision(rng, image, m, padding):
    masks, boxes = _case(rng, 40, image, m)
    boxes[0] = torch.tensor([-30.0, -10.0, 50.0, 300.0])  # partly outside
    boxes[1] = torch.tensor([5.0, 5.0, 5.4, 5.2])  # under one pixel
    boxes[2] = torch.tensor([30.0, 30.0, 10.0, 40.0])  # inverted: pastes nothing
    expected = _reference(masks, boxes, image, padding)
    got = maskops.paste_masks(masks, boxes, image, threshold=None, padding=padding)
    assert got.dtype == masks.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        maskops.paste_masks_in_image(masks, boxes, image, padding), expected, rtol=0, atol=1e-5
    )
    # The CUDA kernel's per-pixel body, run on the CPU.
    elementwise = testing_ops._paste_masks_elementwise(
        masks, boxes, image[0], image[1], padding, None, False
    )
    torch.testing.assert_close(elementwise, expected, rtol=0, atol=1e-5)


def test_thresholded_output_agrees_with_thresholded_torchvision(rng):
    """Bool output is `value >= threshold` of the float paste. Pixels can differ only where
    the value lies within float rounding (~1e-7) of the threshold: the fused kernel and ATen's
    upsample may contract different multiply-adds."""
    image = (200, 240)
    masks, boxes = _case(rng, 60, image)
    for threshold in (0.5, 0.3):
        expected = _reference(masks, boxes, image) >= threshold
        got = maskops.paste_masks(masks, boxes, image, threshold=threshold)
        assert got.dtype == torch.bool
        assert (got == expected).float().mean().item() >= 0.9999
        u8 = maskops.paste_masks(masks, boxes, image, threshold=threshold, as_uint8=True)
        assert u8.dtype == torch.uint8 and torch.equal(u8.bool(), got)
        el = testing_ops._paste_masks_elementwise(
            masks, boxes, image[0], image[1], 1, threshold, False
        )
        assert torch.equal(el, got)


def test_multichannel_and_half_masks(rng):
    image = (64, 80)
    masks, boxes = _case(rng, 12, image, channels=3)
    expected = _reference(masks, boxes, image)
    torch.testing.assert_close(
        maskops.paste_masks(masks, boxes, image, None), expected, rtol=0, atol=1e-5
    )
    for dtype, tol in ((torch.float16, 1e-3), (torch.bfloat16, 8e-3)):
        got = maskops.paste_masks(masks.to(dtype), boxes, image, None)
        assert got.dtype == dtype
        ref = _reference(masks.to(dtype).float(), boxes, image)
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)
    # float64 boxes with float32 masks
    torch.testing.assert_close(
        maskops.paste_masks(masks, boxes.double(), image, None), expected, rtol=0, atol=1e-5
    )


def test_boxes_outside_the_image_paste_nothing(rng):
    masks = torch.rand(4, 1, 28, 28, generator=rng)
    boxes = torch.tensor(
        [
            [500.0, 10.0, 600.0, 30.0],
            [10.0, 500.0, 30.0, 600.0],
            [-90.0, 10.0, -40.0, 30.0],
            [10.0, -90.0, 30.0, -40.0],
        ]
    )
    for out in (
        maskops.paste_masks(masks, boxes, (100, 120), None),
        testing_ops._paste_masks_elementwise(masks, boxes, 100, 120, 1, None, False),
    ):
        assert torch.equal(out, torch.zeros_like(out))


def test_empty_and_nan():
    assert maskops.paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (50, 60)).shape == (
        0,
        1,
        50,
        60,
    )
    assert maskops.paste_masks(torch.rand(2, 1, 28, 28), torch.rand(2, 4) * 10, (0, 60)).shape == (
        2,
        1,
        0,
        60,
    )
    masks = torch.rand(2, 1, 28, 28)
    boxes = torch.tensor([[float("nan"), 1.0, 20.0, 20.0], [0.0, 0.0, float("inf"), 10.0]])
    out = maskops.paste_masks(masks, boxes, (30, 30), None)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isfinite(out).all()


def test_results_do_not_depend_on_thread_count(rng):
    masks, boxes = _case(rng, 30, (150, 150))
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(maskops.paste_masks(masks, boxes, (150, 150), None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def _coco_encode(pycocotools_mask, binary):
    return pycocotools_mask.encode(
        np.asfortranarray(binary.numpy().transpose(1, 2, 0).astype(np.uint8))
    )


def test_masks_to_rle_matches_pycocotools(rng, pycocotools_mask):
    masks, boxes = _case(rng, 20, (90, 110))
    binary = maskops.paste_masks(masks, boxes, (90, 110))[:, 0]
    binary[0] = False  # empty
    binary[1] = True  # full
    binary[2, 0, 0] = True  # starts with a one
    ours = maskops.masks_to_rle(binary)
    theirs = _coco_encode(pycocotools_mask, binary)
    assert [r["counts"] for r in ours] == [r["counts"] for r in theirs]
    assert all(r["size"] == [90, 110] for r in ours)
    decoded = pycocotools_mask.decode(ours)
    assert np.array_equal(decoded.transpose(2, 0, 1), binary.numpy().astype(np.uint8))
    # [N, 1, H, W] and uint8 input too; no masks gives no encodings.
    assert [r["counts"] for r in maskops.masks_to_rle(binary[:, None].to(torch.uint8))] == [
        r["counts"] for r in theirs
    ]
    assert maskops.masks_to_rle(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_opcheck_and_compile(rng):
    masks, boxes = _case(rng, 5, (40, 50))
    for threshold, as_uint8 in ((None, False), (0.5, False), (0.5, True)):
        torch.library.opcheck(
            ops.paste_masks.default, (masks, boxes, 40, 50, 1, threshold, as_uint8)
        )
    torch._dynamo.reset()
    f = torch.compile(
        lambda m, b: maskops.paste_masks(m, b, (40, 50)).sum(dim=(1, 2, 3)), fullgraph=True
    )
    torch.testing.assert_close(
        f(masks, boxes), maskops.paste_masks(masks, boxes, (40, 50)).sum(dim=(1, 2, 3))
    )


M1 = torch.rand(2, 1, 28, 28)
B1 = torch.tensor([[1.0, 1.0, 20.0, 20.0], [5.0, 5.0, 30.0, 40.0]])

BAD_CALLS = [
    (lambda: maskops.paste_masks(M1[:, 0], B1, (50, 50)), ValueError, "masks must be a 4-d tensor"),
    (lambda: maskops.paste_masks(M1[..., :27], B1, (50, 50)), ValueError, "masks must be square"),
    (
        lambda: maskops.paste_masks(M1 > 0.5, B1, (50, 50)),
        TypeError,
        "masks must have a floating dtype",
    ),
    (
        lambda: maskops.paste_masks(M1, B1[:1], (50, 50)),
        ValueError,
        r"one row per mask \(2\), got 1",
    ),
    (
        lambda: maskops.paste_masks(M1, B1[:, :3], (50, 50)),
        ValueError,
        r"boxes must have shape \[N, 4\]",
    ),
    (
        lambda: maskops.paste_masks(M1, B1.bool(), (50, 50)),
        TypeError,
        "boxes must have a floating or integer dtype",
    ),
    (lambda: maskops.paste_masks(M1, B1, 50), ValueError, "image_size must be a pair"),
    (lambda: maskops.paste_masks(M1, B1, (50, -1)), ValueError, "image_size must be non-negative"),
    (lambda: maskops.paste_masks(M1, B1, (50, 50.5)), TypeError, r"image_size\[1\] must be an int"),
    (
        lambda: maskops.paste_masks(M1, B1, (50, 50), threshold="0.5"),
        TypeError,
        "threshold must be a number",
    ),
    (
        lambda: maskops.paste_masks(M1, B1, (50, 50), padding=-1),
        ValueError,
        "padding must be non-negative",
    ),
    (
        lambda: maskops.paste_masks(M1, B1.to("meta"), (50, 50)),
        ValueError,
        "boxes must be on the same device",
    ),
    (lambda: maskops.masks_to_rle(M1[:, 0]), TypeError, "masks must be bool or uint8"),
    (
        lambda: maskops.masks_to_rle(torch.zeros(2, 3, 4, 4, dtype=torch.bool)),
        ValueError,
        r"\[N, H, W\]",
    ),
    (lambda: ops.paste_masks(M1, B1[:1], 50, 50, 1, None, False), RuntimeError, "one row per mask"),
    (lambda: ops._masks_to_rle(M1[:, 0]), RuntimeError, "masks must be bool or uint8"),
    (lambda: ops._masks_to_rle(M1 > 0), RuntimeError, r"masks must have shape \[N, H, W\]"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.cuda
def test_cuda_matches_cpu(rng):
    masks, boxes = _case(rng, 50, (300, 200))
    for threshold in (None, 0.5):
        cpu = maskops.paste_masks(masks, boxes, (300, 200), threshold)
        gpu = maskops.paste_masks(masks.cuda(), boxes.cuda(), (300, 200), threshold).cpu()
        if threshold is None:
            torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-6)
        else:
            assert (gpu == cpu).float().mean().item() >= 0.9999


ODD_BOXES = [
    [-30.0, -10.0, 50.0, 300.0],  # partly outside
    [5.0, 5.0, 5.4, 5.2],  # under one pixel
    [30.0, 30.0, 10.0, 40.0],  # inverted: pastes nothing
    [500.0, 10.0, 600.0, 30.0],  # right of the image
    [10.0, -90.0, 30.0, -40.0],  # above it
    [float("nan"), 1.0, 20.0, 20.0],  # NaN: pastes nothing
    [0.0, 0.0, float("inf"), 10.0],  # infinite
    [-3e12, -1e11, 2e12, 5e10],  # far past 32-bit pixel offsets
    [-1e30, 2.0, 1e30, 9.0],  # past int64 after truncation
    [0.0, 0.0, 0.0, 0.0],  # a point
]


@pytest.mark.parametrize("index64", [False, True])
@pytest.mark.parametrize(
    "image,channels",
    [
        ((1, 1), 1),
        ((1, 300), 2),
        ((300, 1), 1),
        ((97, 61), 3),
        ((70, 100), 1),
        ((65, 256), 2),
        ((3, 517), 1),
    ],
)
def test_gpu_tiles_match_cpu_kernel_bit_for_bit(rng, image, channels, index64):
    """The CUDA kernel's tiles (run on the CPU, 256 threads per block one after another, both
    index types) against the production CPU kernel: odd image shapes (one pixel, one row or
    column, widths below, at and above the block's 256 threads, planes of several tiles), C > 1,
    and boxes outside the image, empty, NaN, infinite or past 32-bit offsets."""
    h, w = image
    masks, boxes = _case(rng, 16, image, m=14, channels=channels)
    boxes[: len(ODD_BOXES)] = torch.tensor(ODD_BOXES)
    for threshold, as_uint8 in ((None, False), (0.5, False), (0.5, True)):
        expected = ops.paste_masks(masks, boxes, h, w, 1, threshold, as_uint8)
        got = testing_ops._paste_masks_elementwise(
            masks, boxes, h, w, 1, threshold, as_uint8, index64
        )
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    # float64 boxes and masks, other paddings
    for padding in (0, 2):
        expected = ops.paste_masks(masks.double(), boxes.double(), h, w, padding, None, False)
        got = testing_ops._paste_masks_elementwise(
            masks.double(), boxes.double(), h, w, padding, None, False, index64
        )
        assert torch.equal(got, expected)


@pytest.mark.parametrize("index64", [False, True])
def test_gpu_tiles_boxes_at_tile_edges(rng, index64):
    """A 130 x 64 image has tiles of 64 rows (4096 pixels): boxes whose rows start or end at
    a tile's first or last row (padding 0, so a box's pixel rows are its truncated y1, y2)."""
    rows = [
        (63.5, 63.9),
        (64.2, 64.7),
        (63.0, 64.0),
        (127.0, 128.0),
        (0.0, 0.5),
        (129.1, 129.9),
        (128.0, 135.0),
        (-5.0, 0.2),
        (10.0, 63.99),
        (64.0, 127.99),
    ]
    boxes = torch.tensor([[3.0 + i, y1, 40.0 + i, y2] for i, (y1, y2) in enumerate(rows)])
    masks = torch.rand(len(rows), 2, 7, 7, generator=rng)
    for threshold in (None, 0.5):
        expected = ops.paste_masks(masks, boxes, 130, 64, 0, threshold, False)
        got = testing_ops._paste_masks_elementwise(
            masks, boxes, 130, 64, 0, threshold, False, index64
        )
        assert torch.equal(got, expected)
        assert (expected.flatten(1) != 0).any(1).all()  # every box pastes something


@pytest.mark.parametrize("index64", [False, True])
def test_gpu_tiles_empty_shapes(index64):
    for n, c, h, w in ((0, 1, 50, 60), (2, 0, 50, 60), (2, 1, 0, 60), (2, 1, 50, 0)):
        out = testing_ops._paste_masks_elementwise(
            torch.rand(n, c, 28, 28), torch.rand(n, 4) * 10, h, w, 1, None, False, index64
        )
        assert out.shape == (n, c, h, w)


@pytest.mark.cuda
def test_cuda_odd_shapes_match_cpu(rng):
    """The CUDA kernel's tiles on odd image shapes and boxes (see the CPU twin's test); float
    results may differ in the last bits where the device contracts multiply-adds."""
    for (h, w), channels in (
        ((1, 1), 1),
        ((1, 300), 2),
        ((300, 1), 1),
        ((97, 61), 3),
        ((130, 64), 1),
    ):
        masks, boxes = _case(rng, 16, (h, w), m=14, channels=channels)
        boxes[: len(ODD_BOXES)] = torch.tensor(ODD_BOXES)
        for threshold in (None, 0.5):
            cpu = maskops.paste_masks(masks, boxes, (h, w), threshold)
            gpu = maskops.paste_masks(masks.cuda(), boxes.cuda(), (h, w), threshold).cpu()
            if threshold is None:
                torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-6)
            else:
                assert (gpu == cpu).float().mean().item() >= 0.999


@pytest.mark.cuda
def test_cuda_paste_never_waits(rng):
    masks, boxes = _case(rng, 20, (120, 160))
    masks, boxes = masks.cuda(), boxes.cuda()
    expected = [maskops.paste_masks(masks, boxes, (120, 160), t) for t in (None, 0.5)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [maskops.paste_masks(masks, boxes, (120, 160), t) for t in (None, 0.5)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
