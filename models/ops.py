"""Every op the model needs, in one place.

Each function calls the maskops op when the installed maskops has it, and otherwise a
torchvision (or plain PyTorch) equivalent with the same result. The comment on each
fallback names the maskops op that replaces it; when that op lands, the fallback can be
deleted. The rest of ``models/`` calls these functions only, never torchvision's detection
ops or ``torch.ops.maskops`` directly.

Boxes are ``(x1, y1, x2, y2)`` in image pixels throughout.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import maskops
import torch
import torchvision
from torch import Tensor

# Box regression deltas are clamped at log(1000 / 16) before exp(), as in Detectron and
# torchvision, so that one wild delta cannot produce an infinite box.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# torchvision's batched_nms switches from the coordinate-offset trick to a per-class loop
# above this many box coordinates; matching the switch keeps results bit-identical to it.
_OFFSET_TRICK_MAX_NUMEL = 4000

# ---- maskops ops that exist now ----

roi_align = maskops.roi_align
MultiScaleRoIAlign = maskops.MultiScaleRoIAlign
paste_masks = maskops.paste_masks


# ---- NMS and box geometry ----

def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS. ``boxes: Tensor[N, 4]``, ``scores: Tensor[N]`` -> kept indices ``Tensor[K]``
    (int64) by decreasing score."""
    if hasattr(maskops, "nms"):
        return maskops.nms(boxes, scores, iou_threshold)
    return torchvision.ops.nms(boxes, scores, iou_threshold)  # replaced by maskops.nms


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class: ``boxes: Tensor[N, 4]``, ``scores: Tensor[N]``, ``idxs: Tensor[N]``
    integer classes -> kept indices ``Tensor[K]`` (int64) by decreasing score."""
    if hasattr(maskops, "batched_nms"):
        return maskops.batched_nms(boxes, scores, idxs, iou_threshold)
    # Fallback, replaced by maskops.batched_nms.
    if boxes.numel() <= _OFFSET_TRICK_MAX_NUMEL or torch.compiler.is_compiling():
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    return _grouped_nms(boxes, scores, idxs, iou_threshold)


def _grouped_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    # torchvision's per-class loop, but grouping the boxes with one stable sort instead of
    # one full `idxs == c` scan per class (which dominates when there are 90 classes and
    # ~10^5 candidates). Same kept set and the same order as torchvision.
    order = torch.argsort(idxs, stable=True)
    counts = torch.unique_consecutive(idxs[order], return_counts=True)[1].tolist()
    kept = []
    for group in order.split(counts):
        kept.append(group[torchvision.ops.nms(boxes[group], scores[group], iou_threshold)])
    keep = torch.cat(kept).sort().values if kept else order[:0]
    # The same (unstable) sort call on the same ascending indices as torchvision, so that
    # tied scores come out in torchvision's order too.
    return keep[scores[keep].sort(descending=True).indices]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU: ``Tensor[N, 4]`` x ``Tensor[M, 4]`` -> ``Tensor[N, M]``."""
    if hasattr(maskops, "box_iou"):
        return maskops.box_iou(boxes1, boxes2)
    return torchvision.ops.box_iou(boxes1, boxes2)  # replaced by maskops.box_iou


def box_area(boxes: Tensor) -> Tensor:
    """``Tensor[N, 4]`` -> areas ``Tensor[N]``."""
    if hasattr(maskops, "box_area"):
        return maskops.box_area(boxes)
    return torchvision.ops.box_area(boxes)  # replaced by maskops.box_area


