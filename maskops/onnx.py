"""ONNX export of modules that call maskops: translations of the ``torch.ops.maskops`` ops to
standard ONNX operators (opset 18), for ``torch.onnx.export(..., dynamo=True)``.

    import maskops
    torch.onnx.export(model, args, "model.onnx", dynamo=True,
                      custom_translation_table=maskops.onnx.custom_translation_table())

Each translation is a trace-only onnxscript function: Python runs once at export time with
the op's attributes (sizes, thresholds, flags) as Python values and emits plain ONNX nodes.
``import maskops`` does not import onnxscript; this module does, and is loaded on the first
access to ``maskops.onnx``.

How each op maps (float32 unless said otherwise; onnxruntime's RoiAlign and
NonMaxSuppression take float / double and float only, so half inputs are computed in float32
and cast back, and float64 boxes go through NonMaxSuppression as float32):

- ``roi_align``: ``RoiAlign`` with ``coordinate_transformation_mode="half_pixel"`` for
  ``aligned=True`` (the -0.5 pixel shift) and ``"output_half_pixel"`` for ``aligned=False``
  (no shift, RoI sides at least 1 px: torchvision's legacy mode); ``sampling_ratio <= 0`` is
  ONNX's adaptive ``0`` (``ceil(roi_side / output_side)`` samples per bin, as torchvision and
  maskops; maskops caps that grid at 1024 per side, ONNX does not).
- ``multiscale_roi_align``: the FPN level rule computed in the graph, then one ``RoiAlign``
  per level on that level's RoIs (``NonZero`` / ``Gather``), scattered back in RoI order.
- ``nms``: ``NonMaxSuppression`` (one class, IoU ``> iou_threshold`` suppresses), then the
  kept indices ordered by decreasing score (``TopK``: equal scores by index), then
  ``score_threshold`` applied *after* the suppression (maskops' semantics: boxes under the
  threshold still suppress) and ``max_output`` as a prefix.
- ``batched_nms``: the same with one ``NonMaxSuppression`` class per distinct class id
  (``Unique``; the scores laid out ``[1, classes, N]`` with ``-inf`` outside each class), so
  it is exact per-class NMS, not torchvision's coordinate-offset trick.
- ``box_iou``, ``decode_boxes``, ``clip_boxes``, ``remove_small_boxes``, ``generate_anchors``:
  elementwise arithmetic in torchvision's order of operations.
- ``paste_masks``: the bilinear resize of every zero-padded mask into its pixel box, written
  as two matrix products with per-box interpolation matrices (rows outside the box are
  zero), then the threshold.
- ``rpn_proposals``: per image and level ``TopK``, decoding, clipping, the size and score
  filters and a per-level NMS as above, then the ``post_nms_top_n`` best. The number of
  images and levels are fixed at export time (they are in the op's arguments).

Differences from the eager kernels are rounding-level: ONNX arithmetic (``Log`` / ln 2 for
``log2``, matrix products in the paste, onnxruntime's own exp and bilinear sums) can differ
in the last bits, which moves a decision (an NMS at its IoU threshold, a mask pixel at its
threshold, an FPN level at a power-of-two size) only at that boundary. Equal scores that
overlap may be suppressed in another order than the eager kernels' (by index).

Not translated (a ``NotImplementedError`` naming the op, raised by the exporter): the
backward ops, ``masks_to_rle`` (variable-length strings),
``encode_boxes`` (training only) and the CPU cache ops.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import numpy as np
import torch

try:
    from onnxscript import ir
    from onnxscript import opset18 as op
except ImportError as e:  # pragma: no cover - only without the optional dependency
    raise ImportError("maskops.onnx needs onnxscript (pip install onnxscript onnxruntime)") from e

__all__ = ["custom_translation_table", "OPSET", "UNSUPPORTED"]

#: The ONNX opset the translations are written for (``RoiAlign`` needs 16 for
#: ``coordinate_transformation_mode``).
OPSET = 18

#: Ops with no ONNX translation, and why.
UNSUPPORTED = {
    "_roi_align_backward": "a gradient (export an inference model)",
    "_multiscale_roi_align_backward": "a gradient (export an inference model)",
    "_masks_to_rle": "variable-length COCO RLE strings have no ONNX tensor form",
    "encode_boxes": "training targets only (export an inference model)",
    "box_area": "not yet translated; compute (x2 - x1) * (y2 - y1) in the model instead",
    "_cpu_cache_release": "a memory-management call",
    "_cpu_cache_stats": "a memory-management call",
    "_cpu_cache_set_limit": "a memory-management call",
    "_cpu_cache_route_torch": "a memory-management call",
    "_cpu_cache_torch_allocator": "a memory-management call",
}

_INT64 = 7  # onnx.TensorProto.INT64
_FLOAT = 1
_DOUBLE = 11
_BOOL = 9
_UINT8 = 2


def custom_translation_table() -> Dict[object, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Maps every public ``torch.ops.maskops`` op to an onnxscript function of standard ONNX
    operators (opset :data:`OPSET`), and every other maskops op (gradients, the cache ops,
    :data:`UNSUPPORTED`) to a function that raises ``NotImplementedError`` naming the op
    when an exported graph contains it.
    """
    ops = torch.ops.maskops
    table = {
        ops.roi_align.default: roi_align,
        ops.multiscale_roi_align.default: multiscale_roi_align,
        ops.nms.default: nms,
        ops.batched_nms.default: batched_nms,
        ops.box_iou.default: box_iou,
        ops.decode_boxes.default: decode_boxes,
        ops.clip_boxes.default: clip_boxes,
        ops.remove_small_boxes.default: remove_small_boxes,
        ops.paste_masks.default: paste_masks,
        ops.rpn_proposals.default: rpn_proposals,
        ops.generate_anchors.default: generate_anchors,
    }
    for name, why in UNSUPPORTED.items():
        packet = getattr(ops, name, None)
        if packet is not None:
            table[packet.default] = _unsupported(name, why)
    return table


