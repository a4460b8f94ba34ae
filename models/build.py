"""A Mask R-CNN built from a flat, serialisable config: the model that training and
evaluation use.

With the default sizes this is exactly :func:`models.mask_rcnn.build_mask_rcnn`'s model
(torchvision's layout). The extra options make smaller models for small images and small
machines, composed from the same modules:

- ``norm``: the backbone's normalisation: ``"frozen_bn"`` (fine-tuning and torchvision
  checkpoints), ``"bn"`` (trainable BatchNorm, from scratch) or ``"gn"`` (GroupNorm, from
  scratch; independent of the batch, so small and per-rank batches behave alike);
- ``fpn_channels``: the width of the pyramid, the RPN head and the RoI features (256);
- ``representation_size``: the box head's fully connected width (1024);
- ``mask_head_channels`` / ``mask_head_convs``: the mask head's convolutions (256 x 4);
- ``anchor_sizes``: one anchor size per pyramid level (32 ... 512; halve them for small
  images).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torchvision
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from .anchors import AnchorGenerator
from .backbone import ResNetBody, ResNetFPN
from .checkpoint import load_checkpoint
from .mask_rcnn import MaskRCNN, build_mask_rcnn, load_weights
from .roi_heads import BoxHead, BoxPredictor, MaskHead, MaskPredictor
from .rpn import RPNHead


@dataclass
class ModelConfig:
    """Everything that decides a model's structure and its inference behaviour.

    Names follow :func:`models.mask_rcnn.build_mask_rcnn` (torchvision's), plus the size
    options of the module docstring.
    """
    backbone: str = "resnet50"
    num_classes: int = 91
    norm: str = "frozen_bn"
    trainable_layers: int = 3
    bn_eps: float = 1e-5
    fpn_channels: int = 256
    representation_size: int = 1024
    mask_head_channels: int = 256
    mask_head_convs: int = 4
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)
    min_size: int = 800
    max_size: int = 1333
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchor_sizes"] = list(self.anchor_sizes)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        d = dict(d)
        if "anchor_sizes" in d:
            d["anchor_sizes"] = tuple(int(s) for s in d["anchor_sizes"])
        return cls(**d)


NORMS = ("frozen_bn", "bn", "gn")


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups (Wu & He) where the width allows, at least 4 channels per group otherwise.
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels)


def _gn_resnet_fpn(cfg: ModelConfig) -> ResNetFPN:
    resnet = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=_group_norm)
    c2 = resnet.inplanes // 8
    return ResNetFPN(ResNetBody(resnet), [c2, c2 * 2, c2 * 4, c2 * 8], cfg.fpn_channels)


def build_model(cfg: ModelConfig, weights: Optional[str] = None) -> MaskRCNN:
    """Builds the Mask R-CNN that ``cfg`` describes (random weights unless ``weights``, a
    state_dict file, is given)."""
    if cfg.norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {cfg.norm!r}")
    if len(cfg.anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per pyramid level (5), got "
                         f"{cfg.anchor_sizes}")
    model = build_mask_rcnn(
        cfg.backbone, cfg.num_classes, trainable_bn=cfg.norm == "bn",
        trainable_layers=cfg.trainable_layers, bn_eps=cfg.bn_eps,
        min_size=cfg.min_size, max_size=cfg.max_size,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        box_score_thresh=cfg.box_score_thresh,
        box_detections_per_img=cfg.box_detections_per_img)
    c = cfg.fpn_channels
    if cfg.norm == "gn":
        model.backbone = _gn_resnet_fpn(cfg)
    elif c != model.backbone.out_channels:
        old = model.backbone
        model.backbone = ResNetFPN(old.body, _fpn_in_channels(old.fpn), c)
    if tuple(cfg.anchor_sizes) != model.rpn.anchor_generator.sizes:
        model.rpn.anchor_generator = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes))
    if c != model.rpn.head.cls_logits.in_channels:
        model.rpn.head = RPNHead(c, model.rpn.anchor_generator.num_anchors_per_location()[0])
    heads = model.roi_heads
    rep = cfg.representation_size
    if c != 256 or rep != heads.box_head.fc7.out_features:
        heads.box_head = BoxHead(c * 7 * 7, rep)
        heads.box_predictor = BoxPredictor(rep, cfg.num_classes)
    layers = (cfg.mask_head_channels,) * cfg.mask_head_convs
    if c != 256 or layers != (256,) * 4:
        heads.mask_head = MaskHead(c, layers)
        d = cfg.mask_head_channels
        heads.mask_predictor = MaskPredictor(layers[-1] if layers else c, d, cfg.num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model


def model_from_checkpoint(path, **overrides) -> Tuple[MaskRCNN, Dict[str, Any]]:
    """The model a ``models.train`` checkpoint holds, rebuilt from the configuration saved in
    it with the fields in ``overrides`` replaced (those given as None keep the saved value),
    and the checkpoint itself (its config, class names, ...)."""
    state = load_checkpoint(path, required=("model", "config"))
    cfg = ModelConfig.from_dict(state["config"]["model"])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model, state


def _fpn_in_channels(fpn: FeaturePyramidNetwork):
    return [blk[0].in_channels if isinstance(blk, nn.Sequential) else blk.in_channels
            for blk in fpn.inner_blocks]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
