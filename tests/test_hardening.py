"""Long-running-use properties: no leaks over many calls, thread safety, results independent of
the thread count, and indexing past 32 bits."""

import threading

import pytest
import torch

import maskops


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _workloads(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 20, 20, generator=g).to(device)
    xy = torch.rand(40, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 30 + 1], dim=1)
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), boxes], dim=1).to(device)
    boxes = boxes.to(device)
    scores = torch.rand(40, generator=g).to(device)
    idxs = torch.randint(0, 5, (40,), generator=g).to(device)
    levels = [torch.randn(1, 8, 32 // 2**i, 32 // 2**i, generator=g).to(device) for i in range(3)]
    masks = torch.rand(40, 1, 28, 28, generator=g).to(device)
    xg = x.clone().requires_grad_()

    def roi_align_fwd_bwd():
        out = maskops.roi_align(xg, rois, 5, 0.25, 2, True)
        torch.autograd.grad(out.sum(), xg)
        return out

    return {
        "roi_align": roi_align_fwd_bwd,
        "multiscale_roi_align": lambda: maskops.multiscale_roi_align(
            levels, [boxes], 4, [0.5, 0.25, 0.125], 2
        ),
        "nms": lambda: maskops.nms(boxes, scores, 0.5),
        "batched_nms": lambda: maskops.batched_nms(boxes, scores, idxs, 0.5),
        "box_iou": lambda: maskops.box_iou(boxes, boxes),
        "paste_masks": lambda: maskops.paste_masks(masks, boxes, (100, 100)),
        "masks_to_rle": lambda: maskops.masks_to_rle(
            torch.zeros(4, 30, 30, dtype=torch.bool)
        ),  # CPU only
        # Outputs of megabytes come from maskops' CPU buffer cache (maskops/memory.py).
        "paste_masks_large": lambda: maskops.paste_masks(masks[:6], boxes[:6], (900, 1000)),
        "multiscale_roi_align_large": lambda: maskops.multiscale_roi_align(
            levels, [boxes.repeat(8, 1)], 14, [0.5, 0.25, 0.125], 2
        ),
    }


@pytest.mark.parametrize("name", list(_workloads()))
def test_repeated_calls_keep_memory_flat(name):
    fn = _workloads()[name]
    for _ in range(200):  # warm up allocator caches
        fn()
    start = _rss_mb()
    for _ in range(1000):
        fn()
    growth = _rss_mb() - start
    assert growth < 8.0, f"{name}: RSS grew {growth:.1f} MB over 1000 calls"


@pytest.mark.parametrize("name", list(_workloads()))
def test_concurrent_calls_match_serial(name):
    fn = _workloads()[name]
    expected = fn()
    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(fn())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        if isinstance(r, torch.Tensor):
            assert torch.equal(r, expected)
        else:
            assert r == expected


@pytest.mark.parametrize("name", list(_workloads()))
def test_bit_identical_for_one_and_two_threads(name):
    fn = _workloads()[name]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = fn()
        torch.set_num_threads(2)
        b = fn()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name",
    ["roi_align", "multiscale_roi_align", "nms", "batched_nms", "paste_masks", "paste_masks_large"],
)
def test_cuda_memory_stays_flat(name):
    """1,000 calls on the GPU: allocated memory returns to where it was (no leak)."""
    fn = _workloads("cuda")[name]
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for _ in range(1000):
        fn()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - start < 1 << 20


def test_paste_indexes_past_32_bits():
    """One bool mask of 65,537 x 32,769 pixels: 2^31 + ~98k elements. A box in the last rows
    must land exactly where the same box lands, shifted, in a small image."""
    h, w = 65537, 32769
    assert h * w > 2**31
    mask = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    box = torch.tensor([[w - 60.0, h - 50.0, w - 10.0, h - 5.0]])
    big = maskops.paste_masks(mask, box, (h, w))
    small = maskops.paste_masks(
        mask, box - torch.tensor([[w - 100.0, h - 100.0, w - 100.0, h - 100.0]]), (100, 100)
    )
    assert torch.equal(big[0, 0, h - 100 :, w - 100 :], small[0, 0])
    assert int(small.sum()) > 0
    # Nothing set elsewhere. (any(), not sum(): a bool sum widens to a 17 GB int64 copy.)
    assert not big[0, 0, : h - 100].any() and not big[0, 0, h - 100 :, : w - 100].any()
    del big
