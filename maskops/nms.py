"""Non-maximum suppression, box IoU and box area.

``nms`` and ``batched_nms`` return the same indices as ``torchvision.ops.nms`` /
``batched_nms``, in the same order. The kernels are in csrc/nms/; the IoU arithmetic (which
reproduces torchvision's rounding) and the GPU algorithm are described once, in nms.h.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as V


def nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    *,
    score_threshold: Optional[float] = None,
    max_output: Optional[int] = None,
) -> Tensor:
    """Greedy non-maximum suppression.

    Boxes are visited by decreasing score; a box is kept unless a box kept before it has
    IoU > ``iou_threshold`` with it. Equal scores are visited by index (a stable sort), so
    the result is exactly torchvision's, order included.

    Args:
        boxes: ``Tensor[N, 4]`` boxes ``(x1, y1, x2, y2)``, float16/bfloat16/float32/float64.
            IoU is computed in float32 (float64 for float64 boxes) with torchvision's
            operations and rounding, so float32/float64 results are identical to
            torchvision's. Half-precision boxes are converted to float32 first (exactly):
            the result equals torchvision's on ``boxes.float()`` (torchvision's CPU nms has
            no half-precision kernel).
        scores: ``Tensor[N]`` floating scores (any floating dtype, need not match ``boxes``).
            NaN scores sort before all others, as in ``torch.sort`` and torchvision.
        iou_threshold: suppress boxes whose IoU with a kept box is strictly greater. Two
            boxes whose union is 0 (both zero-area) never suppress each other.
        score_threshold: if given, only boxes with ``score > score_threshold`` (compared
            exactly, in float64) are returned; boxes with NaN scores are not returned but
            still suppress. The result is exactly ``keep[scores[keep] > score_threshold]`` of
            plain NMS, computed without visiting the low-scoring boxes.
        max_output: if given, return at most this many indices (the highest-scoring ones);
            the kernel stops as soon as it has found them. Applied after ``score_threshold``.

    Returns:
        ``Tensor[K]`` int64 indices into ``boxes`` of the kept boxes, by decreasing score.

    On CUDA the call waits once for the GPU, to read how many boxes were kept (the output
    size depends on the data); everything else stays on the device.
    """
    V.boxes_n4(boxes, "boxes")
    V.per_box(scores, boxes, "scores", "scores")
    iou_threshold = V.number(iou_threshold, "iou_threshold")
    score_threshold = V.optional_number(score_threshold, "score_threshold")
    max_output = V.optional_non_negative_int(max_output, "max_output")
    return torch.ops.maskops.nms(boxes, scores, iou_threshold, score_threshold, max_output)


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    score_threshold: Optional[float] = None,
    max_output: Optional[int] = None,
) -> Tensor:
    """Non-maximum suppression within each class: boxes of different classes never interact.

    Equivalent to running :func:`nms` on each class separately and merging the kept
    indices by decreasing score (ties by index). Done in one kernel call: on the CPU the
    boxes are grouped by class after the sort, on CUDA the IoU test is class-aware; box
    coordinates are never offset per class.

    Args:
        boxes: ``Tensor[N, 4]`` boxes ``(x1, y1, x2, y2)`` (see :func:`nms` for dtypes).
        scores: ``Tensor[N]`` floating scores.
        idxs: ``Tensor[N]`` integer class index of each box (any integer dtype, any values).
        iou_threshold: IoU above which a box is suppressed by a kept box of its class.
        score_threshold: as in :func:`nms`.
        max_output: at most this many indices in total (over all classes), as in :func:`nms`.

    Returns:
        ``Tensor[K]`` int64 indices into ``boxes`` of the kept boxes, by decreasing score.

    Matching torchvision: the kept set is always exactly per-class torchvision ``nms``.
    torchvision's own ``batched_nms`` switches strategy with the input size: up to 1000
    boxes on the CPU it offsets coordinates by class, whose rounding can (rarely) change a
    decision near the threshold; above that it merges per-class results with an unstable
    sort, so equal scores in different classes come in an unspecified order. maskops is
    exact in the first case and orders ties by index in the second; otherwise the outputs
    are identical.
    """
    V.boxes_n4(boxes, "boxes")
    V.per_box(scores, boxes, "scores", "scores")
    V.per_box(idxs, boxes, "idxs", "class indices", integer_ids=True)
    iou_threshold = V.number(iou_threshold, "iou_threshold")
    score_threshold = V.optional_number(score_threshold, "score_threshold")
    max_output = V.optional_non_negative_int(max_output, "max_output")
    return torch.ops.maskops.batched_nms(boxes, scores, idxs, iou_threshold, score_threshold,
                                         max_output)


def box_area(boxes: Tensor) -> Tensor:
    """Areas ``(x2 - x1) * (y2 - y1)`` of ``Tensor[N, 4]`` boxes ``(x1, y1, x2, y2)``.

    Returns ``Tensor[N]`` in the boxes' dtype (half types compute in float32 and round once).
    Differentiable with respect to ``boxes``.
    """
    V.boxes_n4(boxes, "boxes")
    return torch.ops.maskops.box_area(boxes)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of ``Tensor[N, 4]`` and ``Tensor[M, 4]`` boxes ``(x1, y1, x2, y2)``.

    Returns ``Tensor[N, M]`` in the promoted dtype of the inputs (half types compute in
    float32). Where the union of two boxes is 0 (e.g. two zero-area boxes) the IoU is 0,
    never NaN; torchvision's ``box_iou`` returns NaN there (0 / 0), and the gradient there
    is 0. A NaN coordinate gives NaN. Differentiable with respect to both inputs, with
    torch's conventions at kinks (a tie in min/max splits the gradient in half).
    """
    V.boxes_n4(boxes1, "boxes1")
    V.boxes_n4(boxes2, "boxes2")
    V.same_device(boxes2, boxes1, "boxes2", "boxes1")
    dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
    return torch.ops.maskops.box_iou(boxes1.to(dtype), boxes2.to(dtype))


