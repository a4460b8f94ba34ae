"""Region Proposal Network: objectness and box deltas per anchor, then proposal selection."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fuse, ops
from .anchors import AnchorGenerator
from .sampling import BELOW_LOW, BETWEEN, match, sample
from .transform import ImageBatch

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def to_float32(x: Tensor) -> Tensor:
    """Half-precision predictions (autocast) are read in float32 before box arithmetic:
    a bfloat16 coordinate near 800 px is only good to 4 px."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then per-anchor objectness logits and box deltas.

    Args:
        in_channels: channels of every feature level.
        num_anchors: anchors per location ``A``.
    """

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        # conv.0.0: the layout of torchvision's RPNHead (a Conv2dNormActivation in a Sequential).
        self.conv = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level ``Tensor[N, C, H, W]`` -> objectness ``Tensor[N, H * W * A]`` and deltas
        ``Tensor[N, H * W * A, 4]``, ordered (y, x, anchor) like the anchors."""
        logits, deltas = [], []
        pointwise = getattr(self, "pointwise", None)  # set by models.fuse (inference)
        fast = fuse.fast_inference_active()
        for f in features:
            t = fuse.conv_relu_blocks(self.conv, f) if fast else self.conv(f)
            n = f.shape[0]
            if pointwise is not None:
                fused = pointwise(t)
            else:
                fused = fuse.rpn_predictors(self, t) if fast else None
            if fused is not None:
                logits.append(fused[0])
                deltas.append(fused[1])
                continue
            # Free views when the conv outputs are channels-last.
            logits.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(self.bbox_pred(t).permute(0, 2, 3, 1).reshape(n, -1, 4))
        return logits, deltas


class RegionProposalNetwork(nn.Module):
    """Proposes object boxes from the feature pyramid.

    Args:
        anchor_generator: the anchors of each level.
        head: the :class:`RPNHead`.
        fg_iou_thresh, bg_iou_thresh: training: anchors with IoU >= fg are positive, < bg
            negative, in between ignored.
        batch_size_per_image, positive_fraction: training: anchors sampled per image for
            the loss, and the largest fraction of them positive.
        pre_nms_top_n, post_nms_top_n: ``{"training": k, "testing": k}``: best anchors kept
            per level before NMS, proposals kept per image after it.
        nms_thresh: IoU threshold of the per-level NMS.
        score_thresh: proposals with objectness probability under it are dropped.
    """

    min_size = 1e-3  # proposals with a side under this many pixels are dropped

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: Optional[Dict[str, int]] = None,
        post_nms_top_n: Optional[Dict[str, int]] = None,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self._pre_nms_top_n = pre_nms_top_n or {"training": 2000, "testing": 1000}
        self._post_nms_top_n = post_nms_top_n or {"training": 2000, "testing": 1000}
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def forward(
        self,
        batch: ImageBatch,
        features: List[Tensor],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Tensor], List[Tensor], Dict[str, Tensor]]:
        """Proposals for each image.

        Args:
            batch: the image batch (its padded size sets the anchor strides).
            features: per level ``Tensor[N, C, H_l, W_l]``.
            targets: training only, per image ``boxes: Tensor[G, 4]``.

        Returns:
            Per image ``Tensor[K_i, 4]`` proposals (``K_i <= post_nms_top_n``) by decreasing
            objectness, per image ``Tensor[K_i]`` their objectness probabilities, and the
            losses (training: ``loss_objectness``, ``loss_rpn_box_reg``; else empty).
        """
        logits, deltas = self.head(features)
        # [N, A] and [N, A, 4] with the levels one after another (a few MB at most).
        logits = to_float32(torch.cat(logits, dim=1))
        deltas = to_float32(torch.cat(deltas, dim=1))
        anchors, per_level = self.anchor_generator(
            tuple(batch.tensors.shape[-2:]),
            [tuple(f.shape[-2:]) for f in features],
            logits.dtype,
            logits.device,
        )
        with torch.no_grad():  # proposals are not differentiated through (Faster R-CNN)
            proposals, scores = ops.rpn_proposals(
                logits.detach(),
                deltas.detach(),
                anchors,
                batch.image_sizes,
                self.pre_nms_top_n(),
                self.post_nms_top_n(),
                self.nms_thresh,
                self.score_thresh,
                self.min_size,
                per_level,
            )
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            losses = self.loss(logits, deltas, anchors, targets)
        return proposals, scores, losses

    def loss(
        self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """Objectness (binary cross-entropy) and box (smooth L1) losses on sampled anchors.

        Args:
            objectness: ``Tensor[N, A_total]`` logits; deltas: ``Tensor[N, A_total, 4]``;
            anchors: ``Tensor[A_total, 4]``; targets: per image ``boxes: Tensor[G, 4]``.
        """
        labels, reg_targets = [], []
        for t in targets:
            gt = t["boxes"]
            if gt.numel() == 0:  # an image with no objects: every anchor is background
                labels.append(anchors.new_zeros(anchors.shape[0]))
                reg_targets.append(torch.zeros_like(anchors))
                continue
            m = match(
                ops.box_iou(gt, anchors),
                self.fg_iou_thresh,
                self.bg_iou_thresh,
                allow_low_quality=True,
            )
            lab = (m >= 0).to(torch.float32)
            lab[m == BELOW_LOW] = 0.0
            lab[m == BETWEEN] = -1.0
            labels.append(lab)
            reg_targets.append(ops.encode_boxes(gt[m.clamp(min=0)], anchors, RPN_BOX_WEIGHTS))

        pos, neg = sample(labels, self.batch_size_per_image, self.positive_fraction)
        pos = torch.where(torch.cat(pos))[0]
        neg = torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos, neg])
        labels = torch.cat(labels)
        reg_targets = torch.cat(reg_targets)
        objectness = objectness.flatten()
        deltas = deltas.reshape(-1, 4)
        box_loss = (
            F.smooth_l1_loss(deltas[pos], reg_targets[pos], beta=1 / 9, reduction="sum")
            / sampled.numel()
        )
        obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
        return {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}

    def extra_repr(self) -> str:
        return (
            f"pre_nms_top_n={self._pre_nms_top_n}, post_nms_top_n={self._post_nms_top_n}, "
            f"nms_thresh={self.nms_thresh}, score_thresh={self.score_thresh}"
        )
