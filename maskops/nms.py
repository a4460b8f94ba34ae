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
from ._fx import leaf
from ._grad_rules import above


def _no_boxes(boxes, shapes, **per_box) -> bool:
    """Whether ``boxes`` is empty with a shape in ``shapes``, whatever the dtypes: there is
    nothing to suppress, and torchvision returns no indices (``batched_nms`` on every device,
    ``nms`` on CUDA; its CPU ``nms`` refuses integer dtypes first). ``per_box``: name ->
    (tensor, torchvision's class for a non-tensor), each must then have shape [0]."""
    V.tensor(boxes, "boxes", (AttributeError, RuntimeError))  # torchvision 0.29 / 0.26
    # Not while compiling: testing the number of boxes would guard on it.
    if V.is_traced(boxes) or boxes.numel() != 0 or tuple(boxes.shape) not in shapes:
        return False
    for name, (x, tensor_tv) in per_box.items():
        V.tensor(x, name, tensor_tv)
        if x.shape != (0,):
            raise V.error(
                ValueError,
                f"{name} must have shape [0] (one per box), got {tuple(x.shape)}",
                (IndexError, RuntimeError),
            )
    return True


@leaf
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
    size depends on the data); everything else stays on the device. A leaf of ``torch.fx``
    tracing. Errors are also instances of torchvision's class for the same mistake
    (``RuntimeError`` for a wrong shape, dtype or device, as its C++ checks raise). No boxes
    (``Tensor[0, 4]``) give no indices whatever the dtypes, as torchvision's CUDA ``nms``.
    """
    iou_threshold = V.number(iou_threshold, "iou_threshold")
    score_threshold = V.optional_number(score_threshold, "score_threshold")
    max_output = V.optional_non_negative_int(max_output, "max_output")
    if _no_boxes(boxes, [(0, 4)], scores=(scores, RuntimeError)):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    V.boxes_n4(boxes, "boxes", tv=RuntimeError)
    V.per_box(scores, boxes, "scores", "scores")
    return torch.ops.maskops.nms(boxes, scores, iou_threshold, score_threshold, max_output)


@leaf
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

    On CUDA the call waits once for the GPU, to read how many boxes were kept, as :func:`nms`.
    Like torchvision, empty boxes (``Tensor[0, 4]`` or ``Tensor[0]``) give an empty result
    before any other argument is looked at. A leaf of ``torch.fx`` tracing.
    """
    # As torchvision: empty boxes give no indices before any other argument is looked at
    # (its own tests call batched_nms(empty, None, None, None)).
    if _no_boxes(boxes, [(0,), (0, 4)]):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    iou_threshold = V.number(iou_threshold, "iou_threshold")
    score_threshold = V.optional_number(score_threshold, "score_threshold")
    max_output = V.optional_non_negative_int(max_output, "max_output")
    # torchvision's checks of a wrong size or device differ with its input size (it takes
    # another path above 1,000 boxes on the CPU); these classes cover both paths.
    V.boxes_n4(boxes, "boxes", tv=RuntimeError)
    V.per_box(scores, boxes, "scores", "scores", tv=(IndexError, RuntimeError))
    V.per_box(
        idxs,
        boxes,
        "idxs",
        "class indices",
        integer_ids=True,
        tv=(IndexError, RuntimeError),
        tensor_tv=AttributeError,
        device_tv=NotImplementedError,
    )
    return torch.ops.maskops.batched_nms(
        boxes, scores, idxs, iou_threshold, score_threshold, max_output
    )


def _fmt(fmt) -> None:
    if fmt != "xyxy":
        raise ValueError(
            f"fmt must be 'xyxy' (x1, y1, x2, y2): maskops' box ops take no other "
            f"box format (convert with torchvision.ops.box_convert), got {fmt!r}"
        )


def _widened(boxes: Tensor) -> Tensor:
    """Integer boxes in the type torchvision computes their areas in: int32 and int64 stay,
    narrower integers become int32 (a product of two int8 sides overflows int8)."""
    return boxes if boxes.dtype in (torch.int32, torch.int64) else boxes.to(torch.int32)