# ---- fake kernels (shapes and dtypes for torch.compile / export) ----
# The NMS output length is data-dependent: an unbacked size from new_dynamic_size().

def _kept_indices_fake(boxes: Tensor) -> Tensor:
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: "boxes must be [N, 4]")
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


@torch.library.register_fake("maskops::nms")
def _nms_fake(boxes, scores, iou_threshold, score_threshold=None, max_output=None):
    return _kept_indices_fake(boxes)


@torch.library.register_fake("maskops::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold, score_threshold=None,
                      max_output=None):
    return _kept_indices_fake(boxes)


@torch.library.register_fake("maskops::_nms_bitmask")
def _nms_bitmask_fake(boxes, scores, idxs, iou_threshold, score_threshold=None,
                      max_output=None):
    return _kept_indices_fake(boxes)


@torch.library.register_fake("maskops::box_area")
def _box_area_fake(boxes):
    return boxes.new_empty((boxes.size(0),))


@torch.library.register_fake("maskops::box_iou")
def _box_iou_fake(boxes1, boxes2):
    torch._check(boxes1.dtype == boxes2.dtype, lambda: "boxes1 and boxes2 must share a dtype")
    return boxes1.new_empty((boxes1.size(0), boxes2.size(0)))


# ---- autograd (plain torch ops: any device, traceable) ----

def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _box_area_backward(ctx, grad):
    (boxes,) = ctx.saved_tensors
    b = boxes.to(_math_dtype(boxes.dtype))
    g = grad.to(b.dtype)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return torch.stack([-h * g, -w * g, h * g, w * g], dim=1).to(boxes.dtype)


def _box_area_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _share(x: Tensor, y: Tensor, x_wins: Tensor) -> Tensor:
    """The part of a min/max gradient that goes to x (torch's rule: half each on a tie)."""
    return torch.where(x == y, 0.5, x_wins.to(x.dtype))


def _box_iou_backward(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    mt = _math_dtype(boxes1.dtype)
    ax1, ay1, ax2, ay2 = boxes1.to(mt)[:, None, :].unbind(-1)  # [N, 1] each
    bx1, by1, bx2, by2 = boxes2.to(mt)[None, :, :].unbind(-1)  # [1, M] each
    g = grad.to(mt)
    w0 = torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)
    h0 = torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    w, h = w0.clamp(min=0), h0.clamp(min=0)
    inter = w * h
    area_a, area_b = (ax2 - ax1) * (ay2 - ay1), (bx2 - bx1) * (by2 - by1)
    union = area_a + area_b - inter
    zero = union == 0  # IoU is defined as 0 there: no gradient
    u2 = torch.where(zero, 1.0, union).square()
    g_inter = torch.where(zero, 0.0, g * (union + inter) / u2)
    g_area = torch.where(zero, 0.0, -g * inter / u2)
    g_w = g_inter * h * (w0 > 0)  # like torch's clamp: no gradient at exactly 0
    g_h = g_inter * w * (h0 > 0)
    # w = min(ax2, bx2) - max(ax1, bx1); the same for h.
    sa = {
        "x1": _share(ax1, bx1, ax1 > bx1), "x2": _share(ax2, bx2, ax2 < bx2),
        "y1": _share(ay1, by1, ay1 > by1), "y2": _share(ay2, by2, ay2 < by2),
    }
    da_x1 = -g_w * sa["x1"] - g_area * (ay2 - ay1)
    da_x2 = g_w * sa["x2"] + g_area * (ay2 - ay1)
    da_y1 = -g_h * sa["y1"] - g_area * (ax2 - ax1)
    da_y2 = g_h * sa["y2"] + g_area * (ax2 - ax1)
    db_x1 = -g_w * (1 - sa["x1"]) - g_area * (by2 - by1)
    db_x2 = g_w * (1 - sa["x2"]) + g_area * (by2 - by1)
    db_y1 = -g_h * (1 - sa["y1"]) - g_area * (bx2 - bx1)
    db_y2 = g_h * (1 - sa["y2"]) + g_area * (bx2 - bx1)
    grad1 = torch.stack([d.sum(1) for d in (da_x1, da_y1, da_x2, da_y2)], dim=1)
    grad2 = torch.stack([d.sum(0) for d in (db_x1, db_y1, db_x2, db_y2)], dim=1)
    return grad1.to(boxes1.dtype), grad2.to(boxes2.dtype)


def _box_iou_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


torch.library.register_autograd("maskops::box_area", _box_area_backward,
                                setup_context=_box_area_setup)
torch.library.register_autograd("maskops::box_iou", _box_iou_backward,
                                setup_context=_box_iou_setup)
