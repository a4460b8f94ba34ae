"""The model's configuration: one flat, serialisable dataclass, the only place each option is
named. :func:`models.build.build_model` builds from it, training checkpoints store it, and the
command-line tools generate their options from its fields (``metadata``: ``help``,
``choices``, ``nargs``).

With the defaults it is torchvision's ``maskrcnn_resnet50_fpn`` (same state_dict layout).
The size options make smaller models for small images and small machines, composed from
the same modules:

- ``norm``: the backbone's normalisation: ``"frozen_bn"`` (fine-tuning and torchvision
  checkpoints), ``"bn"`` (trainable BatchNorm, from scratch) or ``"gn"`` (GroupNorm, from
  scratch; independent of the batch, so small and per-rank batches behave alike);
- ``fpn_channels``: the width of the pyramid, the RPN head and the RoI features (256);
- ``representation_size``: the box head's fully connected width (1024);
- ``mask_head_channels`` / ``mask_head_convs``: the mask head's convolutions (256 x 4);
- ``anchor_sizes``: one anchor size per pyramid level (32 ... 512; halve them for small
  images).

The other options have torchvision's ``MaskRCNN`` names, meanings and defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

from .backbone import RESNETS

NORMS = ("frozen_bn", "bn", "gn")

T = TypeVar("T")


def option(default, help: str = "", **meta):
    """A dataclass field with what a command-line option needs to say about it."""
    if isinstance(default, (list, dict)):
        kw = {"default_factory": lambda: type(default)(default)}  # a fresh copy each time
    else:
        kw = {"default": default}
    return field(**kw, metadata=dict(help=help, **meta))


@dataclass
class ModelConfig:
    """Everything that decides a model's structure and its inference behaviour."""

    backbone: str = option("resnet50", choices=RESNETS)
    num_classes: int = option(91, "classes, background included (COCO: 91)")
    norm: str = option(
        "frozen_bn",
        "backbone normalisation (bn/gn: from scratch)",
        choices=("bn", "gn", "frozen_bn"),
    )
    trainable_layers: int = option(3, "ResNet parts, from layer4 back to conv1, that train")
    bn_eps: float = option(
        1e-5,
        "backbone batch-norm epsilon (0.0: what torchvision's COCO checkpoint was trained with)",
    )
    fpn_channels: int = option(256)
    representation_size: int = option(1024)
    mask_head_channels: int = option(256)
    mask_head_convs: int = option(4)
    anchor_sizes: Tuple[int, ...] = option(
        (32, 64, 128, 256, 512), "one per pyramid level", nargs=5
    )
    min_size: int = option(800, "resize the shorter side to this")
    max_size: int = option(1333, "cap the longer side at this")
    rpn_pre_nms_top_n_train: int = option(2000)
    rpn_post_nms_top_n_train: int = option(2000)
    rpn_pre_nms_top_n_test: int = option(1000)
    rpn_post_nms_top_n_test: int = option(1000)
    rpn_batch_size_per_image: int = option(256)
    box_batch_size_per_image: int = option(512)
    box_positive_fraction: float = option(0.25)
    box_score_thresh: float = option(0.05)
    box_detections_per_img: int = option(100)
    image_mean: Tuple[float, ...] = option((0.485, 0.456, 0.406), nargs=3)
    image_std: Tuple[float, ...] = option((0.229, 0.224, 0.225), nargs=3)
    rpn_nms_thresh: float = option(0.7)
    rpn_fg_iou_thresh: float = option(0.7)
    rpn_bg_iou_thresh: float = option(0.3)
    rpn_positive_fraction: float = option(0.5)
    rpn_score_thresh: float = option(0.0)
    box_nms_thresh: float = option(0.5)
    box_fg_iou_thresh: float = option(0.5)
    box_bg_iou_thresh: float = option(0.5)
    bbox_reg_weights: Tuple[float, ...] = option((10.0, 10.0, 5.0, 5.0), nargs=4)
    # Not structure, and not command-line options: see MaskRCNN.
    mask_threshold: Optional[float] = option(0.5, cli=False)
    fast_inference: bool = option(True, cli=False)

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        """The config ``d`` (a :meth:`to_dict`) describes; absent keys take the defaults."""
        return from_dict(cls, d)


def to_dict(cfg) -> Dict[str, Any]:
    """``dataclasses.asdict`` with tuples as lists (what JSON gives back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: Type[T], d: Dict[str, Any]) -> T:
    """``cls(**d)`` with lists turned back into the tuples of tuple-valued fields; unknown keys
    are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}")
    d = dict(d)
    for name, value in d.items():
        if isinstance(value, list) and isinstance(_default(fields[name]), tuple):
            d[name] = tuple(value)
    return cls(**d)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