def _unsupported(name: str, why: str) -> Callable:
    def translate(*args, **kwargs):
        raise NotImplementedError(f"torch.ops.maskops.{name} cannot be exported to ONNX: {why}")

    translate.__name__ = f"maskops_{name}_unsupported"
    return translate


# The translations below run once at export time: tensors are onnxscript values, every other
# argument a Python value. Their parameter names are the op schemas' and they carry no
# annotations: the exporter infers each one's signature (inputs, attributes) from them.

# ---- helpers ----


def _is_half(x) -> bool:
    return x.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _math_type(x) -> int:
    """float64 stays float64; everything else computes in float32."""
    return _DOUBLE if x.dtype == ir.DataType.DOUBLE else _FLOAT


def _onnx_type(x) -> int:
    return int(x.dtype)


def _const(value, onnx_type: int):
    np_type = {_FLOAT: np.float32, _DOUBLE: np.float64, _INT64: np.int64}[onnx_type]
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=np_type)))


def _i64(values):
    return _const(list(values) if isinstance(values, (list, tuple)) else [values], _INT64)


def _col(x, i: int):
    """x[..., i:i+1]."""
    return op.Slice(x, _i64([i]), _i64([i + 1]), _i64([-1]))


_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _check_float_boxes(name: str, x):
    if x.dtype is not None and x.dtype not in _FLOAT_TYPES:
        raise NotImplementedError(
            f"torch.ops.maskops.{name}: ONNX export supports floating boxes only, got {x.dtype}"
        )


_SCALAR_TYPES = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16}
_ONNX_TYPES = {torch.float32: _FLOAT, torch.float64: _DOUBLE, torch.float16: 10, torch.bfloat16: 16}


