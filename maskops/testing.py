"""The test-only ops, ``torch.ops.maskops_testing``: the CUDA algorithms run on the CPU.

Each runs a CUDA kernel's functors, or a CUDA wrapper's whole host algorithm, on the CPU, so
that CPU tests check the arithmetic the GPU runs (csrc/README.md lists what each covers).
They take the arguments of the product op they mirror, in ``torch.ops.maskops``; the C++
kernels check their arguments, there is no Python front. Not part of the library: import
this module (it registers the fake kernels, for ``opcheck`` and ``torch.compile``) and call
them through :data:`ops`::

    >>> from maskops.testing import ops
    >>> ops._nms_bitmask(boxes, scores, None, 0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading it registers both libraries)
from .boxes import _decode_fake, _encode_fake
from .nms import _kept_indices_fake
from .rpn import _rpn_fake

__all__ = ["ops", "TEST_ONLY_OPS"]

#: The test-only ops' namespace.
ops = torch.ops.maskops_testing

#: Every test-only op, and the product op whose arguments it takes (or whose part it runs).
TEST_ONLY_OPS = {
    "_multiscale_roi_align_forward_elementwise": "multiscale_roi_align",
    "_multiscale_roi_align_backward_cuda_algo": "_multiscale_roi_align_backward",
    "_paste_masks_elementwise": "paste_masks",
    "_nms_bitmask": "batched_nms",
    "_segmented_nms": "rpn_proposals",
    "_decode_boxes_elementwise": "decode_boxes",
    "_encode_boxes_elementwise": "encode_boxes",
    "_rpn_proposals_elementwise": "rpn_proposals",
}


# ---- fake kernels: the shapes of the product ops they mirror ----


@torch.library.register_fake("maskops_testing::_decode_boxes_elementwise")
def _decode_elementwise_fake(rel_codes, boxes, weights, clamp):
    return _decode_fake(rel_codes, boxes, weights, clamp)


@torch.library.register_fake("maskops_testing::_encode_boxes_elementwise")
def _encode_elementwise_fake(reference_boxes, proposals, weights):
    return _encode_fake(reference_boxes, proposals, weights)


@torch.library.register_fake("maskops_testing::_nms_bitmask")
def _nms_bitmask_fake(
    boxes,
    scores,
    idxs,
    iou_threshold,
    score_threshold=None,
    max_output=None,
    removed_shared_words=None,
):
    return _kept_indices_fake(boxes)


@torch.library.register_fake("maskops_testing::_segmented_nms")
def _segmented_nms_fake(
    boxes, classes, order, valid, seg_len, iou_threshold, max_output, removed_shared_words=None
):
    return (
        boxes.new_empty((valid.size(0) * seg_len,), dtype=torch.int64),
        boxes.new_empty((valid.size(0),), dtype=torch.int64),
    )


torch.library.register_fake("maskops_testing::_rpn_proposals_elementwise")(_rpn_fake)
