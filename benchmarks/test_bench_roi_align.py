"""pytest-benchmark entries: `pytest benchmarks --benchmark-only` (compare runs with
--benchmark-compare). CI runs them once with --benchmark-disable so they cannot rot."""

import pytest
import torch
import torchvision

import maskops
from benchmarks.bench_roi_align import workload

ARGS = (14, 1 / 16, 2, True)


@pytest.fixture(scope="module")
def data():
    return workload("cpu")


@pytest.mark.parametrize("impl", ["maskops", "torchvision"])
def test_roi_align_forward(benchmark, data, impl):
    x, r = data
    fn = maskops.roi_align if impl == "maskops" else torchvision.ops.roi_align
    out = benchmark(fn, x, r, *ARGS)
    assert out.shape == (r.shape[0], x.shape[1], 14, 14)


@pytest.mark.parametrize("impl", ["maskops", "torchvision"])
def test_roi_align_backward(benchmark, data, impl):
    x, r = data
    op = torch.ops.maskops if impl == "maskops" else torch.ops.torchvision
    grad = torch.randn(r.shape[0], x.shape[1], 14, 14)
    n, c, h, w = x.shape
    out = benchmark.pedantic(
        op._roi_align_backward,
        (grad, r, 1 / 16, 14, 14, n, c, h, w, 2, True),
        rounds=1 if impl == "torchvision" else 5,
    )
    assert out.shape == x.shape