def _onnx_dtype(dtype) -> int:
    """ONNX element type of a torch dtype, an onnx_ir DataType (the exporter's form) or a
    ScalarType number."""
    if isinstance(dtype, ir.DataType):
        return int(dtype)
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        dtype = _SCALAR_TYPES[dtype]
    return _ONNX_TYPES[dtype]


# ---- RoIAlign ----


def _roi_align_level(feat, boxes4, batch_idx, scale, ph, pw, sampling_ratio, aligned):
    return op.RoiAlign(
        feat,
        boxes4,
        batch_idx,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        mode="avg",
        output_height=int(ph),
        output_width=int(pw),
        sampling_ratio=max(int(sampling_ratio), 0),
        spatial_scale=float(scale),
    )


def _rois_parts(rois, to_type: int):
    batch_idx = op.Cast(op.Reshape(_col(rois, 0), _i64([-1])), to=_INT64)
    boxes4 = op.Cast(op.Slice(rois, _i64([1]), _i64([5]), _i64([1])), to=to_type)
    return batch_idx, boxes4


def roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    half = _is_half(input)
    t = _FLOAT if half else _onnx_type(input)
    x = op.Cast(input, to=_FLOAT) if half else input
    batch_idx, boxes4 = _rois_parts(rois, t)
    out = _roi_align_level(
        x, boxes4, batch_idx, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
    )
    return op.Cast(out, to=_onnx_type(input)) if half else out


def multiscale_roi_align(
    features,
    rois,
    spatial_scales,
    pooled_height,
    pooled_width,
    sampling_ratio,
    aligned,
    canonical_scale,
    canonical_level,
    k_min,
):
    features = list(features)
    levels = len(features)
    half = _is_half(features[0])
    t = _FLOAT if half else _onnx_type(features[0])
    feats = [op.Cast(f, to=_FLOAT) if half else f for f in features]
    batch_idx, boxes4 = _rois_parts(rois, t)
    if levels == 1:
        out = _roi_align_level(
            feats[0],
            boxes4,
            batch_idx,
            spatial_scales[0],
            pooled_height,
            pooled_width,
            sampling_ratio,
            aligned,
        )
        return op.Cast(out, to=_onnx_type(features[0])) if half else out
    n = op.Shape(rois, start=0, end=1)
    c = op.Shape(feats[0], start=1, end=2)
    out_shape = op.Concat(n, c, _i64([int(pooled_height), int(pooled_width)]), axis=0)
    out = op.CastLike(op.ConstantOfShape(out_shape), feats[0])
    # torchvision's LevelMapper, in the boxes' math type:
    # floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6), clamped.
    mt = _math_type(rois)
    b = op.Cast(op.Slice(rois, _i64([1]), _i64([5]), _i64([1])), to=mt)
    area = op.Mul(op.Sub(_col(b, 2), _col(b, 0)), op.Sub(_col(b, 3), _col(b, 1)))
    ratio = op.Div(op.Sqrt(area), _const(canonical_scale, mt))
    log2 = op.Div(op.Log(ratio), _const(math.log(2.0), mt))
    k = op.Floor(op.Add(op.Add(_const(canonical_level, mt), log2), _const(1e-6, mt)))
    k = op.Min(op.Max(k, _const(k_min, mt)), _const(k_min + levels - 1, mt))
    level = op.Reshape(op.Sub(k, _const(k_min, mt)), _i64([-1]))  # NaN: no level
    for lvl in range(levels):
        mask = op.Equal(level, _const(float(lvl), mt))
        idx = op.Transpose(op.NonZero(mask), perm=[1, 0])  # [K_l, 1]
        flat = op.Reshape(idx, _i64([-1]))
        pooled = _roi_align_level(
            feats[lvl],
            op.Gather(boxes4, flat, axis=0),
            op.Gather(batch_idx, flat, axis=0),
            spatial_scales[lvl],
            pooled_height,
            pooled_width,
            sampling_ratio,
            aligned,
        )
        out = op.ScatterND(out, idx, pooled)
    return op.Cast(out, to=_onnx_type(features[0])) if half else out


