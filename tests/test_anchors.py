"""maskops.generate_anchors / AnchorGenerator against torchvision's AnchorGenerator.

Anchors must be torchvision's bit for bit (values, order, dtype), so that torchvision
detection weights work unchanged.
"""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import maskops
from maskops import anchors as anchors_module

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_RATIOS = ((0.5, 1.0, 2.0),) * 5
FPN_STRIDES = (4, 8, 16, 32, 64)


def fpn_inputs(image_size, batch=1, dtype=torch.float32, device="cpu", strides=FPN_STRIDES):
    """An ImageList padded to image_size and feature maps of a stride-s FPN (ceil division)."""
    h, w = image_size
    images = ImageList(
        torch.zeros(batch, 3, h, w, device=device), [(h - 7 * i, w - 13 * i) for i in range(batch)]
    )
    feats = [
        torch.zeros(batch, 2, math.ceil(h / s), math.ceil(w / s), dtype=dtype, device=device)
        for s in strides
    ]
    return images, feats


def assert_identical(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.device == e.device
        assert torch.equal(g, e), f"max difference {(g.double() - e.double()).abs().max()}"


@pytest.mark.parametrize("image_size", [(800, 800), (800, 1216), (517, 703), (333, 500)])
@pytest.mark.parametrize("batch", [1, 2])
def test_fpn_matches_torchvision(image_size, batch):
    images, feats = fpn_inputs(image_size, batch)
    expected = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    got = maskops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    assert_identical(got, expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_dtypes_match_torchvision(dtype):
    # Half types: torchvision adds int32 shifts and float32-computed cell anchors in the half
    # type; past 2048 pixels that rounds, and maskops must round the same way.
    images, feats = fpn_inputs((1333, 2600), 1, dtype)
    expected = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    got = maskops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    assert_identical(got, expected)


@pytest.mark.parametrize(
    "sizes,ratios,strides",
    [
        # Several sizes per level, ratios whose square roots round (and whose halves land on .5).
        (((16, 40, 100, 333.3),), ((0.3, 0.7, 1.0, 1.7, 3.3),), (8,)),
        # torchvision's flat conventions: one size per level, one ratio list for all levels.
        ((24, 48, 96), (0.25, 1.0, 4.0), (4, 16, 37)),
        # Seven levels, different numbers of sizes and ratios per level.
        (
            ((8,), (16, 20), (32,), (64, 80, 100), (128,), (256,), (512, 1024)),
            ((1.0,), (0.5, 2.0), (0.5, 1.0, 2.0), (1.0,), (0.1, 10.0), (1.0, 3.0), (0.7,)),
            (2, 3, 5, 8, 13, 21, 34),
        ),
        # Odd sizes and ratios that make cell anchor halves exactly x.5 (round half to even).
        (((1, 3, 5, 7, 9, 11),), ((1.0, 4.0, 0.25),), (1,)),
    ],
)
def test_any_levels_sizes_ratios(sizes, ratios, strides):
    images, feats = fpn_inputs((301, 457), 2, strides=strides)
    expected = TVAnchorGenerator(sizes, ratios)(images, feats)
    gen = maskops.AnchorGenerator(sizes, ratios)
    assert_identical(gen(images, feats), expected)
    tv = TVAnchorGenerator(sizes, ratios)
    assert gen.num_anchors_per_location() == tv.num_anchors_per_location()
    assert_identical(gen.cell_anchors, tv.cell_anchors)


def test_methods_match_torchvision():
    tv, mo = (
        TVAnchorGenerator(FPN_SIZES, FPN_RATIOS),
        maskops.AnchorGenerator(FPN_SIZES, FPN_RATIOS),
    )
    assert_identical(
        mo.generate_anchors((10, 20.5), (0.4, 1.3)), tv.generate_anchors((10, 20.5), (0.4, 1.3))
    )
    grid = [(10, 12), (5, 6), (3, 3), (2, 2), (1, 1)]
    strides = [[torch.tensor(4), torch.tensor(5)], [8, 9], (16, 16), [32, 32], [64, 70]]
    tv_strides = [[torch.tensor(int(s)) for s in st] for st in strides]
    assert_identical(mo.grid_anchors(grid, strides), tv.grid_anchors(grid, tv_strides))
    mo.set_cell_anchors(torch.float64, torch.device("cpu"))
    tv.set_cell_anchors(torch.float64, torch.device("cpu"))
    assert_identical(mo.grid_anchors(grid, strides), tv.grid_anchors(grid, tv_strides))
    assert "AnchorGenerator(sizes=" in repr(mo)


def test_generate_anchors_function():
    feature_sizes = [(25, 38), (13, 19)]
    a = maskops.generate_anchors(
        feature_sizes, [32, (64, 60)], [(128, 256), (512,)], [(0.5, 1.0, 2.0), (1.0,)], cache=False
    )
    assert a.shape == (25 * 38 * 6 + 13 * 19 * 1, 4) and a.dtype == torch.float32
    first = a[: 25 * 38 * 6].view(25, 38, 6, 4)
    # Row y, column x, cell anchor k: shift (32 x, 32 y) plus the cell anchor.
    cell = first[0, 0]
    assert torch.equal(first[3, 5], cell + torch.tensor([160.0, 96.0, 160.0, 96.0]))
    second = a[25 * 38 * 6 :].view(13, 19, 4)
    assert torch.equal(second[2, 1] - second[0, 0], torch.tensor([60.0, 128.0, 60.0, 128.0]))
    assert torch.equal(second[0, 0], torch.tensor([-256.0, -256.0, 256.0, 256.0]))
    # Empty levels and zero-size grids are fine.
    empty = maskops.generate_anchors([(0, 5), (2, 2)], [4, 8], [(16,), (32,)], (1.0,), cache=False)
    assert empty.shape == (4, 4)


def test_cache_is_bounded_and_keyed():
    maskops.clear_anchor_cache()
    args = ([(20, 20), (10, 10)], [8, 16], [(32,), (64,)], (0.5, 1.0, 2.0))
    a = maskops.generate_anchors(*args)
    assert maskops.generate_anchors(*args) is a
    assert maskops.generate_anchors(*args, dtype=torch.float64) is not a
    fresh = maskops.generate_anchors(*args, cache=False)
    assert fresh is not a and torch.equal(fresh, a)
    with torch.inference_mode():  # inference tensors must not leak into autograd code
        b = maskops.generate_anchors(*args)
        assert b is not a and b.is_inference()
    assert not maskops.generate_anchors(*args).is_inference()
    for n in range(40):
        maskops.generate_anchors([(n + 1, n + 2)], [4], [(32,)], (1.0,))
    assert len(anchors_module._CACHE) <= anchors_module._CACHE_SIZE
    # The generator caches by image size: the same anchors object for every image and call.
    images, feats = fpn_inputs((256, 320), 2)
    gen = maskops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    out1, out2 = gen(images, feats), gen(images, feats)
    assert out1[0] is out1[1] is out2[0]
    images2, feats2 = fpn_inputs((320, 256), 2)
    assert gen(images2, feats2)[0] is not out1[0]


def test_opcheck():
    sizes = torch.tensor([32.0, 64.0, 96.0])
    ratios = torch.tensor([0.5, 1.0, 2.0, 1.0])
    for dtype in FLOATS:
        torch.library.opcheck(
            torch.ops.maskops.generate_anchors.default,
            (sizes, ratios, [2, 1], [3, 1], [5, 7, 3, 4], [4, 4, 8, 9], dtype),
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(feat):
        return torch.ops.maskops.generate_anchors(
            torch.ones(1) * 32,
            torch.ones(1),
            [1],
            [1],
            [feat.shape[-2], feat.shape[-1]],
            [4, 4],
            torch.float32,
        )

    feat = torch.zeros(1, 1, 6, 9)
    assert torch.equal(
        f(feat), maskops.generate_anchors([(6, 9)], [4], [(32,)], (1.0,), cache=False)
    )


F = [torch.zeros(1, 1, 4, 4)]
IMG = ImageList(torch.zeros(1, 3, 16, 16), [(16, 16)])
BAD = [
    (lambda: maskops.generate_anchors([(4, 4)], [4, 8], [(32,)], (1.0,)), ValueError, "strides"),
    (
        lambda: maskops.generate_anchors([(4, 4), (2, 2)], [4, 8], [(32,)], (1.0,)),
        ValueError,
        "sizes",
    ),
    (
        lambda: maskops.generate_anchors([(4, 4)], [4], [(32,)], [(1.0,), (2.0,)]),
        ValueError,
        "aspect_ratios",
    ),
    (
        lambda: maskops.generate_anchors([(4, -1)], [4], [(32,)], (1.0,)),
        ValueError,
        "feature_sizes",
    ),
    (lambda: maskops.generate_anchors([(4,)], [4], [(32,)], (1.0,)), ValueError, "feature_sizes"),
    (lambda: maskops.generate_anchors([(4, 4)], [-4], [(32,)], (1.0,)), ValueError, "strides"),
    (lambda: maskops.generate_anchors([(4, 4)], [4.5], [(32,)], (1.0,)), TypeError, "strides"),
    (lambda: maskops.generate_anchors([(4, 4)], [4], [(-32,)], (1.0,)), ValueError, "sizes"),
    (lambda: maskops.generate_anchors([(4, 4)], [4], [(0,)], (1.0,)), ValueError, "sizes"),
    (lambda: maskops.generate_anchors([(4, 4)], [4], [()], (1.0,)), ValueError, "sizes"),
    (lambda: maskops.generate_anchors([(4, 4)], [4], [(32,)], (0.0,)), ValueError, "aspect_ratios"),
    (
        lambda: maskops.generate_anchors([(4, 4)], [4], [(32,)], (math.nan,)),
        ValueError,
        "aspect_ratios",
    ),
    (lambda: maskops.generate_anchors([(4, 4)], [4], [("a",)], (1.0,)), TypeError, "sizes"),
    (
        lambda: maskops.generate_anchors([(4, 4)], [4], [(32,)], (1.0,), dtype=torch.int64),
        TypeError,
        "dtype",
    ),
    (lambda: maskops.AnchorGenerator(((32,), (64,)), ((1.0,),) * 3), ValueError, "aspect_ratios"),
    (lambda: maskops.AnchorGenerator(((-32,),), ((1.0,),)), ValueError, "sizes"),
    (
        lambda: maskops.AnchorGenerator(((32,), (64,)), ((1.0,),) * 2)(IMG, F),
        ValueError,
        "feature_maps",
    ),
    (
        lambda: maskops.AnchorGenerator(((32,),), ((1.0,),))(IMG, [F[0].long()]),
        TypeError,
        "feature_maps",
    ),
    (
        lambda: maskops.AnchorGenerator(((32,),), ((1.0,),))(IMG, [torch.zeros(1, 1, 0, 4)]),
        ValueError,
        "feature_maps",
    ),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case):
    fn, err, name = BAD[case]
    with pytest.raises(err, match=name):
        fn()


S, R = torch.tensor([32.0]), torch.tensor([1.0])
BAD_DIRECT = [
    (
        lambda: torch.ops.maskops.generate_anchors(
            S, R, [1, 1], [1], [4, 4], [4, 4], torch.float32
        ),
        "ratios_per_level",
    ),
    (
        lambda: torch.ops.maskops.generate_anchors(S, R, [1], [1], [4], [4, 4], torch.float32),
        "grid_sizes",
    ),
    (
        lambda: torch.ops.maskops.generate_anchors(S, R, [1], [1], [4, 4], [4], torch.float32),
        "strides",
    ),
    (
        lambda: torch.ops.maskops.generate_anchors(S, R, [2], [1], [4, 4], [4, 4], torch.float32),
        "sizes",
    ),
    (
        lambda: torch.ops.maskops.generate_anchors(S, R, [1], [1], [4, -4], [4, 4], torch.float32),
        "grid_sizes",
    ),
    (
        lambda: torch.ops.maskops.generate_anchors(
            S.long(), R, [1], [1], [4, 4], [4, 4], torch.float32
        ),
        "sizes",
    ),
    (
        lambda: torch.ops.maskops.generate_anchors(
            S, R[None], [1], [1], [4, 4], [4, 4], torch.float32
        ),
        "aspect_ratios",
    ),
    (
        lambda: torch.ops.maskops.generate_anchors(S, R, [1], [1], [4, 4], [4, 4], torch.int32),
        "dtype",
    ),
]


@pytest.mark.parametrize("case", range(len(BAD_DIRECT)))
def test_bad_input_direct(case):
    fn, name = BAD_DIRECT[case]
    with pytest.raises(RuntimeError, match=name):
        fn()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_matches_torchvision(dtype):
    images, feats = fpn_inputs((800, 1216), 2, dtype, device="cuda")
    expected = TVAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    got = maskops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)
    assert_identical(got, expected)


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck():
    sizes = torch.tensor([32.0, 64.0, 96.0], device="cuda")
    ratios = torch.tensor([0.5, 1.0, 2.0, 1.0], device="cuda")
    torch.library.opcheck(
        torch.ops.maskops.generate_anchors.default,
        (sizes, ratios, [2, 1], [3, 1], [5, 7, 3, 4], [4, 4, 8, 9], torch.float32),
    )


@pytest.mark.cuda
@needs_cuda
def test_cuda_cache_miss_never_waits():
    """A cache miss copies the sizes and ratios from pinned memory: no host synchronisation
    (a tensor made from a host list on the device directly would be a blocking copy)."""
    images, feats = fpn_inputs((800, 1216), 2, device="cuda")
    maskops.generate_anchors([(6, 9)], [4], [(32,)], (1.0,), device="cuda", cache=False)  # warm-up
    expected = maskops.generate_anchors(
        [f.shape[-2:] for f in feats], FPN_STRIDES, FPN_SIZES, FPN_RATIOS[0], cache=False
    )
    anchors_module.clear_anchor_cache()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = maskops.generate_anchors(
            [f.shape[-2:] for f in feats],
            FPN_STRIDES,
            FPN_SIZES,
            FPN_RATIOS[0],
            device="cuda",
            cache=False,
        )
        per_image = maskops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, feats)  # a miss, cached
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got.cpu(), expected)
    assert all(torch.equal(a.cpu(), expected) for a in per_image)


@pytest.mark.cuda
@needs_cuda
def test_cuda_set_cell_anchors_never_waits():
    gen = maskops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    expected = [a.double() for a in gen.cell_anchors]
    torch.cuda.set_sync_debug_mode("error")
    try:
        gen.set_cell_anchors(torch.float64, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(a.device.type == "cuda" and a.dtype == torch.float64 for a in gen.cell_anchors)
    assert all(torch.equal(a.cpu(), e) for a, e in zip(gen.cell_anchors, expected))
