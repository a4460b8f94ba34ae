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
    if torch.compiler.is_compiling():
        return _offset_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() <= _OFFSET_TRICK_MAX_NUMEL:
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    return _grouped_nms(boxes, scores, idxs, iou_threshold)


def _offset_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    # torchvision's coordinate-offset trick (shift each class's boxes beyond all others, one
    # NMS), written without its `numel() == 0` early return: the number of boxes is unknown
    # while tracing for export, and a max over the boxes plus a 0 needs no special case.
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)


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
    """Applies ``deltas: Tensor[N, 4 * K]`` (K codes per row, e.g. one per class) to
    ``boxes: Tensor[N, 4]``; returns ``Tensor[N, K, 4]`` boxes in ``deltas``' dtype.
    The inverse of :func:`encode_boxes`; width/height deltas are clamped at ``clip``."""
    if hasattr(maskops, "decode_boxes"):
        return maskops.decode_boxes(deltas, boxes, weights, clip)
    # replaced by maskops.decode_boxes
    coder = torchvision.models.detection._utils.BoxCoder(weights, bbox_xform_clip=clip)
    return coder.decode_single(deltas, boxes).view(deltas.shape[0], -1, 4)


def generate_anchors(feature_sizes: Sequence[Tuple[int, int]],
                     strides: Sequence[Tuple[int, int]],
                     sizes: Sequence[Sequence[float]],
                     aspect_ratios: Sequence[Sequence[float]],
                     dtype: torch.dtype = torch.float32,
                     device: torch.device = None) -> Tensor:
    """The anchors of every feature level, concatenated (torchvision's ``AnchorGenerator``).

    Args:
        feature_sizes: ``(H_l, W_l)`` of each level.
        strides: ``(stride_y, stride_x)`` of each level, in image pixels per feature cell.
        sizes, aspect_ratios: per level, anchor sizes (sqrt of the area) and height / width
            ratios; the cell anchors are ratio-major, rounded to whole pixels.

    Returns:
        ``Tensor[sum_l H_l * W_l * A_l, 4]``, each level ordered (y, x, anchor): the layout of
        a channels-last ``[N, A, H, W]`` prediction flattened to ``[N, H * W * A]``.
    """
    if hasattr(maskops, "generate_anchors"):
        return maskops.generate_anchors(feature_sizes, strides, sizes, aspect_ratios,
                                        dtype=dtype, device=device)
    # replaced by maskops.generate_anchors (torchvision's cell anchors and grid, in PyTorch)
    out = []
    for (h, w), (sy, sx), sz, ar in zip(feature_sizes, strides, sizes, aspect_ratios):
        scales = torch.as_tensor(sz, dtype=torch.float32, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(ar, dtype=torch.float32, device=device))
        ws = (1 / h_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        cell = (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
        shift_x = torch.arange(w, dtype=torch.int64, device=device) * sx
        shift_y = torch.arange(h, dtype=torch.int64, device=device) * sy
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack((xx, yy, xx, yy), dim=1)
        out.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4).to(dtype))
    return torch.cat(out)


def rpn_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float,
    min_size: float,
    num_anchors_per_level: Sequence[int],
) -> Tuple[List[Tensor], List[Tensor]]:
    """The RPN's proposal selection, for every image of a batch.

    Per level, the ``pre_nms_top_n`` highest objectness logits are kept; only those anchors
    are decoded (weights ``(1, 1, 1, 1)``), clipped to their image, boxes with a side under
    ``min_size`` and scores (sigmoid) under ``score_thresh`` dropped, NMS run per level, and
    the ``post_nms_top_n`` best kept. Same result as torchvision's ``filter_proposals``
    (which decodes every anchor first).

    Args:
        objectness: ``Tensor[N, A]`` logits, the levels one after another.
        deltas: ``Tensor[N, A, 4]``.
        anchors: ``Tensor[A, 4]`` (shared by the images of a batch).
        image_sizes: ``(height, width)`` of each image (before padding).
        num_anchors_per_level: how many of the ``A`` anchors belong to each level.

    Returns:
        Per image, ``Tensor[K_i, 4]`` proposals and ``Tensor[K_i]`` objectness probabilities,
        by decreasing score.
    """
    if hasattr(maskops, "rpn_proposals"):
        return maskops.rpn_proposals(objectness, deltas, anchors, image_sizes, pre_nms_top_n,
                                     post_nms_top_n, nms_thresh, score_thresh, min_size,
                                     num_anchors_per_level)
    # Fallback composed of the ops above, replaced by maskops.rpn_proposals.
    num_images = objectness.shape[0]
    batch = torch.arange(num_images, device=objectness.device)[:, None]
    top_scores, top_boxes, top_levels = [], [], []
    levels = zip(objectness.split(num_anchors_per_level, 1), deltas.split(num_anchors_per_level, 1),
                 anchors.split(num_anchors_per_level))
    for level, (ob, dl, an) in enumerate(levels):
        k = min(pre_nms_top_n, ob.shape[1])
        scores, idx = ob.topk(k, dim=1)
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