# ---- NMS ----


def _order_kept(selected, scores32, n, extra_filter=None):
    """Kept box indices (selected[:, 2]) by decreasing score, equal scores by index."""
    kept_idx = op.Slice(selected, _i64([2]), _i64([3]), _i64([1]))  # [M, 1]
    keep = op.ScatterND(
        op.Cast(op.ConstantOfShape(n), to=_BOOL),
        kept_idx,
        op.Expand(
            op.Constant(value=ir.tensor(np.array([True]))), op.Shape(kept_idx, start=0, end=1)
        ),
    )
    _, order = op.TopK(scores32, n, axis=0, largest=1, sorted=1)
    kept_in_order = op.Gather(keep, order, axis=0)
    if extra_filter is not None:
        kept_in_order = op.And(kept_in_order, op.Gather(extra_filter, order, axis=0))
    return op.Compress(order, kept_in_order, axis=0)


def _nms_core(
    boxes, scores, iou_threshold, score_threshold, max_output, classes=None, num_classes=None
):
    _check_float_boxes("nms" if classes is None else "batched_nms", boxes)
    b32 = op.Cast(boxes, to=_FLOAT)
    s32 = op.Cast(scores, to=_FLOAT)
    n = op.Shape(boxes, start=0, end=1)
    if classes is None:
        nms_scores = op.Reshape(s32, _i64([1, 1, -1]))
        # Greedy in score order: the first max_output kept are those of a full NMS.
        per_class = _i64([max_output]) if max_output is not None else n
        selected = op.NonMaxSuppression(
            op.Unsqueeze(b32, _i64([0])),
            nms_scores,
            per_class,
            _const([float(iou_threshold)], _FLOAT),
        )
    else:
        # One NonMaxSuppression class per distinct class id; -inf outside the class and
        # a score threshold of -inf < t keeps every real score.
        if num_classes is None:
            _, _, inverse, _ = op.Unique(classes, sorted=1)
            count = op.Add(
                op.ReduceMax(op.Concat(inverse, _i64([-1]), axis=0), keepdims=1), _i64([1])
            )
        else:
            inverse, count = classes, _i64([num_classes])
        ids = op.Range(
            op.Constant(value_int=0), op.Squeeze(count, _i64([0])), op.Constant(value_int=1)
        )
        member = op.Equal(op.Unsqueeze(ids, _i64([1])), op.Unsqueeze(inverse, _i64([0])))
        neg_inf = _const(-np.inf, _FLOAT)
        nms_scores = op.Unsqueeze(
            op.Where(member, op.Unsqueeze(s32, _i64([0])), neg_inf), _i64([0])
        )
        selected = op.NonMaxSuppression(
            op.Unsqueeze(b32, _i64([0])),
            nms_scores,
            n,
            _const([float(iou_threshold)], _FLOAT),
            _const([float(np.finfo(np.float32).min)], _FLOAT),
        )
    thr_mask = None
    if score_threshold is not None:
        # maskops: `score > score_threshold` in float64, after the suppression.
        thr_mask = op.Greater(op.Cast(scores, to=_DOUBLE), _const(float(score_threshold), _DOUBLE))
    keep = _order_kept(selected, s32, n, thr_mask)
    if max_output is not None:
        keep = op.Slice(keep, _i64([0]), _i64([int(max_output)]), _i64([0]))
    return keep


def nms(boxes, scores, iou_threshold, score_threshold=None, max_output=None):
    return _nms_core(boxes, scores, iou_threshold, score_threshold, max_output)


def batched_nms(boxes, scores, idxs, iou_threshold, score_threshold=None, max_output=None):
    return _nms_core(
        boxes, scores, iou_threshold, score_threshold, max_output, classes=op.Cast(idxs, to=_INT64)
    )


# ---- boxes ----


