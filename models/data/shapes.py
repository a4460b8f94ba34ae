"""A synthetic instance segmentation dataset of coloured shapes, written in COCO format.

    generate(out, train, val, size, seed)     # or: python -m tools.shapes --out DIR ...

writes ``DIR/{train,val}/NNNNNN.png`` and ``DIR/annotations/instances_{train,val}.json``,
which :class:`models.data.CocoDataset` reads like any COCO split. Each image has a solid,
gradient or noisy background and ``min_shapes..max_shapes`` circles, squares and triangles of
random colour, size, position and rotation, possibly overlapping (later shapes occlude
earlier ones). A shape that is fully visible is annotated with its polygon, an occluded one
with the compressed RLE of its visible part, so both paths of the loader are exercised.
Masks come from pycocotools' rasterisation of the polygons, and the image is painted from
those same masks, so masks and pixels agree exactly.

The output depends on the arguments only: image ``i`` of a split is drawn from its own
seeded generator.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]

_SPLIT_SALT = {"train": 1, "val": 2}


def shape_polygon(kind: int, cx: float, cy: float, size: float, angle: float) -> List[float]:
    """Vertices ``[x0, y0, x1, y1, ...]`` of a shape whose bounding circle has diameter
    ``size``: a 32-gon circle (1), a square (2) or an equilateral triangle (3), rotated by
    ``angle`` radians about ``(cx, cy)``."""
    r = size / 2
    n = {1: 32, 2: 4, 3: 3}[kind]
    start = angle + (math.pi / 4 if kind == 2 else -math.pi / 2)
    pts = []
    for k in range(n):
        a = start + 2 * math.pi * k / n
        pts += [cx + r * math.cos(a), cy + r * math.sin(a)]
    return [round(v, 2) for v in pts]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0, 255, 3)
    style = rng.integers(3)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if style == 1:  # linear gradient towards a second colour
        other = rng.uniform(0, 255, 3)
        t = np.linspace(0, 1, size, dtype=np.float32)
        t = t[None, :, None] if rng.integers(2) else t[:, None, None]
        img = np.broadcast_to(base * (1 - t) + other * t, (size, size, 3)).astype(np.float32)
    elif style == 2:  # low-amplitude noise
        img = img + rng.normal(0, 12, (size, size, 3))
    return img


def _distinct_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    # Redraw until the colour stands out from the mean background: shapes are meant to be
    # visible, the difficulty is in the classes, overlaps and sizes.
    for _ in range(50):
        c = rng.uniform(0, 255, 3)
        if np.abs(c - avoid).sum() > 150:
            return c
    return 255 - avoid


def render_image(
    rng: np.random.Generator,
    size: int,
    min_shapes: int,
    max_shapes: int,
    min_frac: float = 0.2,
    max_frac: float = 0.55,
) -> Tuple[np.ndarray, List[dict]]:
    """One image and its annotations (without ids).

    Returns:
        ``uint8 [size, size, 3]`` pixels and a list of ``{"category_id", "segmentation",
        "bbox", "area", "iscrowd"}``.
    """
    img = _background(rng, size)
    avoid = img.reshape(-1, 3).mean(0)
    n = int(rng.integers(min_shapes, max_shapes + 1))
    shapes: List[Tuple[int, List[float], np.ndarray]] = []
    for _ in range(n):
        for _attempt in range(20):
            kind = int(rng.integers(1, 4))
            s = rng.uniform(min_frac, max_frac) * size
            cx, cy = rng.uniform(s / 2, size - s / 2, 2)
            poly = shape_polygon(kind, cx, cy, s, rng.uniform(0, 2 * math.pi))
            m = mask_utils.decode(mask_utils.frPyObjects([poly], size, size))[..., 0]
            # Reject a shape that would hide more than half of an earlier one.
            if all((m & prev).sum() <= 0.5 * prev.sum() for _, _, prev in shapes):
                shapes.append((kind, poly, m))
                break
    anns = []
    covered = np.zeros((size, size), dtype=np.uint8)
    for i in reversed(range(len(shapes))):  # topmost first, to find what each one shows
        kind, poly, m = shapes[i]
        visible = m & (1 - covered)
        covered |= m
        if visible.sum() < 16:
            continue
        if (visible == m).all():
            seg = [poly]
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, size, size))
        else:
            rle = mask_utils.encode(np.asfortranarray(visible))
            seg = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
        anns.append(
            {
                "category_id": kind,
                "segmentation": seg,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": float(mask_utils.area(rle)),
                "iscrowd": 0,
                "_mask": visible,
            }
        )
    anns.reverse()
    for a in anns:  # paint bottom to top from the masks, so pixels and masks agree
        colour = _distinct_colour(rng, avoid)
        img[a.pop("_mask").astype(bool)] = colour
    img = img + rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), anns


def write_split(
    out: Path,
    split: str,
    count: int,
    size: int,
    seed: int,
    min_shapes: int = 1,
    max_shapes: int = 3,
    empty_every: int = 0,
    first_image_id: int = 1,
    first_ann_id: int = 1,
) -> Path:
    """Writes ``count`` images of ``split`` and their instances JSON; returns the JSON path.

    Args:
        empty_every: with ``k > 0``, every ``k``-th image has no shapes (background only).
    """
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    salt = _SPLIT_SALT.get(split, sum(map(ord, split)))
    for i in range(count):
        rng = np.random.default_rng([seed, salt, i])
        empty = empty_every > 0 and i % empty_every == empty_every - 1
        pixels, anns = render_image(
            rng, size, 0 if empty else min_shapes, 0 if empty else max_shapes
        )
        image_id = first_image_id + i
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(out / split / name)
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
        for a in anns:
            annotations.append({"id": ann_id, "image_id": image_id, **a})
            ann_id += 1
    path = out / "annotations" / f"instances_{split}.json"
    data = {
        "info": {"description": f"synthetic shapes, seed {seed}", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    path.write_text(json.dumps(data))
    return path


def generate(
    out,
    train: int,
    val: int,
    size: int = 128,
    seed: int = 0,
    min_shapes: int = 1,
    max_shapes: int = 3,
    empty_every: int = 0,
) -> Path:
    """Writes the train and val splits under ``out`` (see the module docstring)."""
    out = Path(out)
    write_split(out, "train", train, size, seed, min_shapes, max_shapes, empty_every)
    # Distinct image and annotation ids across splits, like COCO's.
    write_split(
        out,
        "val",
        val,
        size,
        seed,
        min_shapes,
        max_shapes,
        empty_every,
        first_image_id=10_000_000,
        first_ann_id=10_000_000,
    )
    return out
