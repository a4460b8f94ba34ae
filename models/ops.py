"""Every op the model needs, in one place: the maskops implementations.

The rest of ``models/`` calls these names only, never torchvision's detection ops or
``torch.ops.maskops`` directly, so the model's use of maskops can be read off this file.
Boxes are ``(x1, y1, x2, y2)`` in image pixels throughout.
"""

from __future__ import annotations

import math

import torch

import maskops

# Box regression deltas are clamped at log(1000 / 16) before exp(), as in Detectron and
# torchvision, so that one wild delta cannot produce an infinite box.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# RoIAlign (box head 7x7 and mask head 14x14, all FPN levels in one pass) and mask paste.
roi_align = maskops.roi_align
MultiScaleRoIAlign = maskops.MultiScaleRoIAlign
paste_masks = maskops.paste_masks

# Eval-mode inference allocates its CPU activations from maskops' buffer cache (no page
# faults for memory the previous call already mapped): torch's allocator is routed there
# only for the forward's own thread and length; MASKOPS_CPU_CACHE_TORCH=0 turns it off.
cpu_cache_for_torch = maskops.cpu_cache_for_torch

# NMS and box geometry: Tensor[N, 4] boxes; NMS returns int64 indices by decreasing score.
nms = maskops.nms
batched_nms = maskops.batched_nms
box_iou = maskops.box_iou
box_area = maskops.box_area
clip_boxes = maskops.clip_boxes
remove_small_boxes = maskops.remove_small_boxes

# Box coding (encode: Tensor[N, 4] deltas; decode: Tensor[N, 4K] -> Tensor[N, K, 4]),
# anchors of every FPN level concatenated, and the fused RPN proposal step.
encode_boxes = maskops.encode_boxes


def decode_boxes(deltas, boxes, weights, clip: float = BBOX_XFORM_CLIP):
    """``maskops.decode_boxes`` with the model's default width/height clamp."""
    return maskops.decode_boxes(deltas, boxes, weights, clip)


def generate_anchors(
    feature_sizes, strides, sizes, aspect_ratios, dtype=torch.float32, device=None
):
    """``maskops.generate_anchors`` with the model's positional dtype and device."""
    return maskops.generate_anchors(
        feature_sizes, strides, sizes, aspect_ratios, dtype=dtype, device=device
    )


rpn_proposals = maskops.rpn_proposals
