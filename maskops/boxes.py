"""Box coding, clipping and small-box removal: torchvision's ``BoxCoder``,
``clip_boxes_to_image`` and ``remove_small_boxes``.

Kernels in csrc/boxes/. float32 and float64 results equal torchvision's CPU results bit for
bit: the kernels repeat its arithmetic operation for operation and use torch's own exp / log
(box_coder.h explains how). Half types compute in float32 and round once, so they are closer
to the exact values than torchvision's half arithmetic, which rounds after every operation.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._fx import leaf
from ._grad_rules import above, below

DEFAULT_CLAMP = math.log(1000.0 / 16)


def _codes(rel_codes) -> Tensor:
    V.floating(rel_codes, "rel_codes")
    if rel_codes.dim() != 2 or rel_codes.size(1) % 4 != 0:
        # torchvision: RuntimeError (torch.stack of unequal code columns).
        raise V.error(
            ValueError,
            f"rel_codes must have shape [N, 4 * K] (K codes (dx, dy, dw, "
            f"dh) per box), got {tuple(rel_codes.shape)}",
            RuntimeError,
        )
    return rel_codes


@leaf
def decode_boxes(
    rel_codes: Tensor, boxes: Tensor, weights: Sequence[float], clamp: float = DEFAULT_CLAMP
) -> Tensor:
    """Applies box deltas to reference boxes (torchvision's ``BoxCoder.decode_single``).

    With ``(w, h, cx, cy)`` the size and centre of a reference box and ``(dx, dy, dw, dh)`` a
    code divided by ``weights``, the box is centred at ``(cx + dx w, cy + dy h)`` with size
    ``(exp(min(dw, clamp)) w, exp(min(dh, clamp)) h)``. The clamp keeps exp finite: extreme
    codes give large but finite boxes, never inf or NaN.

    Args:
        rel_codes: ``Tensor[N, 4 * K]`` codes, ``K`` per box (e.g. one per class).
        boxes: ``Tensor[N, 4]`` reference boxes ``(x1, y1, x2, y2)``, any floating dtype (read
            in the codes' math type: float32, or float64 for float64 codes); integer boxes are
            converted to the codes' dtype first, as torchvision does.
        weights: ``(wx, wy, ww, wh)``, positive (torchvision's RPN: ``(1, 1, 1, 1)``, box head:
            ``(10, 10, 5, 5)``); a sequence or a tensor.
        clamp: upper bound of ``dw`` and ``dh`` (default ``log(1000 / 16)``).

    Returns:
        ``Tensor[N, K, 4]`` boxes ``(x1, y1, x2, y2)`` in the codes' dtype; ``.flatten(1)`` gives
        torchvision's ``decode_single`` layout ``[N, 4 * K]``. Differentiable with respect to
        ``rel_codes`` and ``boxes``.

    torchvision on CUDA divides by the weights as a multiplication by their reciprocal, which
    can differ from this (and from torchvision on the CPU) in the last bit for weights that are
    not powers of two.

    On CUDA neither the call nor its backward waits for the GPU (``weights`` given as a CUDA
    tensor are read on the host first, which does).
    """
    _codes(rel_codes)
    V.boxes_n4(boxes, "boxes", integers=True)
    if boxes.size(0) != rel_codes.size(0):
        raise V.error(
            ValueError,
            f"rel_codes must have one row per box ({boxes.size(0)}), got {rel_codes.size(0)}",
            RuntimeError,
        )
    V.same_device(boxes, rel_codes, "boxes", "rel_codes")
    if V.is_integer(boxes):
        boxes = boxes.to(rel_codes.dtype)
    weights = V.box_weights(weights)
    clamp = V.number(clamp, "clamp")
    return torch.ops.maskops.decode_boxes(rel_codes, boxes, list(weights), clamp)


@leaf
def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: Sequence[float]) -> Tensor:
    """The codes of ``reference_boxes`` relative to ``proposals`` (torchvision's ``encode_boxes``).

    Args:
        reference_boxes: ``Tensor[N, 4]`` boxes to encode ``(x1, y1, x2, y2)`` (e.g. the
            matched ground truth).
        proposals: ``Tensor[N, 4]`` boxes they are encoded against (e.g. anchors).
        weights: ``(wx, wy, ww, wh)``, positive; a sequence or a tensor.

    Returns:
        ``Tensor[N, 4]`` codes ``(wx (cx - cx_p) / w_p, wy (cy - cy_p) / h_p, ww log(w / w_p),
        wh log(h / h_p))`` in the promoted dtype of the inputs. Differentiable with respect to
        both inputs. On CUDA neither the call nor its backward waits for the GPU (``weights``
        given as a CUDA tensor are read on the host first, which does).
    """
    V.boxes_n4(reference_boxes, "reference_boxes")
    V.boxes_n4(proposals, "proposals")
    if reference_boxes.size(0) != proposals.size(0):
        raise V.error(
            ValueError,
            f"proposals must have one row per reference box "
            f"({reference_boxes.size(0)}), got {proposals.size(0)}",
            RuntimeError,
        )
    V.same_device(proposals, reference_boxes, "proposals", "reference_boxes")
    weights = V.box_weights(weights)
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    return torch.ops.maskops.encode_boxes(
        reference_boxes.to(dtype), proposals.to(dtype), list(weights)
    )


@leaf
def clip_boxes(boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
    """Clips boxes to an image (torchvision's ``clip_boxes_to_image``).

    Args:
        boxes: ``Tensor[..., 4]`` boxes ``(x1, y1, x2, y2)``, floating or integer.
        image_size: ``(height, width)``.

    Returns:
        ``Tensor[..., 4]`` in the boxes' dtype, x clamped to ``[0, width]`` and y to
        ``[0, height]`` (NaN stays NaN). Differentiable (the gradient passes where a coordinate
        was inside the bounds; at a bound itself as the installed torch's clamp does, so as
        torchvision's: torch 2.11 passes it, 2.14 does not). On CUDA neither the call nor its
        backward waits for the GPU. A leaf of ``torch.fx`` tracing.
    """
    V.real(boxes, "boxes")
    if boxes.dim() < 1 or boxes.size(-1) != 4:
        # torchvision: IndexError without a last dimension, RuntimeError (torch.stack) otherwise.
        raise V.error(
            ValueError,
            f"boxes must have shape [..., 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}",
            IndexError if boxes.dim() == 0 else RuntimeError,
        )
    h, w = V.image_size(image_size, "image_size")
    if V.is_integer(boxes):
        # A bound past the dtype's range (an int8 box in a 300-pixel image) clips nothing;
        # torch.clamp would refuse it (torchvision raises RuntimeError there).
        top = torch.iinfo(boxes.dtype).max
        out = torch.empty_like(boxes)
        out[..., 0::2] = boxes[..., 0::2].clamp(min=0, max=min(w, top))
        out[..., 1::2] = boxes[..., 1::2].clamp(min=0, max=min(h, top))
        return out
    return torch.ops.maskops.clip_boxes(boxes, h, w)


@leaf
def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose width and height are both ``>= min_size``.

    Args:
        boxes: ``Tensor[N, 4]`` boxes ``(x1, y1, x2, y2)``, floating or integer.
        min_size: non-negative; compared with sides computed and rounded in the boxes' dtype,
            as torchvision does (so the result is torchvision's for every dtype). Sides of
            integer boxes narrower than int32 are computed in int32 (torchvision's can wrap
            around in the boxes' dtype).

    Returns:
        ``Tensor[K]`` int64 indices, increasing. On CUDA the call waits for the GPU once, to
        read how many boxes were kept (the output size depends on the data). A leaf of
        ``torch.fx`` tracing.
    """
    V.boxes_n4(boxes, "boxes", integers=True)
    min_size = V.non_negative_number(min_size, "min_size", tv=TypeError)
    if V.is_integer(boxes):
        b = boxes if boxes.dtype in (torch.int32, torch.int64) else boxes.to(torch.int32)
        keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
        return keep.nonzero().squeeze(1)
    return torch.ops.maskops.remove_small_boxes(boxes, min_size)


class BoxCoder:
    """Drop-in for ``torchvision.models.detection._utils.BoxCoder``. Its methods never wait
    for the GPU (they call :func:`encode_boxes` and :func:`decode_boxes`).

    Args:
        weights: ``(wx, wy, ww, wh)``, positive.
        bbox_xform_clip: upper bound of the decoded ``dw``, ``dh`` (default ``log(1000 / 16)``).
    """

    def __init__(
        self, weights: Tuple[float, float, float, float], bbox_xform_clip: float = DEFAULT_CLAMP
    ) -> None:
        V.box_weights(weights)
        self.weights = weights
        self.bbox_xform_clip = V.number(bbox_xform_clip, "bbox_xform_clip")

    def encode(self, reference_boxes: List[Tensor], proposals: List[Tensor]) -> Tuple[Tensor, ...]:
        """Per image codes of ``reference_boxes[i]`` relative to ``proposals[i]``
        (``Tensor[N_i, 4]``)."""
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """``Tensor[N, 4]`` codes of ``reference_boxes`` relative to ``proposals``."""
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, rel_codes: Tensor, boxes: List[Tensor]) -> Tensor:
        """Decodes ``rel_codes`` (``N * 4 * K`` values for the ``N`` boxes of all images) into
        ``Tensor[N, K, 4]``, like torchvision (which returns ``rel_codes``' layout when N = 0)."""
        if not isinstance(boxes, (list, tuple)):
            # torchvision: AssertionError (torch._assert).
            raise V.error(
                TypeError,
                f"boxes must be a list or tuple of Tensor[N_i, 4], got {V._describe(boxes)}",
                AssertionError,
            )
        V.tensor(rel_codes, "rel_codes")
        box_sum = sum(b.size(0) for b in boxes)
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred_boxes = self.decode_single(rel_codes, torch.cat(boxes, dim=0))
        if box_sum > 0:
            pred_boxes = pred_boxes.reshape(box_sum, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """``Tensor[N, 4 * K]`` boxes decoded from ``rel_codes [N, 4 * K]`` and ``boxes [N, 4]``."""
        return decode_boxes(rel_codes, boxes, self.weights, self.bbox_xform_clip).flatten(1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip})"
        )


# ---- fake kernels ----


@torch.library.register_fake("maskops::decode_boxes")
def _decode_fake(rel_codes, boxes, weights, clamp):
    return rel_codes.new_empty((rel_codes.size(0), rel_codes.size(1) // 4, 4))


@torch.library.register_fake("maskops::encode_boxes")
def _encode_fake(reference_boxes, proposals, weights):
    torch._check(reference_boxes.dtype == proposals.dtype, lambda: "dtypes must match")
    return reference_boxes.new_empty((reference_boxes.size(0), 4))


@torch.library.register_fake("maskops::clip_boxes")
def _clip_fake(boxes, height, width):
    return boxes.new_empty(boxes.shape)


@torch.library.register_fake("maskops::remove_small_boxes")
def _remove_small_fake(boxes, min_size):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.int64)


# ---- autograd (plain torch ops in the math dtype: any device, traceable) ----


def _math(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _decode_setup(ctx, inputs, output):
    rel_codes, boxes, weights, clamp = inputs
    ctx.save_for_backward(rel_codes, boxes)
    ctx.weights, ctx.clamp = weights, clamp


def _decode_backward(ctx, grad):
    rel_codes, boxes = ctx.saved_tensors
    mt = _math(rel_codes)
    wx, wy, ww, wh = ctx.weights
    d = rel_codes.to(mt).reshape(rel_codes.size(0), -1, 4)  # [N, K, 4]
    b = boxes.to(mt)[:, None, :]  # [N, 1, 4]
    g = grad.to(mt)
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    dw, dh = d[..., 2] / ww, d[..., 3] / wh
    ew, eh = dw.clamp(max=ctx.clamp).exp(), dh.clamp(max=ctx.clamp).exp()
    g_cx, g_cy = g[..., 0] + g[..., 2], g[..., 1] + g[..., 3]
    g_pw, g_ph = 0.5 * (g[..., 2] - g[..., 0]), 0.5 * (g[..., 3] - g[..., 1])
    # torch.clamp's rule: the gradient passes where the input is within the bound (at the
    # bound itself as this torch does).
    g_codes = torch.stack(
        [
            g_cx * w / wx,
            g_cy * h / wy,
            g_pw * ew * w * below(dw, ctx.clamp) / ww,
            g_ph * eh * h * below(dh, ctx.clamp) / wh,
        ],
        dim=-1,
    )
    g_w = (g_cx * (d[..., 0] / wx) + g_pw * ew).sum(1)
    g_h = (g_cy * (d[..., 1] / wy) + g_ph * eh).sum(1)
    g_cx, g_cy = g_cx.sum(1), g_cy.sum(1)
    # cx = x1 + w / 2 and w = x2 - x1 (the same for y).
    g_boxes = torch.stack(
        [0.5 * g_cx - g_w, 0.5 * g_cy - g_h, 0.5 * g_cx + g_w, 0.5 * g_cy + g_h], dim=1
    )
    return (
        g_codes.reshape(rel_codes.shape).to(rel_codes.dtype),
        g_boxes.to(boxes.dtype),
        None,
        None,
    )


def _encode_setup(ctx, inputs, output):
    reference_boxes, proposals, weights = inputs
    ctx.save_for_backward(reference_boxes, proposals)
    ctx.weights = weights


def _encode_backward(ctx, grad):
    reference_boxes, proposals = ctx.saved_tensors
    mt = _math(reference_boxes)
    wx, wy, ww, wh = ctx.weights
    r, p, g = reference_boxes.to(mt), proposals.to(mt), grad.to(mt)
    ex_w, ex_h = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gt_w, gt_h = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    dx = wx * ((r[:, 0] + 0.5 * gt_w) - (p[:, 0] + 0.5 * ex_w)) / ex_w
    dy = wy * ((r[:, 1] + 0.5 * gt_h) - (p[:, 1] + 0.5 * ex_h)) / ex_h
    g_gt_cx, g_gt_cy = g[:, 0] * wx / ex_w, g[:, 1] * wy / ex_h
    g_gt_w, g_gt_h = g[:, 2] * ww / gt_w, g[:, 3] * wh / gt_h
    g_ex_w = -(g[:, 0] * dx + g[:, 2] * ww) / ex_w
    g_ex_h = -(g[:, 1] * dy + g[:, 3] * wh) / ex_h
    g_ref = torch.stack(
        [
            0.5 * g_gt_cx - g_gt_w,
            0.5 * g_gt_cy - g_gt_h,
            0.5 * g_gt_cx + g_gt_w,
            0.5 * g_gt_cy + g_gt_h,
        ],
        dim=1,
    )
    g_prop = torch.stack(
        [
            -0.5 * g_gt_cx - g_ex_w,
            -0.5 * g_gt_cy - g_ex_h,
            -0.5 * g_gt_cx + g_ex_w,
            -0.5 * g_gt_cy + g_ex_h,
        ],
        dim=1,
    )
    return g_ref.to(reference_boxes.dtype), g_prop.to(proposals.dtype), None


def _clip_setup(ctx, inputs, output):
    boxes, height, width = inputs
    ctx.save_for_backward(boxes)
    ctx.height, ctx.width = height, width


def _clip_backward(ctx, grad):
    (boxes,) = ctx.saved_tensors
    # The gradient passes where the coordinate is within [0, bound], at a bound itself as this
    # torch's clamp does. The bounds are Python scalars (converted to boxes' dtype, as a tensor
    # of bounds would be), not a tensor built from host data, which on CUDA would be a copy
    # the host waits for.
    inside = above(boxes, 0)
    inside[..., 0::2] &= below(boxes[..., 0::2], ctx.width)
    inside[..., 1::2] &= below(boxes[..., 1::2], ctx.height)
    return torch.where(inside, grad, torch.zeros_like(grad)), None, None


torch.library.register_autograd(
    "maskops::decode_boxes", _decode_backward, setup_context=_decode_setup
)
torch.library.register_autograd(
    "maskops::encode_boxes", _encode_backward, setup_context=_encode_setup
)
torch.library.register_autograd("maskops::clip_boxes", _clip_backward, setup_context=_clip_setup)
