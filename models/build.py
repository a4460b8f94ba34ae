"""Builds the Mask R-CNN: :func:`build_model` from a :class:`~models.config.ModelConfig` is the
one builder; :func:`build_mask_rcnn` is its keyword form (torchvision's option names);
:func:`load_model` gives the inference model the command-line tools run (weights, a training
checkpoint, device, half precision).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torchvision
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from . import ops
from .anchors import AnchorGenerator
from .backbone import RESNETS, ResNetBody, ResNetFPN, resnet_fpn
from .categories import COCO_CATEGORIES
from .config import NORMS, ModelConfig
from .engine.checkpoint import load_checkpoint
from .mask_rcnn import MaskRCNN
from .roi_heads import BoxHead, BoxPredictor, MaskHead, MaskPredictor, RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .transform import ImageTransform


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups (Wu & He) where the width allows, at least 4 channels per group otherwise.
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels)


def _gn_resnet_fpn(cfg: ModelConfig) -> ResNetFPN:
    resnet = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=_group_norm)
    c2 = resnet.inplanes // 8
    return ResNetFPN(ResNetBody(resnet), [c2, c2 * 2, c2 * 4, c2 * 8], cfg.fpn_channels)


def build_model(cfg: ModelConfig, weights: Optional[str] = None) -> MaskRCNN:
    """Builds the Mask R-CNN that ``cfg`` describes (random weights unless ``weights``, a
    state_dict file, is given: see :func:`load_weights`)."""
    if cfg.backbone not in RESNETS:
        raise ValueError(f"backbone must be one of {RESNETS}, got {cfg.backbone!r}")
    if cfg.norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {cfg.norm!r}")
    if len(cfg.anchor_sizes) != 5:
        raise ValueError(
            f"anchor_sizes needs one size per pyramid level (5), got {cfg.anchor_sizes}"
        )
    # torchvision's layout first, then the parts the size options change: the random
    # initialisation draws in this order, so a seed gives the same weights as ever.
    body = resnet_fpn(
        cfg.backbone,
        trainable_bn=cfg.norm == "bn",
        trainable_layers=cfg.trainable_layers,
        bn_eps=cfg.bn_eps,
    )
    c = body.out_channels
    anchors = AnchorGenerator()
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(c, anchors.num_anchors_per_location()[0]),
        cfg.rpn_fg_iou_thresh,
        cfg.rpn_bg_iou_thresh,
        cfg.rpn_batch_size_per_image,
        cfg.rpn_positive_fraction,
        {"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        {"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        cfg.rpn_nms_thresh,
        cfg.rpn_score_thresh,
    )
    levels = ["0", "1", "2", "3"]
    roi_heads = RoIHeads(
        ops.MultiScaleRoIAlign(levels, 7, sampling_ratio=2),
        BoxHead(c * 7 * 7, 1024),
        BoxPredictor(1024, cfg.num_classes),
        ops.MultiScaleRoIAlign(levels, 14, sampling_ratio=2),
        MaskHead(c),
        MaskPredictor(256, 256, cfg.num_classes),
        cfg.box_fg_iou_thresh,
        cfg.box_bg_iou_thresh,
        cfg.box_batch_size_per_image,
        cfg.box_positive_fraction,
        tuple(cfg.bbox_reg_weights),
        cfg.box_score_thresh,
        cfg.box_nms_thresh,
        cfg.box_detections_per_img,
    )
    transform = ImageTransform(cfg.min_size, cfg.max_size, cfg.image_mean, cfg.image_std)
    model = MaskRCNN(transform, body, rpn, roi_heads, cfg.mask_threshold, cfg.fast_inference)

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


def build_mask_rcnn(
    backbone: str = "resnet50",
    num_classes: int = 91,
    *,
    trainable_bn: bool = False,
    weights: Optional[str] = None,
    min_size: Union[int, Sequence[int]] = 800,
    **options: Any,
) -> MaskRCNN:
    """:func:`build_model` with keywords: ``build_mask_rcnn("resnet50", weights=path,
    bn_eps=0.0)``. ``options`` are :class:`~models.config.ModelConfig` fields;
    ``trainable_bn=True`` is ``norm="bn"`` (a ``BatchNorm2d`` backbone, the state_dict of
    torchvision's ``weights=None`` model, ``num_batches_tracked`` included), else
    ``FrozenBatchNorm2d`` (the layout of torchvision's COCO checkpoint)."""
    norm = options.pop("norm", "bn" if trainable_bn else "frozen_bn")
    cfg = ModelConfig(
        backbone=backbone, num_classes=num_classes, norm=norm, min_size=min_size, **options
    )
    return build_model(cfg, weights)


def load_weights(model: nn.Module, path: str) -> None:
    """Loads a state_dict file (this model's or torchvision's layout) into ``model``, strictly.
    A training checkpoint ``{"model": state_dict, ...}`` is accepted too."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    model.load_state_dict(state, strict=True)


def model_from_checkpoint(path, **overrides) -> Tuple[MaskRCNN, Dict[str, Any]]:
    """The model a training checkpoint holds, rebuilt from the configuration saved in
    it with the fields in ``overrides`` replaced (those given as None keep the saved value),
    and the checkpoint itself (its config, class names, ...)."""
    state = load_checkpoint(path, required=("model", "config"))
    cfg = ModelConfig.from_dict(state["config"]["model"])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model, state


def _fpn_in_channels(fpn: FeaturePyramidNetwork):
    return [
        blk[0].in_channels if isinstance(blk, nn.Sequential) else blk.in_channels
        for blk in fpn.inner_blocks
    ]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(
    cfg: Optional[ModelConfig] = None,
    *,
    weights: Optional[str] = None,
    checkpoint: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    optimize: bool = True,
) -> MaskRCNN:
    """The inference model, in eval mode on ``device``: from a training ``checkpoint`` (its
    saved config, with the ``overrides`` fields that are not None replaced) or from ``cfg``
    (with ``weights``, a state_dict file; random weights without). ``optimize``:
    ``optimize_for_inference(dtype=dtype)``; otherwise the modules run as built (no fast
    inference).

    Its ``class_names`` attribute names the labels (the checkpoint's dataset's, or COCO's);
    ``label_to_category_id`` maps labels to dataset category ids (the checkpoint's mapping,
    or None: the labels are COCO category ids already).
    """
    names = mapping = None
    if checkpoint:
        model, state = model_from_checkpoint(checkpoint, **(overrides or {}))
        names, mapping = state.get("class_names"), state.get("label_to_category_id")
    else:
        model = build_model(cfg or ModelConfig(), weights)
    model.class_names = names if names is not None else list(COCO_CATEGORIES)
    model.label_to_category_id = list(mapping) if mapping is not None else None
    model.eval().to(device)
    if optimize:
        model.optimize_for_inference(dtype=dtype)
    else:
        model.fast_inference = False
    return model