def box_iou(boxes1, boxes2):
    _check_float_boxes("box_iou", boxes1)
    mt = _math_type(boxes1)
    a = op.Cast(boxes1, to=mt)
    b = op.Cast(boxes2, to=mt)
    area_a = op.Mul(op.Sub(_col(a, 2), _col(a, 0)), op.Sub(_col(a, 3), _col(a, 1)))  # [N, 1]
    area_b = op.Mul(op.Sub(_col(b, 2), _col(b, 0)), op.Sub(_col(b, 3), _col(b, 1)))  # [M, 1]
    a3 = op.Unsqueeze(a, _i64([1]))  # [N, 1, 4]
    b3 = op.Unsqueeze(b, _i64([0]))  # [1, M, 4]
    lt = op.Max(
        op.Slice(a3, _i64([0]), _i64([2]), _i64([2])), op.Slice(b3, _i64([0]), _i64([2]), _i64([2]))
    )
    rb = op.Min(
        op.Slice(a3, _i64([2]), _i64([4]), _i64([2])), op.Slice(b3, _i64([2]), _i64([4]), _i64([2]))
    )
    wh = op.Max(op.Sub(rb, lt), _const(0.0, mt))  # [N, M, 2]
    inter = op.Squeeze(op.Mul(_col(wh, 0), _col(wh, 1)), _i64([2]))  # [N, M]
    union = op.Sub(op.Add(area_a, op.Transpose(area_b, perm=[1, 0])), inter)
    zero = _const(0.0, mt)
    iou = op.Where(op.Greater(union, zero), op.Div(inter, union), zero)
    return op.Cast(iou, to=_onnx_type(boxes1))


def _decode(rel_codes, boxes, weights, clamp, mt: int, out_type: int):
    shape = op.Concat(
        op.Shape(rel_codes, start=0, end=1),
        op.Div(op.Shape(rel_codes, start=1, end=2), _i64([4])),
        _i64([4]),
        axis=0,
    )
    codes = op.Reshape(op.Cast(rel_codes, to=mt), shape)  # [N, K, 4]
    b = op.Unsqueeze(op.Cast(boxes, to=mt), _i64([1]))  # [N, 1, 4]
    widths = op.Sub(_col(b, 2), _col(b, 0))
    heights = op.Sub(_col(b, 3), _col(b, 1))
    half = _const(0.5, mt)
    ctr_x = op.Add(_col(b, 0), op.Mul(half, widths))
    ctr_y = op.Add(_col(b, 1), op.Mul(half, heights))
    wx, wy, ww, wh = (_const(float(w), mt) for w in weights)
    dx = op.Div(_col(codes, 0), wx)
    dy = op.Div(_col(codes, 1), wy)
    lim = _const(float(clamp), mt)
    dw = op.Min(op.Div(_col(codes, 2), ww), lim)
    dh = op.Min(op.Div(_col(codes, 3), wh), lim)
    pcx = op.Add(op.Mul(dx, widths), ctr_x)
    pcy = op.Add(op.Mul(dy, heights), ctr_y)
    c2c_w = op.Mul(half, op.Mul(op.Exp(dw), widths))
    c2c_h = op.Mul(half, op.Mul(op.Exp(dh), heights))
    out = op.Concat(
        op.Sub(pcx, c2c_w), op.Sub(pcy, c2c_h), op.Add(pcx, c2c_w), op.Add(pcy, c2c_h), axis=-1
    )
    return op.Cast(out, to=out_type)


def decode_boxes(rel_codes, boxes, weights, clamp):
    return _decode(rel_codes, boxes, weights, clamp, _math_type(rel_codes), _onnx_type(rel_codes))


def clip_boxes(boxes, height, width):
    lo = op.CastLike(_const([0.0, 0.0, 0.0, 0.0], _DOUBLE), boxes)
    hi = op.CastLike(
        _const([float(width), float(height), float(width), float(height)], _DOUBLE), boxes
    )
    return op.Min(op.Max(boxes, lo), hi)


