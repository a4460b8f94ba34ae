"""RoIAlign: parity with torchvision, gradients, registration, layouts and bad input."""

import pytest
import torch
import torchvision

import maskops
from maskops.testing import ops as testing_ops

from helpers import random_rois

tv_roi_align = torchvision.ops.roi_align
ops = torch.ops.maskops

# (N, C, H, W), output_size, spatial_scale, image size the boxes are drawn in
SHAPES = [
    ((1, 1, 7, 9), 3, 1.0, (7, 9)),
    ((2, 3, 10, 12), (4, 5), 0.5, (20, 24)),
    ((2, 16, 25, 19), 7, 1 / 8, (200, 152)),
    ((3, 5, 32, 32), (14, 14), 1 / 4, (128, 128)),
    ((1, 40, 13, 50), (2, 9), 1 / 16, (208, 800)),  # channel count not a multiple of 16
]


def _features(shape, generator, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype)


@pytest.mark.parametrize("shape,output_size,scale,image", SHAPES)
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_matches_torchvision(
    rng, shape, output_size, scale, image, sampling_ratio, aligned
):
    x = _features(shape, rng)
    rois = random_rois(37, shape[0], image, rng, outside=True)
    expected = tv_roi_align(x, rois, output_size, scale, sampling_ratio, aligned)
    got = maskops.roi_align(x, rois, output_size, scale, sampling_ratio, aligned)
    assert got.shape == expected.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The CUDA kernel's per-element body, run on the CPU, agrees too.
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    elementwise = testing_ops._multiscale_roi_align_forward_elementwise(
        [x], rois, [scale], ph, pw, sampling_ratio, aligned, 224.0, 4.0, 0
    )
    torch.testing.assert_close(elementwise, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_degenerate_boxes_match_torchvision(rng, aligned, sampling_ratio):
    x = _features((2, 4, 12, 15), rng)
    rois = torch.tensor(
        [
            [0, 5.0, 5.0, 5.0, 5.0],  # zero size
            [1, 3.0, 4.0, 3.0, 9.0],  # zero width
            [0, 9.0, 9.0, 2.0, 3.0],  # inverted
            [1, -40.0, -40.0, -20.0, -30.0],  # fully outside, before the map
            [0, 30.0, 30.0, 60.0, 50.0],  # fully outside, past the map
            [1, -5.0, -3.0, 6.0, 40.0],  # partly outside
            [0, 0.0, 0.0, 15.0, 12.0],  # exactly the map
            [1, 14.0, 11.0, 15.0, 12.0],  # last cell
        ]
    )
    for scale in (1.0, 0.5):
        expected = tv_roi_align(x, rois, (3, 4), scale, sampling_ratio, aligned)
        got = maskops.roi_align(x, rois, (3, 4), scale, sampling_ratio, aligned)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_list_of_boxes_equals_tensor_form(rng):
    x = _features((3, 6, 20, 20), rng)
    per_image = [random_rois(n, 1, (80, 80), rng)[:, 1:] for n in (4, 0, 7)]
    got = maskops.roi_align(x, per_image, 5, 0.25, 2, True)
    expected = tv_roi_align(x, per_image, 5, 0.25, 2, True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(per_image)]
    )
    torch.testing.assert_close(got, maskops.roi_align(x, rois, 5, 0.25, 2, True))


def test_empty_inputs():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = maskops.roi_align(x, torch.zeros(0, 5), 4, 1.0, 2)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert maskops.roi_align(x, [], 4).shape == (0, 3, 4, 4)
    assert maskops.roi_align(x, [torch.zeros(0, 4), torch.zeros(0, 4)], 4).shape == (0, 3, 4, 4)
    # Zero channels and a zero-sized map are valid too.
    assert maskops.roi_align(
        torch.randn(1, 0, 8, 8), torch.tensor([[0, 1.0, 1, 5, 5]]), 2
    ).shape == (1, 0, 2, 2)
    empty_map = maskops.roi_align(torch.randn(1, 2, 0, 5), torch.tensor([[0, 1.0, 1, 5, 5]]), 2)
    assert torch.equal(empty_map, torch.zeros(1, 2, 2, 2))


