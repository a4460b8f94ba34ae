"""Random inputs for the checks and the tests, drawn so that no discrete decision (a box
kept or suppressed, a sample at the edge of the map, a pixel truncated) sits within a margin
of its threshold."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .references import ref_iou, roi_geometry
from .tolerances import F64


def rand64(gen, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, dtype=F64)


def random_boxes(
    gen,
    n: int,
    size=256.0,
    min_side: float = 4.0,
    max_side: float = 96.0,
    margin: Optional[float] = None,
    dtype: torch.dtype = F64,
) -> torch.Tensor:
    """[n, 4] boxes (x1, y1, x2, y2), drawn in ``dtype``: sides uniform in [min_side,
    max_side), top-left corners uniform in [0, size - margin) (``size``: a number, or the
    image's (height, width); ``margin`` defaults to ``min_side``, 0 lets a box start anywhere
    in the image)."""
    margin = min_side if margin is None else margin
    if isinstance(size, (tuple, list)):
        span = torch.tensor([size[1] - margin, size[0] - margin], dtype=dtype)
    else:
        span = size - margin
    xy = torch.rand(n, 2, generator=gen, dtype=dtype) * span
    wh = min_side + torch.rand(n, 2, generator=gen, dtype=dtype) * (max_side - min_side)
    return torch.cat([xy, xy + wh], 1)


def redraw(make, bad, tries: int = 100):
    """Draws with ``make(n)`` until no row is ``bad`` (a decision too close to call)."""
    x = make(None)
    for _ in range(tries):
        b = bad(x)
        if not bool(b.any()):
            return x
        x[b] = make(int(b.sum()))
    raise RuntimeError("could not draw inputs away from decision boundaries")


def near_int(v: torch.Tensor, margin: float) -> torch.Tensor:
    return (v - v.round()).abs() < margin


def clear_rois(
    gen, k, batch, image_hw, scale, ph, pw, map_hw, sampling_ratio, aligned, dtype, levels=None
):
    """RoIs [k, 5] (a third partly off the image), redrawn until no sample point sits near
    the edge of the readable range (-1 or the map size), no adaptive grid size near a
    whole number and, with ``levels`` = (n, k_min, canonical scale, canonical level), no
    box near an FPN level boundary."""
    ih, iw = image_hw
    rdtype = (
        dtype if dtype in (torch.float32, F64) else torch.float32
    )  # half features: float32 boxes

    def make(n):
        n = k if n is None else n
        xy = rand64(gen, n, 2) * torch.tensor([iw * 1.2, ih * 1.2], dtype=F64) - torch.tensor(
            [iw * 0.1, ih * 0.1], dtype=F64
        )
        wh = 0.5 + rand64(gen, n, 2) * torch.tensor([iw * 0.6, ih * 0.6], dtype=F64)
        b = torch.randint(0, batch, (n, 1), generator=gen).to(F64)
        return torch.cat([b, xy, xy + wh], 1).to(rdtype).to(F64)

    def bad(r):
        out = torch.zeros(r.shape[0], dtype=torch.bool)
        for j, box in enumerate(r[:, 1:].tolist()):
            if levels is not None:
                n_lv, k_min, cs, cl = levels
                area = (box[2] - box[0]) * (box[3] - box[1])
                v = cl + math.log2(math.sqrt(area) / cs) + 1e-6
                lvl = min(max(math.floor(v), k_min), k_min + n_lv - 1) - k_min
                s, (mh, mw) = scale[lvl], map_hw[lvl]
                out[j] = abs(v - round(v)) < 1e-3
            else:
                s, (mh, mw) = scale, map_hw
            y1, h, gh, x1, w, gw = roi_geometry(box, s, ph, pw, sampling_ratio, aligned)
            if sampling_ratio <= 0:
                out[j] |= bool(near_int(torch.tensor([h / ph, w / pw]), 1e-4).any())
            for start, length, pooled, grid, limit in ((y1, h, ph, gh, mh), (x1, w, pw, gw, mw)):
                if grid <= 0:
                    continue
                p = torch.arange(pooled, dtype=F64)[:, None]
                i = torch.arange(grid, dtype=F64)[None, :]
                pos = start + p * (length / pooled) + (i + 0.5) * (length / pooled) / grid
                m = 1e-4 * (1 + pos.abs())
                out[j] |= bool((((pos + 1).abs() < m) | ((pos - limit).abs() < m)).any())
        return out

    return redraw(make, bad).to(rdtype)


def without_close_calls(
    boxes: torch.Tensor, thresholds: Sequence[float], margin: float = 1e-4, chunk: int = 512
) -> torch.Tensor:
    """A mask of boxes to keep so that no two kept ones have an IoU within ``margin`` of a
    threshold (the later box of each such pair goes). Computed in row chunks, on the boxes'
    device."""
    n = boxes.shape[0]
    drop = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    b = boxes.to(F64)
    for start in range(0, n, chunk):
        iou = ref_iou(b[start : start + chunk], b)
        close = torch.zeros_like(iou, dtype=torch.bool)
        for t in thresholds:
            close |= (iou - t).abs() < margin
        rows = torch.arange(start, start + iou.shape[0], device=boxes.device)[:, None]
        close &= torch.arange(n, device=boxes.device)[None, :] > rows
        drop |= close.any(0)
    return ~drop