def _not_small(boxes, min_size, mt=None):
    mt = _math_type(boxes) if mt is None else mt
    b = op.Cast(boxes, to=mt)
    m = _const(float(min_size), mt)
    ok = op.And(
        op.GreaterOrEqual(op.Sub(_col(b, 2), _col(b, 0)), m),
        op.GreaterOrEqual(op.Sub(_col(b, 3), _col(b, 1)), m),
    )
    return op.Reshape(ok, _i64([-1]))


def remove_small_boxes(boxes, min_size):
    _check_float_boxes("remove_small_boxes", boxes)
    return op.Reshape(op.NonZero(_not_small(boxes, min_size)), _i64([-1]))


# ---- anchors ----


def generate_anchors(
    sizes, aspect_ratios, sizes_per_level, ratios_per_level, grid_sizes, strides, dtype
):
    out_type = _onnx_dtype(dtype)
    s_all = op.Cast(sizes, to=_FLOAT)
    r_all = op.Cast(aspect_ratios, to=_FLOAT)
    levels = []
    so = ro = 0
    for lvl, (ns, nr) in enumerate(zip(sizes_per_level, ratios_per_level)):
        s = op.Slice(s_all, _i64([so]), _i64([so + ns]), _i64([0]))
        r = op.Slice(r_all, _i64([ro]), _i64([ro + nr]), _i64([0]))
        so, ro = so + ns, ro + nr
        h_ratios = op.Sqrt(r)
        w_ratios = op.Div(_const(1.0, _FLOAT), h_ratios)
        ws = op.Reshape(
            op.Mul(op.Unsqueeze(w_ratios, _i64([1])), op.Unsqueeze(s, _i64([0]))), _i64([-1, 1])
        )
        hs = op.Reshape(
            op.Mul(op.Unsqueeze(h_ratios, _i64([1])), op.Unsqueeze(s, _i64([0]))), _i64([-1, 1])
        )
        base = op.Round(
            op.Div(op.Concat(op.Neg(ws), op.Neg(hs), ws, hs, axis=1), _const(2.0, _FLOAT))
        )
        base = op.Cast(base, to=out_type)  # [A, 4]
        gh, gw = grid_sizes[2 * lvl], grid_sizes[2 * lvl + 1]
        sh, sw = strides[2 * lvl], strides[2 * lvl + 1]
        for v, what in ((gh, "grid size"), (gw, "grid size"), (sh, "stride"), (sw, "stride")):
            if not isinstance(v, int):
                raise NotImplementedError(
                    f"torch.ops.maskops.generate_anchors: ONNX export needs a fixed {what} "
                    f"per level (export for one image size), got {v!r}"
                )
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        sx = op.Mul(op.Range(zero, op.Constant(value_int=gw), one), op.Constant(value_int=sw))
        sy = op.Mul(op.Range(zero, op.Constant(value_int=gh), one), op.Constant(value_int=sh))
        grid = _i64([gh, gw])
        sx = op.Reshape(op.Expand(op.Unsqueeze(sx, _i64([0])), grid), _i64([-1, 1]))
        sy = op.Reshape(op.Expand(op.Unsqueeze(sy, _i64([1])), grid), _i64([-1, 1]))
        shifts = op.Cast(op.Concat(sx, sy, sx, sy, axis=1), to=out_type)  # [H * W, 4]
        anchors = op.Add(op.Unsqueeze(shifts, _i64([1])), op.Unsqueeze(base, _i64([0])))
        levels.append(op.Reshape(anchors, _i64([-1, 4])))
    return levels[0] if len(levels) == 1 else op.Concat(*levels, axis=0)


# ---- mask paste ----


