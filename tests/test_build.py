"""The package's build metadata."""

import re

import torch

import maskops


def test_version_and_build_info():
    assert re.fullmatch(r"\d+\.\d+\.\d+", maskops.__version__)
    info = maskops.build_info()
    assert info["version"] == maskops.__version__
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["with_cuda"] == maskops.has_cuda() == info["has_cuda_kernels"]
    if info["with_cuda"]:
        assert info["cuda_arch_list"]


def test_every_op_has_a_cpu_kernel():
    for op in ("roi_align", "_roi_align_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskops::{op}", "CPU")


def _ops_of(namespace):
    return {
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.split("::", 1)[0] == namespace
    }


# The library's ops: the product, its backward passes and internals, nothing test-only.
PRODUCT_OPS = {
    "roi_align",
    "_roi_align_backward",
    "multiscale_roi_align",
    "_multiscale_roi_align_backward",
    "paste_masks",
    "_masks_to_rle",
    "nms",
    "batched_nms",
    "box_area",
    "box_iou",
    "generate_anchors",
    "decode_boxes",
    "encode_boxes",
    "clip_boxes",
    "remove_small_boxes",
    "rpn_proposals",
    "_cpu_cache_release",
    "_cpu_cache_stats",
    "_cpu_cache_set_limit",
    "_cpu_cache_route_torch",
    "_cpu_cache_torch_allocator",
}


def test_maskops_namespace_holds_the_product_alone():
    from maskops.testing import TEST_ONLY_OPS

    assert _ops_of("maskops") == PRODUCT_OPS
    assert not _ops_of("maskops") & set(TEST_ONLY_OPS)


def test_test_only_ops_live_in_their_own_namespace():
    from maskops.testing import TEST_ONLY_OPS, ops

    assert _ops_of("maskops_testing") == set(TEST_ONLY_OPS)
    for name, twin_of in TEST_ONLY_OPS.items():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"maskops_testing::{name}", "CPU")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"maskops_testing::{name}", "CUDA"
        )
        assert twin_of in PRODUCT_OPS
        assert getattr(ops, name).default.name() == f"maskops_testing::{name}"
