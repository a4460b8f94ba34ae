"""Mask paste: Mask R-CNN's low-resolution masks resampled into full-image masks.

Same result as torchvision's ``paste_masks_in_image`` (which Mask R-CNN uses), in one fused
kernel that only computes the pixels inside each box, optionally thresholded straight to a
bool mask with no float full-image intermediate. Kernels in csrc/paste_masks/.
"""

from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._fx import leaf


def _check(masks: Tensor, boxes: Tensor, padding: int) -> Tensor:
    """Checks the arguments; returns the boxes in a floating dtype."""
    V.floating(masks, "masks")
    V.ndim(masks, 4, "masks", "[N, C, M, M]")
    if masks.shape[-1] != masks.shape[-2]:
        raise ValueError(f"masks must be square ([N, C, M, M]), got shape {tuple(masks.shape)}")
    if masks.shape[-1] == 0 and masks.shape[0] * masks.shape[1] > 0:
        raise ValueError("masks must have a positive size M")
    V.boxes_n4(boxes, "boxes", integers=True)
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(
            f"boxes must have one row per mask ({masks.shape[0]}), got {boxes.shape[0]}"
        )
    V.same_device(boxes, masks, "boxes", "masks")
    if V.integer(padding, "padding") < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    if V.is_integer(boxes):  # torchvision computes with integer boxes in float32 too
        boxes = boxes.to(torch.float64 if masks.dtype == torch.float64 else torch.float32)
    return boxes


@leaf
def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_size: Tuple[int, int],
    threshold: Optional[float] = 0.5,
    padding: int = 1,
    as_uint8: bool = False,
) -> Tensor:
    """Pastes each mask into its box of a full-size image.

    Each ``M x M`` mask is padded by ``padding`` zero cells per side, its box grown by the
    same factor ``(M + 2 * padding) / M`` about its centre and truncated to whole pixels, and
    the padded mask resized bilinearly (``align_corners=False``) onto that box, clipped to the
    image: torchvision's ``paste_masks_in_image``, exactly, without its intermediates.

    Args:
        masks: ``Tensor[N, C, M, M]`` mask probabilities (Mask R-CNN: ``C = 1``, ``M = 28``),
            any floating dtype (half types compute in float32).
        boxes: ``Tensor[N, 4]`` ``(x1, y1, x2, y2)`` in image pixels, floating or integer.
        image_size: ``(height, width)`` of the output.
        threshold: with a number, the output is the binary mask ``value >= threshold`` as
            ``bool`` (``uint8`` with ``as_uint8``), written directly; ``None`` gives the
            probabilities in ``masks``' dtype.
        padding: cells of zero padding around each mask (torchvision: 1).

    Returns:
        ``Tensor[N, C, height, width]``. Not differentiable (an inference op). Boxes with
        NaN coordinates paste nothing. On CUDA the call never waits for the GPU. A leaf of
        ``torch.fx`` tracing.
    """
    boxes = _check(masks, boxes, padding)
    h, w = V.image_size(image_size, "image_size")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a number or None, got {V._describe(threshold)}")
        threshold = float(threshold)
    as_uint8 = V.boolean(as_uint8, "as_uint8")
    return torch.ops.maskops.paste_masks(masks, boxes, h, w, int(padding), threshold, as_uint8)


@leaf
def paste_masks_in_image(
    masks: Tensor, boxes: Tensor, img_shape: Tuple[int, int], padding: int = 1
) -> Tensor:
    """torchvision's ``paste_masks_in_image`` signature: float ``Tensor[N, C, H, W]``
    (:func:`paste_masks` with ``threshold=None``; never waits for the GPU)."""
    return paste_masks(masks, boxes, img_shape, threshold=None, padding=padding)


def masks_to_rle(masks: Tensor) -> List[Dict[str, object]]:
    """Encodes binary masks as COCO run-length encodings.

    Args:
        masks: ``Tensor[N, H, W]`` or ``Tensor[N, 1, H, W]``, bool or uint8 (nonzero = in).

    Returns:
        N dicts ``{"size": [H, W], "counts": bytes}``, the compressed form that
        ``pycocotools.mask.encode`` returns and ``pycocotools.mask.decode`` reads.

    The encoding runs on the host: CUDA masks are copied to it, so the call waits for the GPU
    once, for that copy.
    """
    V.tensor(masks, "masks")
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be [N, H, W] or [N, 1, H, W], got {tuple(masks.shape)}")
        masks = masks[:, 0]
    V.ndim(masks, 3, "masks", "[N, H, W]")
    if masks.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"masks must be bool or uint8, got {masks.dtype}")
    chars, lengths = torch.ops.maskops._masks_to_rle(masks.cpu())  # RLE strings live on the host
    data = chars.numpy().tobytes()
    size = [int(masks.shape[1]), int(masks.shape[2])]
    out, start = [], 0
    for n in lengths.tolist():
        out.append({"size": size, "counts": data[start : start + n]})
        start += n
    return out


@torch.library.register_fake("maskops::paste_masks")
def _paste_masks_fake(masks, boxes, height, width, padding, threshold, as_uint8):
    dtype = masks.dtype if threshold is None else (torch.uint8 if as_uint8 else torch.bool)
    return masks.new_empty((masks.shape[0], masks.shape[1], height, width), dtype=dtype)


@torch.library.register_fake("maskops::_masks_to_rle")
def _masks_to_rle_fake(masks):
    total = torch.library.get_ctx().new_dynamic_size()
    return (
        masks.new_empty((total,), dtype=torch.uint8),
        masks.new_empty((masks.shape[0],), dtype=torch.int64),
    )