def _interp_matrix(first, last, size: int, in_size: int, mt: int):
    """[N, size, in_size]: the bilinear taps (align_corners=False) that resize in_size
    cells onto the pixel span [first, last] (inclusive) of an axis of `size` pixels; zero
    rows outside the span."""
    w = op.Max(op.Add(op.Sub(last, first), _i64(1)), _i64(1))  # [N, 1]
    scale = op.Div(_const(float(in_size), mt), op.Cast(w, to=mt))  # [N, 1]
    pix = op.Unsqueeze(
        op.Range(op.Constant(value_int=0), op.Constant(value_int=size), op.Constant(value_int=1)),
        _i64([0]),
    )  # [1, size]
    dst = op.Cast(op.Sub(pix, first), to=mt)
    src = op.Sub(op.Mul(scale, op.Add(dst, _const(0.5, mt))), _const(0.5, mt))
    src = op.Max(src, _const(0.0, mt))
    i0 = op.Min(op.Cast(op.Floor(src), to=_INT64), _i64(in_size - 1))
    lam = op.Min(op.Max(op.Sub(src, op.Cast(i0, to=mt)), _const(0.0, mt)), _const(1.0, mt))
    i1 = op.Min(op.Add(i0, _i64(1)), _i64(in_size - 1))
    inside = op.And(op.GreaterOrEqual(pix, first), op.LessOrEqual(pix, last))  # [N, size]
    k = op.Range(op.Constant(value_int=0), op.Constant(value_int=in_size), op.Constant(value_int=1))
    k = op.Reshape(k, _i64([1, 1, -1]))
    zero = _const(0.0, mt)
    w0 = op.Where(
        op.Equal(op.Unsqueeze(i0, _i64([2])), k),
        op.Unsqueeze(op.Sub(_const(1.0, mt), lam), _i64([2])),
        zero,
    )
    w1 = op.Where(op.Equal(op.Unsqueeze(i1, _i64([2])), k), op.Unsqueeze(lam, _i64([2])), zero)
    m = op.Add(w0, w1)
    return op.Where(op.Unsqueeze(inside, _i64([2])), m, zero)  # [N, size, in_size]


def paste_masks(masks, boxes, height, width, padding, threshold, as_uint8):
    m_size = masks.shape[-1]
    if not isinstance(m_size, int):
        raise NotImplementedError(
            "torch.ops.maskops.paste_masks: ONNX export needs a fixed mask size"
        )
    mt = _math_type(masks)
    bt = _math_type(boxes)
    padded = m_size + 2 * int(padding)
    p = op.Cast(masks, to=mt)
    if padding:
        pad = int(padding)
        p = op.Pad(p, _i64([0, 0, pad, pad, 0, 0, pad, pad]))
    b = op.Cast(boxes, to=bt)
    scale = _const(float(padded) / float(m_size), bt)
    half = _const(0.5, bt)
    w_half = op.Mul(op.Mul(op.Sub(_col(b, 2), _col(b, 0)), half), scale)
    h_half = op.Mul(op.Mul(op.Sub(_col(b, 3), _col(b, 1)), half), scale)
    x_c = op.Mul(op.Add(_col(b, 2), _col(b, 0)), half)
    y_c = op.Mul(op.Add(_col(b, 3), _col(b, 1)), half)
    x0 = op.Cast(op.Sub(x_c, w_half), to=_INT64)  # truncation toward zero
    x1 = op.Cast(op.Add(x_c, w_half), to=_INT64)
    y0 = op.Cast(op.Sub(y_c, h_half), to=_INT64)
    y1 = op.Cast(op.Add(y_c, h_half), to=_INT64)
    rx = _interp_matrix(x0, x1, int(width), padded, mt)  # [N, W, P]
    ry = _interp_matrix(y0, y1, int(height), padded, mt)  # [N, H, P]
    # Columns first, then rows, as the kernels sum.
    cols = op.MatMul(p, op.Unsqueeze(op.Transpose(rx, perm=[0, 2, 1]), _i64([1])))  # N,C,P,W
    out = op.MatMul(op.Unsqueeze(ry, _i64([1])), cols)  # [N, C, H, W]
    if threshold is None:
        return op.Cast(out, to=_onnx_type(masks))
    binary = op.GreaterOrEqual(out, _const(float(threshold), mt))
    return op.Cast(binary, to=_UINT8) if as_uint8 else binary


