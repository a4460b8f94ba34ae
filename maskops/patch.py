"""Swap torchvision's detection ops for maskops ones, so existing torchvision code (for
example ``torchvision.models.detection.maskrcnn_resnet50_fpn``) speeds up with one line.

    import maskops
    maskops.patch_torchvision()          # ... until maskops.unpatch_torchvision()
    with maskops.torchvision_patched():  # or only inside a block
        detections = model(images)

What is replaced (module attributes, so models built before patching are affected too):
roi_align, RoIAlign, MultiScaleRoIAlign and the multi-level pooling inside existing
MultiScaleRoIAlign modules, nms, batched_nms, box_iou, box_area, paste_masks_in_image, and,
when this maskops build has them, clip_boxes_to_image, remove_small_boxes, BoxCoder's
encode/decode and AnchorGenerator. Results are the same as torchvision's (box_iou gives 0
instead of NaN for two zero-area boxes); box_iou and box_area given other box formats or
batched boxes, which maskops does not take, still run torchvision's own. Objects that copied
a function at construction (e.g. RPN's ``box_similarity = box_iou``) keep the original.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Dict, List, Tuple

from ._fx import leaf

_saved: Dict[Tuple[str, str], object] = {}
_box_ops: Dict[str, Callable] = {}  # the box_iou / box_area stand-ins, made once


@leaf
def _multiscale(x_filtered, boxes, output_size, sampling_ratio, scales, mapper):
    """Stands in for torchvision.ops.poolers._multiscale_roi_align: all levels in one pass."""
    from .roi_align import multiscale_roi_align

    if scales is None or mapper is None:
        raise ValueError("scales and mapper should not be None")
    return multiscale_roi_align(
        list(x_filtered),
        boxes,
        tuple(output_size),
        list(scales),
        sampling_ratio,
        canonical_scale=mapper.s0,
        canonical_level=mapper.lvl0,
    )


def _box_op(ours: Callable, original: Callable) -> Callable:
    """maskops' box_iou / box_area where they apply (corner boxes, ``[N, 4]``: what the
    detection models pass); torchvision's own for its other formats and batched boxes, so
    patching takes nothing away."""
    import torch

    def box_op(*args, fmt: str = "xyxy", **kwargs):
        boxes = list(args) + list(kwargs.values())
        if fmt == "xyxy" and not any(isinstance(b, torch.Tensor) and b.dim() != 2 for b in boxes):
            return ours(*args, **kwargs)
        return original(*args, fmt=fmt, **kwargs)

    box_op.__name__ = box_op.__qualname__ = ours.__name__
    box_op.__doc__ = _box_op.__doc__
    box_op.__wrapped__ = ours
    return box_op


def _replacements() -> List[Tuple[str, str, Callable]]:
    import maskops

    out = []
    for mod in ("torchvision.ops", "torchvision.ops.roi_align", "torchvision.ops.poolers"):
        out.append((mod, "roi_align", maskops.roi_align))
    out += [
        ("torchvision.ops", "RoIAlign", maskops.RoIAlign),
        ("torchvision.ops.roi_align", "RoIAlign", maskops.RoIAlign),
        ("torchvision.ops.poolers", "_multiscale_roi_align", _multiscale),
    ]
    for mod in (
        "torchvision.ops",
        "torchvision.ops.poolers",
        "torchvision.models.detection.faster_rcnn",
        "torchvision.models.detection.mask_rcnn",
    ):
        out.append((mod, "MultiScaleRoIAlign", maskops.MultiScaleRoIAlign))
    boxes_module = importlib.import_module("torchvision.ops.boxes")
    for name in ("box_iou", "box_area"):
        original = _saved.get(("torchvision.ops.boxes", name), getattr(boxes_module, name, None))
        if original is not None:
            _box_ops[name] = _box_ops.get(name) or _box_op(getattr(maskops, name), original)
    for mod in ("torchvision.ops", "torchvision.ops.boxes"):
        for name in (
            "nms",
            "batched_nms",
            "box_iou",
            "box_area",
            "clip_boxes_to_image",
            "remove_small_boxes",
        ):
            ours = {"clip_boxes_to_image": "clip_boxes"}.get(name, name)
            if name in _box_ops:
                out.append((mod, name, _box_ops[name]))
            elif hasattr(maskops, ours):
                out.append((mod, name, getattr(maskops, ours)))
    for mod in ("torchvision.models.detection.roi_heads", "torchvision.models.detection.transform"):
        out.append((mod, "paste_masks_in_image", maskops.paste_masks_in_image))
    if hasattr(maskops, "BoxCoder"):
        for meth in ("encode", "decode", "encode_single", "decode_single"):
            out.append(
                (
                    "torchvision.models.detection._utils.BoxCoder",
                    meth,
                    getattr(maskops.BoxCoder, meth),
                )
            )
    if hasattr(maskops, "AnchorGenerator"):
        for mod in (
            "torchvision.models.detection.anchor_utils",
            "torchvision.models.detection.rpn",
            "torchvision.models.detection.faster_rcnn",
            "torchvision.models.detection.mask_rcnn",
        ):
            out.append((mod, "AnchorGenerator", maskops.AnchorGenerator))
    return out


def _resolve(path: str):
    """A module, or a class inside one ("pkg.module.Class")."""
    try:
        return importlib.import_module(path)
    except ImportError:
        mod, _, cls = path.rpartition(".")
        return getattr(importlib.import_module(mod), cls)


def patch_torchvision() -> None:
    """Replaces torchvision's detection ops with maskops' (idempotent)."""
    for path, name, new in _replacements():
        target = _resolve(path)
        if not hasattr(target, name):
            continue  # an older torchvision without this symbol
        key = (path, name)
        if key not in _saved:
            _saved[key] = target.__dict__.get(name, getattr(target, name))
        setattr(target, name, new)


def unpatch_torchvision() -> None:
    """Restores everything patch_torchvision() replaced."""
    for (path, name), old in list(_saved.items()):
        setattr(_resolve(path), name, old)
    _saved.clear()


def is_patched() -> bool:
    return bool(_saved)


@contextlib.contextmanager
def torchvision_patched():
    """Context manager form of patch_torchvision(); restores torchvision on exit."""
    was = is_patched()
    patch_torchvision()
    try:
        yield
    finally:
        if not was:
            unpatch_torchvision()