def _int_area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


@leaf
def box_area(boxes: Tensor, fmt: str = "xyxy") -> Tensor:
    """Areas ``(x2 - x1) * (y2 - y1)`` of boxes ``(x1, y1, x2, y2)``.

    Args:
        boxes: ``Tensor[..., 4]`` (usually ``[N, 4]``), floating or integer.
        fmt: ``"xyxy"``, the only format taken (torchvision's signature has it).

    Returns:
        ``Tensor[...]``: floating boxes give their dtype (half types compute in float32 and
        round once); integer boxes give int64 for int64 and int32 otherwise, as torchvision
        (narrow integers are widened before the subtraction). Differentiable with respect to
        floating ``boxes``. On CUDA it never waits for the GPU. A leaf of ``torch.fx`` tracing.
    """
    V.real(boxes, "boxes")
    if boxes.dim() < 1 or boxes.size(-1) != 4:
        raise V.error(
            ValueError,
            f"boxes must have shape [..., 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}",
            IndexError,
        )
    _fmt(fmt)
    if V.is_integer(boxes):
        return _int_area(_widened(boxes))
    if boxes.dim() == 2:
        return torch.ops.maskops.box_area(boxes)
    return torch.ops.maskops.box_area(boxes.reshape(-1, 4)).reshape(boxes.shape[:-1])


@leaf
def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Pairwise IoU of ``Tensor[N, 4]`` and ``Tensor[M, 4]`` boxes ``(x1, y1, x2, y2)``.

    Returns ``Tensor[N, M]`` in the promoted dtype of the inputs (half types compute in
    float32); integer boxes (both) give torch's default floating dtype (float32), as
    torchvision. Where the union of two boxes is 0 (e.g. two zero-area boxes) the IoU is 0,
    never NaN; torchvision's ``box_iou`` returns NaN there (0 / 0), and the gradient there
    is 0. A NaN coordinate gives NaN. Differentiable with respect to both (floating) inputs,
    with torch's conventions at kinks (a tie in min/max splits the gradient in half; touching
    boxes pass it as the installed torch's clamp does at its bound: 2.11 yes, 2.14 no).
    ``fmt``: ``"xyxy"`` only. On CUDA it never waits for the GPU. A leaf of ``torch.fx``
    tracing.
    """
    V.boxes_n4(boxes1, "boxes1", integers=True)
    V.boxes_n4(boxes2, "boxes2", integers=True)
    V.same_device(boxes2, boxes1, "boxes2", "boxes1")
    _fmt(fmt)
    dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
    if dtype.is_floating_point:
        return torch.ops.maskops.box_iou(boxes1.to(dtype), boxes2.to(dtype))
    # Integer boxes: exact integer areas and intersections (in int32 or int64, widened before
    # any subtraction), one division in the default floating dtype.
    a, b = _widened(boxes1.to(dtype)), _widened(boxes2.to(dtype))
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = _int_area(a)[:, None] + _int_area(b)[None, :] - inter
    iou = inter / union
    return torch.where(union == 0, torch.zeros_like(iou), iou)


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
def _batched_nms_fake(boxes, scores, idxs, iou_threshold, score_threshold=None, max_output=None):
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
    g_w = g_inter * h * above(w0, 0)  # as this torch's clamp does at exactly 0
    g_h = g_inter * w * above(h0, 0)
    # w = min(ax2, bx2) - max(ax1, bx1); the same for h.
    sa = {
        "x1": _share(ax1, bx1, ax1 > bx1),
        "x2": _share(ax2, bx2, ax2 < bx2),
        "y1": _share(ay1, by1, ay1 > by1),
        "y2": _share(ay2, by2, ay2 < by2),
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


torch.library.register_autograd(
    "maskops::box_area", _box_area_backward, setup_context=_box_area_setup
)
torch.library.register_autograd("maskops::box_iou", _box_iou_backward, setup_context=_box_iou_setup)
