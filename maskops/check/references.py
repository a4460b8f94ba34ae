"""Float64 references of the ops, in plain PyTorch.

Written from the ops' documented semantics (torchvision's), not from the kernels: e.g.
RoIAlign as products of per-axis bilinear interpolation matrices. The self-check and the
tests both compare against these.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .tolerances import F64


def _axis_weights(start: float, length: float, pooled: int, grid: int, size: int) -> torch.Tensor:
    """RoIAlign along one axis: ``[pooled, size]`` weights that average the bilinear samples
    of each of ``pooled`` bins (``grid`` samples per bin, at the bin's sub-cell centres)."""
    bin_size = length / pooled
    p = torch.arange(pooled, dtype=F64)[:, None]
    i = torch.arange(grid, dtype=F64)[None, :]
    pos = (start + p * bin_size + (i + 0.5) * bin_size / grid).flatten()
    valid = ((pos >= -1.0) & (pos <= size)).to(F64)  # further out a sample reads 0
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    last = low >= size - 1  # at or past the last cell: read the last cell
    low = torch.where(last, float(size - 1), low)
    frac = torch.where(last, 0.0, pos - low)
    high = torch.where(last, low, low + 1)
    w = torch.zeros(pooled * grid, size, dtype=F64)
    rows = torch.arange(pooled * grid)
    w.index_put_((rows, low.long()), (1 - frac) * valid, accumulate=True)
    w.index_put_((rows, high.long()), frac * valid, accumulate=True)
    return w.view(pooled, grid, size).mean(1)


def roi_geometry(
    box: Sequence[float], scale: float, ph: int, pw: int, sampling_ratio: int, aligned: bool
):
    """(y1, h, grid_h, x1, w, grid_w) of one RoI in feature-map cells."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - offset for v in box)
    w, h = x2 - x1, y2 - y1
    if not aligned:  # the original Mask R-CNN forces boxes to at least one cell
        w, h = max(w, 1.0), max(h, 1.0)
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / ph)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / pw)
    return y1, h, gh, x1, w, gw


def _roi_weights(box, scale, ph, pw, height, width, sampling_ratio, aligned):
    y1, h, gh, x1, w, gw = roi_geometry(box, scale, ph, pw, sampling_ratio, aligned)
    if gh <= 0 or gw <= 0 or height == 0 or width == 0:
        return None  # no samples: the output is 0
    return _axis_weights(y1, h, ph, gh, height), _axis_weights(x1, w, pw, gw, width)


def ref_roi_align(
    x: torch.Tensor,
    rois: torch.Tensor,
    ph: int,
    pw: int,
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    levels=None,
):
    """Float64 RoIAlign of ``x`` (one level, or a list of pyramid levels with ``levels[k]``
    the level of RoI k and ``scale`` a list). Returns (output, per-RoI weights)."""
    feats = [t.detach().to(F64) for t in (x if isinstance(x, (list, tuple)) else [x])]
    scales = scale if isinstance(scale, (list, tuple)) else [scale]
    rois = rois.detach().to(F64)
    k_total, channels = rois.shape[0], feats[0].shape[1]
    out = torch.zeros(k_total, channels, ph, pw, dtype=F64)
    weights = []
    for k in range(k_total):
        lvl = 0 if levels is None else levels[k]
        if lvl is None:
            weights.append(None)
            continue
        f = feats[lvl]
        wts = _roi_weights(
            rois[k, 1:].tolist(),
            scales[lvl],
            ph,
            pw,
            f.shape[2],
            f.shape[3],
            sampling_ratio,
            aligned,
        )
        weights.append(None if wts is None else (lvl, int(rois[k, 0]), *wts))
        if wts is not None:
            out[k] = torch.einsum("ph,chw,qw->cpq", wts[0], f[int(rois[k, 0])], wts[1])
    return out, weights


def ref_roi_align_backward(weights, grad: torch.Tensor, shapes) -> List[torch.Tensor]:
    """The input gradient of :func:`ref_roi_align` for output gradient ``grad``, per level."""
    grads = [torch.zeros(s, dtype=F64) for s in shapes]
    g = grad.detach().to(F64)
    for k, wts in enumerate(weights):
        if wts is not None:
            lvl, b, wy, wx = wts
            grads[lvl][b] += torch.einsum("ph,cpq,qw->chw", wy, g[k], wx)
    return grads


def ref_fpn_levels(
    rois: torch.Tensor, n_levels: int, k_min: int, canonical_scale: float, canonical_level: float
) -> List[Optional[int]]:
    """FPN level of each RoI (index into the levels; None: negative area, no level)."""
    out = []
    for x1, y1, x2, y2 in rois[:, 1:].to(F64).tolist():
        area = (x2 - x1) * (y2 - y1)
        if area < 0:
            out.append(None)
            continue
        v = (
            canonical_level + math.log2(math.sqrt(area) / canonical_scale) + 1e-6
            if area > 0
            else -math.inf
        )
        out.append(int(min(max(math.floor(v), k_min), k_min + n_levels - 1)) - k_min)
    return out


def ref_area(b: torch.Tensor) -> torch.Tensor:
    b = b.to(F64)
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def ref_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU; 0 where the union is 0 (maskops' documented convention)."""
    a, b = a.to(F64), b.to(F64)
    w = (
        torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    ).clamp(min=0)
    h = (
        torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])
    ).clamp(min=0)
    inter = w * h
    union = ref_area(a)[:, None] + ref_area(b)[None, :] - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1.0), 0.0)


