"""Reading images and drawing detections, proposals and feature maps (for the CLIs)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch
import torchvision
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from . import transform as T
from .categories import category_name
from .profiling import LEVEL_NAMES


def read_image(path: str) -> Tensor:
    """An image file as ``Tensor[3, H, W]`` float32 in ``[0, 1]`` (grey and RGBA become RGB)."""
    img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
    return img.float() / 255


def save_image(img: Tensor, path: str) -> None:
    """Writes a ``uint8`` ``Tensor[C, H, W]`` (C = 1 or 3) as PNG (``.png``) or JPEG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = img.cpu()
    if path.lower().endswith((".jpg", ".jpeg")):
        torchvision.io.write_jpeg(img, path, quality=95)
    else:
        torchvision.io.write_png(img, path)


def to_uint8(image: Tensor) -> Tensor:
    """``Tensor[3, H, W]`` in ``[0, 1]`` -> ``uint8``."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def palette(n: int) -> list:
    """``n`` distinct, saturated RGB colours (golden-ratio hues)."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        k = [(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6]
        rgb = [int(255 * (1 - 0.85 * max(0.0, min(v, 4 - v, 1.0)))) for v in k]
        out.append(tuple(rgb))
    return out


def draw_detections(
    image: Tensor,
    det: Dict[str, Tensor],
    score_thresh: float = 0.5,
    names: Optional[Sequence[str]] = None,
    mask_alpha: float = 0.45,
) -> Tensor:
    """The image with each detection's mask (coloured), box and ``label score`` drawn.

    Args:
        image: ``Tensor[3, H, W]`` in ``[0, 1]``.
        det: ``boxes: Tensor[D, 4]`` (x1, y1, x2, y2), ``labels``, ``scores`` and optionally
            ``masks: Tensor[D, 1, H, W]`` (bool, or probabilities thresholded at 0.5).
        score_thresh: detections under it are not drawn.
        names: class names by label (default: COCO's).

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    out = to_uint8(image)
    sel = det["scores"].cpu() >= score_thresh
    if not bool(sel.any()):
        return out
    colours = palette(int(sel.sum()))
    if "masks" in det:
        masks = det["masks"].cpu()[sel][:, 0]
        masks = masks if masks.dtype == torch.bool else masks >= 0.5
        out = draw_segmentation_masks(out, masks, alpha=mask_alpha, colors=colours)
    labels = [
        (names[int(l)] if names is not None and int(l) < len(names) else category_name(int(l)))
        + f" {float(s):.2f}"
        for l, s in zip(det["labels"].cpu()[sel], det["scores"].cpu()[sel])
    ]
    return draw_bounding_boxes(
        out, det["boxes"].cpu()[sel].float(), labels=labels, colors=colours, width=2
    )


def draw_boxes(image: Tensor, boxes: Tensor, colour=(255, 200, 0), width: int = 1) -> Tensor:
    """``uint8`` image with ``Tensor[K, 4]`` boxes drawn (no labels)."""
    return draw_bounding_boxes(to_uint8(image), boxes.cpu().float(), colors=colour, width=width)


def feature_heatmap(feature: Tensor) -> Tensor:
    """A feature map ``Tensor[C, H, W]`` as a ``uint8 Tensor[3, H, W]`` heat map of its
    per-location L2 norm (dark blue: weak, yellow: strong), normalised to the map's range."""
    norm = feature.detach().float().norm(dim=0)
    lo, hi = norm.min(), norm.max()
    t = ((norm - lo) / (hi - lo).clamp(min=1e-12)).cpu()
    # A three-stop ramp: dark blue -> magenta -> yellow.
    stops = torch.tensor([[20, 20, 80], [190, 40, 120], [250, 230, 60]], dtype=torch.float32)
    pos = t * 2
    i = pos.floor().clamp(max=1).long()
    f = (pos - i)[..., None]
    rgb = stops[i] * (1 - f) + stops[i + 1] * f
    return rgb.permute(2, 0, 1).round().to(torch.uint8)


def save_stage_images(
    save_dir: str, image: torch.Tensor, rec, det, batch_size_hw, names=None
) -> List[str]:
    """Writes one image per stage into ``save_dir`` (detections labelled with ``names``, COCO's
    by default); returns the paths."""
    os.makedirs(save_dir, exist_ok=True)
    paths = []

    def save(img, name):
        path = os.path.join(save_dir, name)
        save_image(img, path)
        paths.append(path)

    save(
        draw_detections(
            image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)}
        ),
        "1_input.png",
    )
    for k, f in rec.outputs["features"].items():
        save(feature_heatmap(f[0]), f"2_features_{LEVEL_NAMES.get(k, k)}.png")
    proposals, scores = rec.outputs["proposals"]
    # Proposals live in the resized image: map the best 100 back to the input image.
    top = T.resize_boxes(proposals[0][:100].cpu(), batch_size_hw, image.shape[-2:])
    save(draw_boxes(image, top), "3_proposals_top100.png")
    save(draw_detections(image, det, score_thresh=0.5, names=names), "6_masks.png")
    return paths