def test_nan_and_huge_boxes_are_safe():
    x = torch.randn(1, 2, 10, 10)
    rois = torch.tensor(
        [
            [0, float("nan"), 1.0, 5.0, 5.0],
            [0, 1.0, 1.0, float("inf"), 5.0],
            [0, -1e30, -1e30, 1e30, 1e30],
        ]
    )
    out = maskops.roi_align(x, rois, 3, 1.0, -1, True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_torchvision(rng, aligned, sampling_ratio, dtype):
    x = _features((2, 5, 15, 17), rng, dtype)
    rois = random_rois(23, 2, (60, 68), rng, dtype, outside=True)
    grad = torch.randn(23, 5, 6, 4, generator=rng).to(dtype)
    x1 = x.clone().requires_grad_()
    maskops.roi_align(x1, rois, (6, 4), 0.25, sampling_ratio, aligned).backward(grad)
    x2 = x.clone().requires_grad_()
    tv_roi_align(x2, rois, (6, 4), 0.25, sampling_ratio, aligned).backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=tol)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_backward_algorithms_on_cpu(rng, deterministic, aligned):
    """The CUDA backward bodies (atomic scatter; deterministic gather) against torchvision."""
    x = _features((3, 4, 11, 14), rng, torch.float64).requires_grad_()
    rois = random_rois(29, 3, (44, 56), rng, torch.float64, outside=True)
    grad = torch.randn(29, 4, 5, 3, generator=rng, dtype=torch.float64)
    tv_roi_align(x, rois, (5, 3), 0.25, -1, aligned).backward(grad)
    (got,) = testing_ops._multiscale_roi_align_backward_cuda_algo(
        grad, rois, [0.25], 5, 3, 3, 4, [11], [14], -1, aligned, 224.0, 4.0, 0, deterministic
    )
    torch.testing.assert_close(got, x.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(rng, aligned):
    x = _features((2, 3, 6, 7), rng, torch.float64).requires_grad_()
    rois = random_rois(5, 2, (12, 14), rng, torch.float64, outside=True)
    assert torch.autograd.gradcheck(
        lambda t: maskops.roi_align(t, rois, (3, 2), 0.5, -1, aligned), (x,)
    )
    assert torch.autograd.gradcheck(
        lambda t: maskops.roi_align(t, rois, (3, 2), 0.5, 2, aligned), (x,)
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_types_match_float32(rng, dtype, tol):
    """Half inputs compute in float32, so only the output's final rounding differs."""
    x = _features((2, 8, 16, 16), rng, dtype)
    rois = random_rois(19, 2, (64, 64), rng)
    got = maskops.roi_align(x, rois, 7, 0.25, 2, True)
    assert got.dtype == dtype
    expected = maskops.roi_align(x.float(), rois, 7, 0.25, 2, True)
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    # Backward too: the gradient is accumulated in float32 and rounded once.
    xh = x.clone().requires_grad_()
    g = torch.randn(19, 8, 7, 7, generator=rng)
    maskops.roi_align(xh, rois, 7, 0.25, 2, True).backward(g.to(dtype))
    xf = x.float().requires_grad_()
    maskops.roi_align(xf, rois, 7, 0.25, 2, True).backward(g.to(dtype).float())
    assert xh.grad.dtype == dtype
    torch.testing.assert_close(xh.grad.float(), xf.grad, rtol=tol, atol=tol)


def test_float64_boxes_with_float32_features(rng):
    """Boxes may have another floating dtype than the features (torchvision requires equal)."""
    x = _features((1, 4, 20, 20), rng)
    rois = random_rois(9, 1, (80, 80), rng, torch.float64)
    expected = tv_roi_align(x, rois.float(), 5, 0.25, 2, True)
    torch.testing.assert_close(
        maskops.roi_align(x, rois, 5, 0.25, 2, True), expected, rtol=0, atol=1e-5
    )


def test_channels_last_and_strided_inputs(rng):
    x = _features((2, 24, 18, 20), rng)
    rois = random_rois(15, 2, (72, 80), rng)
    expected = maskops.roi_align(x, rois, 6, 0.25, 2, True)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = maskops.roi_align(x_cl, rois, 6, 0.25, 2, True)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.backward(torch.ones_like(out))
    assert x_cl.grad.is_contiguous(memory_format=torch.channels_last)
    x_plain = x.clone().requires_grad_()
    maskops.roi_align(x_plain, rois, 6, 0.25, 2, True).backward(torch.ones_like(expected))
    torch.testing.assert_close(x_cl.grad, x_plain.grad, rtol=0, atol=1e-5)
    # A sliced (non-contiguous) input and the elementwise path, which reads through strides.
    wide = _features((2, 24, 18, 40), rng)
    sliced = wide[:, :, :, ::2]
    torch.testing.assert_close(
        maskops.roi_align(sliced, rois, 6, 0.25, 2, True),
        tv_roi_align(sliced.contiguous(), rois, 6, 0.25, 2, True),
        rtol=0,
        atol=1e-5,
    )
    torch.testing.assert_close(
        testing_ops._multiscale_roi_align_forward_elementwise(
            [sliced], rois, [0.25], 6, 6, 2, True, 224.0, 4.0, 0
        ),
        tv_roi_align(sliced.contiguous(), rois, 6, 0.25, 2, True),
        rtol=0,
        atol=1e-5,
    )


def test_results_do_not_depend_on_thread_count(rng):
    x = _features((2, 70, 20, 20), rng).requires_grad_()
    rois = random_rois(64, 2, (160, 160), rng)
    g = torch.randn(64, 70, 7, 7, generator=rng)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = maskops.roi_align(x, rois, 7, 1 / 8, 2, True)
            (grad,) = torch.autograd.grad(out, x, g)
            results.append((out, grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_module_matches_torchvision_module(rng):
    x = _features((2, 8, 16, 16), rng)
    rois = random_rois(11, 2, (64, 64), rng)
    ours = maskops.RoIAlign((5, 5), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    theirs = torchvision.ops.RoIAlign((5, 5), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(ours(x, rois), theirs(x, rois), rtol=0, atol=1e-5)
    assert repr(ours) == (
        "RoIAlign(output_size=(5, 5), spatial_scale=0.25, sampling_ratio=2, aligned=True)"
    )


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 9, 11, generator=g, dtype=dtype)
        rois = random_rois(6, 2, (36, 44), g, dtype)
        yield (x, rois, 0.25, 3, 4, 2, True)
        yield (x.requires_grad_(), rois, 0.25, 2, 2, -1, False)
        yield (x.detach().contiguous(memory_format=torch.channels_last), rois, 0.5, 2, 3, 0, True)
        yield (x.detach(), rois[:0], 0.25, 2, 2, 2, True)


@pytest.mark.parametrize("args", list(_opcheck_samples()))
def test_opcheck_roi_align(args):
    torch.library.opcheck(ops.roi_align.default, args)


def test_opcheck_backward():
    g = torch.Generator().manual_seed(1)
    rois = random_rois(6, 2, (36, 44), g)
    for grad in (
        torch.randn(6, 3, 4, 5, generator=g),
        torch.randn(6, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
    ):
        torch.library.opcheck(
            ops._roi_align_backward.default, (grad, rois, 0.25, 4, 5, 2, 3, 9, 11, 2, True)
        )


def test_torch_compile_fullgraph(rng):
    torch._dynamo.reset()

    def pool(x, rois):
        return maskops.roi_align(x, rois, 5, 0.25, 2, True).relu().sum(dim=(2, 3))

    x = _features((2, 6, 20, 20), rng).requires_grad_()
    rois = random_rois(9, 2, (80, 80), rng)
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    got = compiled(x, rois)
    expected = pool(x, rois)
    torch.testing.assert_close(got, expected)
    (g1,) = torch.autograd.grad(got.sum(), x)
    (g2,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g1, g2)
    # Another RoI count reuses the graph with a dynamic size.
    rois2 = random_rois(13, 2, (80, 80), rng)
    torch.testing.assert_close(compiled(x, rois2), pool(x, rois2))


def test_torch_compile_inductor(rng):
    torch._dynamo.reset()
    f = torch.compile(lambda x, r: maskops.roi_align(x, r, 4, 0.5, 2, False) * 2, fullgraph=True)
    x = _features((1, 3, 10, 10), rng)
    rois = random_rois(5, 1, (20, 20), rng)
    torch.testing.assert_close(f(x, rois), maskops.roi_align(x, rois, 4, 0.5, 2, False) * 2)


def test_export(rng):
    class Pool(torch.nn.Module):
        def forward(self, x, rois):
            return maskops.roi_align(x, rois, 3, 0.5, 2, True)

    x = _features((1, 3, 10, 10), rng)
    rois = random_rois(4, 1, (20, 20), rng)
    ep = torch.export.export(Pool(), (x, rois))
    torch.testing.assert_close(ep.module()(x, rois), Pool()(x, rois))


# ---- bad input: clear Python errors before any kernel runs ----

X = torch.randn(2, 3, 8, 8)
R = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])

BAD_CALLS = [
    (lambda: maskops.roi_align([1, 2], R, 2), TypeError, "input must be a torch.Tensor"),
    (lambda: maskops.roi_align(X.long(), R, 2), TypeError, "input must have a floating dtype"),
    (lambda: maskops.roi_align(X[0], R, 2), ValueError, r"input must be a 4-d tensor"),
    (lambda: maskops.roi_align(X, R[:, :4], 2), ValueError, r"boxes .* shape \[K, 5\]"),
    (lambda: maskops.roi_align(X, R[0], 2), ValueError, r"boxes .* shape \[K, 5\]"),
    (lambda: maskops.roi_align(X, R.long(), 2), TypeError, "boxes must have a floating dtype"),
    (
        lambda: maskops.roi_align(X, [R[:, 1:], R], 2),
        ValueError,
        r"boxes\[1\] must have shape \[L, 4\]",
    ),
    (lambda: maskops.roi_align(X, "boxes", 2), TypeError, "boxes must be a Tensor"),
    (lambda: maskops.roi_align(X, R, -2), ValueError, "output_size must be positive"),
    (lambda: maskops.roi_align(X, R, (2, 0)), ValueError, r"output_size\[1\] must be positive"),
    (
        lambda: maskops.roi_align(X, R, (2, 2, 2)),
        ValueError,
        "output_size must be an int or a pair",
    ),
    (lambda: maskops.roi_align(X, R, 2.5), TypeError, "output_size must be an int"),
    (
        lambda: maskops.roi_align(X, R, 2, spatial_scale=0.0),
        ValueError,
        "spatial_scale must be a finite positive",
    ),
    (lambda: maskops.roi_align(X, R, 2, spatial_scale=float("nan")), ValueError, "spatial_scale"),
    (
        lambda: maskops.roi_align(X, R, 2, sampling_ratio=1.5),
        TypeError,
        "sampling_ratio must be an int",
    ),
    (lambda: maskops.roi_align(X, R, 2, aligned=1), TypeError, "aligned must be a bool"),
    (
        lambda: maskops.roi_align(X, torch.tensor([[2, 1.0, 1, 5, 5]]), 2),
        ValueError,
        r"boxes\[0, 0\] \(batch index\) is 2.0, expected an index in \[0, 2\)",
    ),
    (
        lambda: maskops.roi_align(X, torch.tensor([[-1, 1.0, 1, 5, 5]]), 2),
        ValueError,
        "batch index",
    ),
    (
        lambda: maskops.roi_align(X, torch.tensor([[float("nan"), 1.0, 1, 5, 5]]), 2),
        ValueError,
        "batch index",
    ),
    (lambda: maskops.roi_align(X, R.to("meta"), 2), ValueError, "boxes must be on the same device"),
    (lambda: maskops.RoIAlign(0, 1.0, 2), ValueError, "output_size must be positive"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_direct_op_calls_check_arguments():
    """Callers of torch.ops.maskops bypass the Python checks; the kernels check too."""
    with pytest.raises(RuntimeError, match="rois must have shape"):
        ops.roi_align(X, R[:, :4], 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="batch index"):
        ops.roi_align(X, torch.tensor([[5, 1.0, 1, 5, 5]]), 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        ops.roi_align(X, R, 1.0, 0, 2, 2, True)
    with pytest.raises(RuntimeError, match="input must have 4 dimensions"):
        ops.roi_align(X[0], R, 1.0, 2, 2, 2, True)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops._roi_align_backward(torch.randn(2, 3, 2, 2), R, 1.0, 2, 2, 2, 3, 8, 8, 2, True)


# ---- CUDA (skipped without a GPU): each case also runs on the CPU and is compared ----


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(rng, dtype, channels_last):
    x = _features((2, 20, 25, 30), rng, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = random_rois(50, 2, (100, 120), rng, outside=True)
    g = torch.randn(50, 20, 7, 7, generator=rng).to(dtype)
    results = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_()
        out = maskops.roi_align(xd, rois.to(device), 7, 0.25, 2, True)
        out.backward(g.to(device))
        results[device] = (out.cpu().float(), xd.grad.cpu().float())
        assert out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[
        dtype
    ]
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=tol, atol=tol)
    torch.testing.assert_close(results["cuda"][1], results["cpu"][1], rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_matches_torchvision(rng):
    x = _features((2, 16, 25, 19), rng).cuda()
    rois = random_rois(40, 2, (200, 152), rng, outside=True).cuda()
    for aligned in (False, True):
        torch.testing.assert_close(
            maskops.roi_align(x, rois, 7, 1 / 8, -1, aligned),
            tv_roi_align(x, rois, 7, 1 / 8, -1, aligned),
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.cuda
def test_cuda_deterministic_backward_is_bitwise_repeatable(rng):
    x = _features((2, 32, 30, 30), rng).cuda().requires_grad_()
    rois = random_rois(300, 2, (120, 120), rng).cuda()
    g = torch.randn(300, 32, 7, 7, generator=rng).cuda()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = [
            torch.autograd.grad(maskops.roi_align(x, rois, 7, 0.25, 2, True), x, g)[0]
            for _ in range(3)
        ]
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])
    xc = x.detach().cpu().requires_grad_()
    maskops.roi_align(xc, rois.cpu(), 7, 0.25, 2, True).backward(g.cpu())
    torch.testing.assert_close(grads[0].cpu(), xc.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_out_of_range_batch_index_pools_zero():
    x = torch.randn(1, 2, 8, 8, device="cuda")
    rois = torch.tensor([[3, 1.0, 1, 5, 5], [0, 1.0, 1, 5, 5]], device="cuda")
    out = torch.ops.maskops.roi_align(x, rois, 1.0, 2, 2, 2, True)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