def clip_boxes(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """Clamps ``Tensor[..., 4]`` boxes to an image of ``size = (height, width)``."""
    if hasattr(maskops, "clip_boxes"):
        return maskops.clip_boxes(boxes, size)
    return torchvision.ops.clip_boxes_to_image(boxes, size)  # replaced by maskops.clip_boxes


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices ``Tensor[K]`` of the ``Tensor[N, 4]`` boxes whose sides are both >= ``min_size``."""
    if hasattr(maskops, "remove_small_boxes"):
        return maskops.remove_small_boxes(boxes, min_size)
    # replaced by maskops.remove_small_boxes
    return torchvision.ops.remove_small_boxes(boxes, min_size)


# ---- box coding and anchors ----

def encode_boxes(gt_boxes: Tensor, boxes: Tensor, weights: Tuple[float, float, float, float]
                 ) -> Tensor:
    """Regression targets that move ``boxes`` onto ``gt_boxes`` (both ``Tensor[N, 4]``).

    Returns ``Tensor[N, 4]`` deltas ``(wx * dx / w, wy * dy / h, ww * log(w' / w),
    wh * log(h' / h))`` (the R-CNN box coding, torchvision's ``BoxCoder.encode_single``).
    """
    if hasattr(maskops, "encode_boxes"):
        return maskops.encode_boxes(gt_boxes, boxes, weights)
    # replaced by maskops.encode_boxes
    w = torch.as_tensor(weights, dtype=gt_boxes.dtype, device=gt_boxes.device)
    return torchvision.models.detection._utils.encode_boxes(gt_boxes, boxes, w)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights: Tuple[float, float, float, float],
                 clip: float = BBOX_XFORM_CLIP) -> Tensor:
    """Applies ``deltas: Tensor[N, 4 * K]`` (K boxes per row, e.g. one per class) to
    ``boxes: Tensor[N, 4]``; returns ``Tensor[N, 4 * K]`` boxes in ``deltas``' dtype.
    The inverse of :func:`encode_boxes`; width/height deltas are clamped at ``clip``."""
    if hasattr(maskops, "decode_boxes"):
        return maskops.decode_boxes(deltas, boxes, weights, clip)
    # replaced by maskops.decode_boxes
    coder = torchvision.models.detection._utils.BoxCoder(weights, bbox_xform_clip=clip)
    return coder.decode_single(deltas, boxes)


def generate_anchors(base_anchors: Tensor, grid_size: Tuple[int, int],
                     stride: Tuple[int, int]) -> Tensor:
    """Anchors of one feature level.

    Args:
        base_anchors: ``Tensor[A, 4]`` anchors centred on (0, 0).
        grid_size: ``(height, width)`` of the feature map.
        stride: ``(stride_y, stride_x)`` in image pixels per feature cell.

    Returns:
        ``Tensor[height * width * A, 4]``, ordered (y, x, anchor): the layout of a
        channels-last ``[N, A, H, W]`` prediction flattened to ``[N, H * W * A]``.
    """
    if hasattr(maskops, "generate_anchors"):
        return maskops.generate_anchors(base_anchors, grid_size, stride)
    # replaced by maskops.generate_anchors (torchvision's AnchorGenerator.grid_anchors)
    h, w = grid_size
    dev = base_anchors.device
    sx = torch.arange(w, dtype=torch.int64, device=dev) * stride[1]
    sy = torch.arange(h, dtype=torch.int64, device=dev) * stride[0]
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack((xx, yy, xx, yy), dim=1)
    return (shifts.view(-1, 1, 4) + base_anchors.view(1, -1, 4)).reshape(-1, 4)


def rpn_proposals(
    objectness: List[Tensor],
    deltas: List[Tensor],
    anchors: List[Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
) -> Tuple[List[Tensor], List[Tensor]]:
    """The RPN's proposal selection, for every image of a batch.

    Per level, the ``pre_nms_top_n`` highest objectness logits are kept; only those anchors
    are decoded (weights ``(1, 1, 1, 1)``), clipped to their image, boxes with a side under
    ``min_size`` and scores (sigmoid) under ``score_thresh`` dropped, NMS run per level, and
    the ``post_nms_top_n`` best kept. Same result as torchvision's ``filter_proposals``
    (which decodes every anchor first).

    Args:
        objectness: per level ``Tensor[N, H_l * W_l * A]`` logits.
        deltas: per level ``Tensor[N, H_l * W_l * A, 4]``.
        anchors: per level ``Tensor[H_l * W_l * A, 4]`` (shared by the images of a batch).
        image_sizes: ``(height, width)`` of each image (before padding).

    Returns:
        Per image, ``Tensor[K_i, 4]`` proposals and ``Tensor[K_i]`` objectness probabilities,
        by decreasing score.
    """
    if hasattr(maskops, "rpn_proposals"):
        return maskops.rpn_proposals(objectness, deltas, anchors, image_sizes, pre_nms_top_n,
                                     post_nms_top_n, nms_thresh, score_thresh, min_size)
    # Fallback composed of the ops above, replaced by maskops.rpn_proposals.
    num_images = objectness[0].shape[0]
    top_scores, top_boxes, top_levels = [], [], []
    for level, (ob, dl, an) in enumerate(zip(objectness, deltas, anchors)):
        k = min(pre_nms_top_n, ob.shape[1])
        scores, idx = ob.topk(k, dim=1)
        batch = torch.arange(num_images, device=ob.device)[:, None]
        boxes = decode_boxes(dl[batch, idx].reshape(-1, 4), an[idx].reshape(-1, 4),
                             (1.0, 1.0, 1.0, 1.0))
        top_scores.append(scores)
        top_boxes.append(boxes.view(num_images, k, 4))
        top_levels.append(torch.full((k,), level, dtype=torch.int64, device=ob.device))
    all_scores = torch.cat(top_scores, dim=1).sigmoid()
    all_boxes = torch.cat(top_boxes, dim=1)
    levels = torch.cat(top_levels)

    final_boxes, final_scores = [], []
    for boxes, scores, size in zip(all_boxes, all_scores, image_sizes):
        boxes = clip_boxes(boxes, size)
        keep = remove_small_boxes(boxes, min_size)
        boxes, scores, lvl = boxes[keep], scores[keep], levels[keep]
        keep = torch.where(scores >= score_thresh)[0]
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, nms_thresh)[:post_nms_top_n]
        final_boxes.append(boxes[keep])
        final_scores.append(scores[keep])
    return final_boxes, final_scores


def fallbacks() -> List[str]:
    """Names of the ops above that still run their torchvision/PyTorch fallback."""
    names = ["nms", "batched_nms", "box_iou", "box_area", "clip_boxes", "remove_small_boxes",
             "encode_boxes", "decode_boxes", "generate_anchors", "rpn_proposals"]
    return [n for n in names if not hasattr(maskops, n)]