def ref_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float, classes=None) -> torch.Tensor:
    """Greedy NMS: by decreasing score (ties by index), keep a box unless a kept box of its
    class overlaps it with IoU > thr."""
    order = torch.sort(scores.to(F64), descending=True, stable=True).indices
    over = ref_iou(boxes, boxes) > thr
    if classes is not None:
        over &= classes[:, None] == classes[None, :]
    removed = [False] * boxes.shape[0]
    keep = []
    for i in order.tolist():
        if removed[i]:
            continue
        keep.append(i)
        for j in over[i].nonzero().flatten().tolist():
            removed[j] = True
    return torch.tensor(keep, dtype=torch.int64)


def ref_anchors(feature_sizes, strides, sizes, ratios) -> torch.Tensor:
    """torchvision AnchorGenerator: per level, cell anchors round((-w, -h, w, h) / 2) (half to
    even; h = sqrt(r) s, w = s / sqrt(r), ratio-major) shifted to every cell, row by row."""
    out = []
    for (fh, fw), (sh, sw), s, r in zip(feature_sizes, strides, sizes, ratios):
        s, hr = torch.tensor(s, dtype=F64), torch.tensor(r, dtype=F64).sqrt()
        ws, hs = (s[None, :] / hr[:, None]).flatten(), (s[None, :] * hr[:, None]).flatten()
        cell = torch.round(torch.stack([-ws, -hs, ws, hs], 1) / 2)
        yy, xx = torch.meshgrid(
            torch.arange(fh, dtype=F64) * sh, torch.arange(fw, dtype=F64) * sw, indexing="ij"
        )
        shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 4)
        out.append((shifts[:, None, :] + cell[None]).reshape(-1, 4))
    return torch.cat(out)


def ref_decode(codes: torch.Tensor, boxes: torch.Tensor, weights, clamp: float) -> torch.Tensor:
    c = codes.to(F64).reshape(codes.shape[0], -1, 4)
    b = boxes.to(F64)[:, None, :]
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    cx, cy = b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h
    wx, wy, ww, wh = weights
    pcx, pcy = c[..., 0] / wx * w + cx, c[..., 1] / wy * h + cy
    pw = torch.exp((c[..., 2] / ww).clamp(max=clamp)) * w
    ph = torch.exp((c[..., 3] / wh).clamp(max=clamp)) * h
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], -1)


def ref_encode(gt: torch.Tensor, proposals: torch.Tensor, weights) -> torch.Tensor:
    g, p = gt.to(F64), proposals.to(F64)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    wx, wy, ww, wh = weights
    return torch.stack(
        [
            wx * ((g[:, 0] + 0.5 * gw) - (p[:, 0] + 0.5 * pw)) / pw,
            wy * ((g[:, 1] + 0.5 * gh) - (p[:, 1] + 0.5 * ph)) / ph,
            ww * torch.log(gw / pw),
            wh * torch.log(gh / ph),
        ],
        1,
    )


def ref_clip(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b = boxes.to(F64)
    bound = torch.tensor([width, height, width, height], dtype=F64)
    return torch.minimum(b.clamp(min=0), bound)


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Bilinear resize ``n_in -> n_out`` with align_corners=False, as a ``[n_out, n_in]`` matrix."""
    src = ((torch.arange(n_out, dtype=F64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().clamp(max=n_in - 1)
    frac = src - i0
    i1 = (i0 + 1).clamp(max=n_in - 1)
    m = torch.zeros(n_out, n_in, dtype=F64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0.long()), 1 - frac, accumulate=True)
    m.index_put_((rows, i1.long()), frac, accumulate=True)
    return m


def expanded_boxes(boxes: torch.Tensor, m: int, padding: int) -> torch.Tensor:
    """Boxes grown by (M + 2 padding) / M about their centre (before truncation to pixels)."""
    b = boxes.to(F64)
    s = (m + 2 * padding) / m
    wh, hh = (b[:, 2] - b[:, 0]) * 0.5 * s, (b[:, 3] - b[:, 1]) * 0.5 * s
    cx, cy = (b[:, 2] + b[:, 0]) * 0.5, (b[:, 3] + b[:, 1]) * 0.5
    return torch.stack([cx - wh, cy - hh, cx + wh, cy + hh], 1)


def ref_paste(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, padding: int
) -> torch.Tensor:
    """torchvision's paste_masks_in_image in float64, every channel: pad each mask, grow its
    box to match, truncate the box to whole pixels, resize bilinearly onto it, clip."""
    n, c, m, _ = masks.shape
    padded = F.pad(masks.to(F64), (padding,) * 4)
    mp = m + 2 * padding
    ext = expanded_boxes(boxes, m, padding).trunc().long().tolist()
    out = torch.zeros(n, c, height, width, dtype=F64)
    for i, (x0, y0, x1, y1) in enumerate(ext):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = torch.einsum(
            "hi,cij,wj->chw", _resize_matrix(mp, h), padded[i], _resize_matrix(mp, w)
        )
        xa, xb, ya, yb = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if xb > xa and yb > ya:
            out[i, :, ya:yb, xa:xb] = resized[:, ya - y0 : yb - y0, xa - x0 : xb - x0]
    return out


def ref_rle(mask: torch.Tensor) -> bytes:
    """COCO compressed RLE of one [H, W] mask: run lengths of the column-major pixels
    starting with a 0-run, each (after the first three, minus the run two before) written as
    6-bit groups (5 data bits + a continuation bit) offset to ASCII 48."""
    flat = (mask != 0).t().flatten().to(torch.int8)
    if flat.numel() == 0:
        return b""
    edges = (flat[1:] != flat[:-1]).nonzero().flatten() + 1
    bounds = [0] + edges.tolist() + [flat.numel()]
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if flat[0] == 1:
        counts = [0] + counts
    out = bytearray()
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append((c | 0x20 if more else c) + 48)
    return bytes(out)