# ---- RPN proposals ----


def _concat0(xs):
    return xs[0] if len(xs) == 1 else op.Concat(*xs, axis=0)


def rpn_proposals(
    objectness,
    deltas,
    anchors,
    image_sizes,
    pre_nms_top_n,
    post_nms_top_n,
    nms_thresh,
    score_thresh,
    min_size,
    num_anchors_per_level,
):
    batch = len(image_sizes) // 2
    levels = [int(n) for n in num_anchors_per_level]
    mt = _math_type(deltas)
    obj = op.Reshape(objectness, _i64([batch, -1]))
    dl = op.Cast(op.Reshape(deltas, _i64([batch, -1, 4])), to=mt)
    per_image_anchors = len(anchors.shape) == 3
    anc = op.Cast(anchors, to=mt)
    out_boxes, out_scores = [], []
    for i in range(batch):
        h, w = int(image_sizes[2 * i]), int(image_sizes[2 * i + 1])
        logit_i = op.Reshape(op.Slice(obj, _i64([i]), _i64([i + 1]), _i64([0])), _i64([-1]))
        d_i = op.Reshape(op.Slice(dl, _i64([i]), _i64([i + 1]), _i64([0])), _i64([-1, 4]))
        a_i = anc
        if per_image_anchors:
            a_i = op.Reshape(op.Slice(anc, _i64([i]), _i64([i + 1]), _i64([0])), _i64([-1, 4]))
        logits, index, level_ids = [], [], []
        offset = 0
        for lvl, n in enumerate(levels):
            k = min(int(pre_nms_top_n), n)
            if k == 0:
                offset += n
                continue
            seg = op.Slice(logit_i, _i64([offset]), _i64([offset + n]), _i64([0]))
            v, ix = op.TopK(seg, _i64([k]), axis=0, largest=1, sorted=1)
            logits.append(v)
            index.append(op.Add(ix, _i64([offset])))
            level_ids.append(_const([lvl] * k, _INT64))
            offset += n
        if not logits:
            out_boxes.append(op.Cast(op.ConstantOfShape(_i64([0, 4])), to=_onnx_type(deltas)))
            out_scores.append(op.Cast(op.ConstantOfShape(_i64([0])), to=_onnx_type(objectness)))
            continue
        logit, idx, lvl_ids = _concat0(logits), _concat0(index), _concat0(level_ids)
        boxes = _decode(
            op.Gather(d_i, idx, axis=0),
            op.Gather(a_i, idx, axis=0),
            (1.0, 1.0, 1.0, 1.0),
            math.log(1000.0 / 16),
            mt,
            mt,
        )
        boxes = clip_boxes(op.Reshape(boxes, _i64([-1, 4])), h, w)
        score = op.Sigmoid(logit)
        ok = op.And(
            _not_small(boxes, min_size, mt),
            op.GreaterOrEqual(op.Cast(score, to=mt), _const(float(score_thresh), mt)),
        )
        boxes = op.Compress(boxes, ok, axis=0)
        score = op.Compress(score, ok, axis=0)
        lvl_ids = op.Compress(lvl_ids, ok, axis=0)
        keep = _nms_core(
            boxes,
            score,
            nms_thresh,
            None,
            int(post_nms_top_n),
            classes=lvl_ids,
            num_classes=len(levels),
        )
        out_boxes.append(op.Cast(op.Gather(boxes, keep, axis=0), to=_onnx_type(deltas)))
        out_scores.append(op.Gather(score, keep, axis=0))
    # Two Tensor[] results: ONNX sequences (the exporter reads their items with SequenceAt).
    return op.SequenceConstruct(*out_boxes), op.SequenceConstruct(*out_scores)
