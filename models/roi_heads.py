"""RoI heads: box classification and refinement, then instance masks, for each proposal."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fuse, ops
from .profiling import StageRecorder, keep, stage
from .rpn import to_float32
from .sampling import BELOW_LOW, BETWEEN, match, sample


class BoxHead(nn.Module):
    """Two fully connected layers (``fc6``, ``fc7``) with ReLU on pooled box features.

    ``Tensor[K, C, 7, 7]`` -> ``Tensor[K, representation_size]``.

    ``fc6``'s input order is ``(c, y, x)`` as in torchvision; :meth:`use_nhwc_order`
    permutes its columns to ``(y, x, c)``, so that channels-last pooled features flatten
    without a copy.
    """

    def __init__(self, in_features: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.nhwc_order = False
        self.relu_fused = False  # set when fc6/fc7 apply their ReLU themselves (models.fuse)

    def forward(self, x: Tensor) -> Tensor:
        if fuse.fast_inference_active():
            y = fuse.box_head_forward(self, x)
            if y is not None:
                return y
        x = x.permute(0, 2, 3, 1).flatten(1) if self.nhwc_order else x.flatten(1)
        if self.relu_fused:
            return self.fc7(self.fc6(x))
        return F.relu(self.fc7(F.relu(self.fc6(x))))

    @torch.no_grad()
    def use_nhwc_order(self, channels: int, height: int, width: int) -> None:
        """Reorders ``fc6``'s weight columns from ``(c, y, x)`` to ``(y, x, c)`` (inference
        optimisation; the state_dict then no longer matches torchvision's)."""
        if self.nhwc_order:
            return
        w = self.fc6.weight
        w = w.view(w.shape[0], channels, height, width).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        self.fc6.weight.copy_(w.contiguous())
        self.nhwc_order = True

    def extra_repr(self) -> str:
        return f"nhwc_order={self.nhwc_order}"


class BoxPredictor(nn.Module):
    """Class logits and per-class box deltas: ``Tensor[K, D]`` -> ``Tensor[K, C]``,
    ``Tensor[K, 4 * C]`` (``C`` classes including background 0)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if (
            fuse.fast_inference_active()
            and type(self.cls_score) is nn.Linear
            and type(self.bbox_pred) is nn.Linear
        ):
            return (
                fuse.linear_unit(self.cls_score, x, relu=False),
                fuse.linear_unit(self.bbox_pred, x, relu=False),
            )
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """Four 3x3 conv + ReLU layers: ``Tensor[K, C, 14, 14]`` -> ``Tensor[K, 256, 14, 14]``."""

    def __init__(self, in_channels: int, layers=(256, 256, 256, 256)) -> None:
        blocks = []
        for out_channels in layers:
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            # Sequential(conv, relu) per layer: torchvision's key layout (mask_head.i.0.*).
            blocks.append(nn.Sequential(conv, nn.ReLU(inplace=True)))
            in_channels = out_channels
        super().__init__(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        # Fast inference: each conv + ReLU as one oneDNN call on the conv's derived weight.
        if fuse.fast_inference_active():
            return fuse.conv_relu_blocks(self, x)
        return super().forward(x)


class MaskPredictor(nn.Module):
    """2x transposed conv + ReLU, then a 1x1 conv giving one mask logit map per class.

    ``forward(x, labels)`` computes only the map of each RoI's own class: ``Tensor[K, 256,
    14, 14]`` -> ``Tensor[K, 1, 28, 28]``. The full 1x1 conv would compute all ``C`` maps and
    keep one; this is the same dot product, ``C`` times less work.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.relu = nn.ReLU(inplace=True)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1)
        for name, p in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """``labels: Tensor[K]`` int64 class of each RoI. Returns mask logits ``Tensor[K, 1,
        2H, 2W]``."""
        if fuse.fast_inference_active():
            y = fuse.mask_predictor_forward(self, x, labels)
            if y is not None:
                return y
        x = self.relu(self.conv5_mask(x))
        w = self.mask_fcn_logits.weight[:, :, 0, 0][labels]  # [K, D]
        b = self.mask_fcn_logits.bias[labels]  # [K]
        logits = torch.einsum("kdhw,kd->khw", x, w.to(x.dtype)) + b.to(x.dtype)[:, None, None]
        return logits[:, None]

    def all_classes(self, x: Tensor) -> Tensor:
        """Every class's logits ``Tensor[K, C, 2H, 2W]`` (torchvision's output)."""
        return self.mask_fcn_logits(self.relu(self.conv5_mask(x)))


class RoIHeads(nn.Module):
    """Box and mask heads on the proposals.

    Args:
        box_roi_pool, mask_roi_pool: ``MultiScaleRoIAlign`` modules (7x7 and 14x14).
        box_head, box_predictor, mask_head, mask_predictor: the head modules.
        fg_iou_thresh, bg_iou_thresh: training: proposals with IoU >= fg with a ground-truth
            box are foreground, < bg background.
        batch_size_per_image, positive_fraction: training: proposals sampled per image, and
            the largest fraction of them foreground.
        bbox_reg_weights: box coding weights ``(wx, wy, ww, wh)``.
        score_thresh: inference: detections with class probability <= it are dropped.
        nms_thresh: inference: per-class NMS IoU threshold.
        detections_per_img: inference: detections kept per image (best first).
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: BoxHead,
        box_predictor: BoxPredictor,
        mask_roi_pool: nn.Module,
        mask_head: MaskHead,
        mask_predictor: MaskPredictor,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.bbox_reg_weights = tuple(bbox_reg_weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def forward(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
        recorder: Optional[StageRecorder] = None,
    ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        """Detections (inference) or losses (training).

        Args:
            features: the pyramid, ``{"0": Tensor[N, C, H/4, W/4], ...}``.
            proposals: per image ``Tensor[K_i, 4]`` boxes in resized-image pixels.
            image_sizes: ``(height, width)`` of each resized image.
            targets: training only: per image ``boxes``, ``labels``, ``masks``.

        Returns:
            Inference: per image ``{"boxes": Tensor[D, 4], "labels": Tensor[D] (int64),
            "scores": Tensor[D], "masks": Tensor[D, 1, 28, 28] probabilities}``, and ``{}``.
            Training: ``[]`` and ``{"loss_classifier", "loss_box_reg", "loss_mask"}``.
        """
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            return [], self._losses(features, proposals, image_sizes, targets)

        with stage(recorder, "roi_align"):
            box_features = self.box_roi_pool(features, proposals, image_sizes)
        keep(recorder, "box_roi_features", tuple(box_features.shape))
        with stage(recorder, "box_head"):
            class_logits, box_deltas = self.box_predictor(self.box_head(box_features))
            del box_features
            boxes, scores, labels = self.postprocess_detections(
                to_float32(class_logits), to_float32(box_deltas), proposals, image_sizes
            )
        with stage(recorder, "roi_align"):
            mask_features = self.mask_roi_pool(features, boxes, image_sizes)
        keep(recorder, "mask_roi_features", tuple(mask_features.shape))
        with stage(recorder, "mask_head"):
            mask_logits = self.mask_predictor(self.mask_head(mask_features), torch.cat(labels))
            mask_probs = to_float32(mask_logits).sigmoid().split([b.shape[0] for b in boxes])
        return [
            {"boxes": b, "labels": l, "scores": s, "masks": m}
            for b, l, s, m in zip(boxes, labels, scores, mask_probs)
        ], {}

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """From ``Tensor[K, C]`` logits and ``Tensor[K, 4 * C]`` deltas of all proposals to
        per-image boxes, scores and labels: one candidate per (proposal, foreground class),
        thresholded, NMS per class, best ``detections_per_img`` kept."""
        num_classes = class_logits.shape[-1]
        counts = [p.shape[0] for p in proposals]  # shape, not len(): symbolic under export
        # Background (class 0) boxes are never used: decode classes 1..C-1 only.
        boxes = ops.decode_boxes(box_deltas[:, 4:], torch.cat(proposals), self.bbox_reg_weights)
        scores = F.softmax(class_logits, -1)[:, 1:]
        out_boxes, out_scores, out_labels = [], [], []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes):
            b = ops.clip_boxes(b, size).reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=s.device).repeat(s.shape[0])
            s = s.reshape(-1)
            keep_idx = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep_idx], s[keep_idx], labels[keep_idx]
            keep_idx = ops.remove_small_boxes(b, 1e-2)
            b, s, labels = b[keep_idx], s[keep_idx], labels[keep_idx]
            keep_idx = ops.batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            out_boxes.append(b[keep_idx])
            out_scores.append(s[keep_idx])
            out_labels.append(labels[keep_idx])
        return out_boxes, out_scores, out_labels

    # ---- training ----

    def _losses(self, features, proposals, image_sizes, targets) -> Dict[str, Tensor]:
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be floating point, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be int64, got {t['labels'].dtype}")
        proposals, matched_idxs, labels, reg_targets = self.select_training_samples(
            proposals, targets
        )
        box_features = self.box_roi_pool(features, proposals, image_sizes)
        class_logits, box_deltas = self.box_predictor(self.box_head(box_features))
        loss_classifier, loss_box_reg = fastrcnn_loss(
            to_float32(class_logits), to_float32(box_deltas), labels, reg_targets
        )

        # The mask head trains on the foreground proposals only.
        mask_boxes, mask_idxs = [], []
        for p, lab, idx in zip(proposals, labels, matched_idxs):
            pos = torch.where(lab > 0)[0]
            mask_boxes.append(p[pos])
            mask_idxs.append(idx[pos])
        gt_labels = torch.cat([t["labels"][i] for t, i in zip(targets, mask_idxs)])
        mask_features = self.mask_roi_pool(features, mask_boxes, image_sizes)
        mask_logits = self.mask_predictor(self.mask_head(mask_features), gt_labels)
        loss_mask = mask_loss(
            to_float32(mask_logits)[:, 0], mask_boxes, [t["masks"] for t in targets], mask_idxs
        )
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": loss_mask,
        }

    def select_training_samples(
        self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """Adds the ground-truth boxes to the proposals, labels every proposal with its best
        ground truth, samples a mini-batch and computes its regression targets.

        Returns per image the sampled proposals ``Tensor[S, 4]``, their matched ground-truth
        index ``Tensor[S]``, class label ``Tensor[S]`` (0: background) and regression
        targets ``Tensor[S, 4]``.
        """
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        matched_idxs, labels = [], []
        for p, g, t in zip(proposals, gt_boxes, targets):
            if g.numel() == 0:  # an image with no objects: every proposal is background
                matched_idxs.append(torch.zeros(p.shape[0], dtype=torch.int64, device=device))
                labels.append(torch.zeros(p.shape[0], dtype=torch.int64, device=device))
                continue
            m = match(
                ops.box_iou(g, p), self.fg_iou_thresh, self.bg_iou_thresh, allow_low_quality=False
            )
            idx = m.clamp(min=0)
            lab = t["labels"][idx].to(torch.int64)
            lab[m == BELOW_LOW] = 0
            lab[m == BETWEEN] = -1
            matched_idxs.append(idx)
            labels.append(lab)

        pos, neg = sample(labels, self.batch_size_per_image, self.positive_fraction)
        reg_targets = []
        for i in range(len(proposals)):
            s = torch.where(pos[i] | neg[i])[0]
            proposals[i], labels[i], matched_idxs[i] = (
                proposals[i][s],
                labels[i][s],
                matched_idxs[i][s],
            )
            g = (
                gt_boxes[i]
                if gt_boxes[i].numel()
                else torch.zeros((1, 4), dtype=dtype, device=device)
            )
            reg_targets.append(
                ops.encode_boxes(g[matched_idxs[i]], proposals[i], self.bbox_reg_weights)
            )
        return proposals, matched_idxs, labels, reg_targets

    def extra_repr(self) -> str:
        return (
            f"score_thresh={self.score_thresh}, nms_thresh={self.nms_thresh}, "
            f"detections_per_img={self.detections_per_img}"
        )


def fastrcnn_loss(
    class_logits: Tensor, box_deltas: Tensor, labels: List[Tensor], reg_targets: List[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Classification (cross-entropy over all sampled proposals) and box regression
    (smooth L1 on the foreground proposals' own class, summed, divided by the number of
    sampled proposals) losses.

    Args:
        class_logits: ``Tensor[S, C]``; box_deltas: ``Tensor[S, 4 * C]``;
        labels: per image ``Tensor[S_i]``; reg_targets: per image ``Tensor[S_i, 4]``.
    """
    labels = torch.cat(labels)
    reg_targets = torch.cat(reg_targets)
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)
    box_loss = (
        F.smooth_l1_loss(deltas[pos, labels[pos]], reg_targets[pos], beta=1 / 9, reduction="sum")
        / labels.numel()
    )
    return cls_loss, box_loss


def mask_loss(
    mask_logits: Tensor, boxes: List[Tensor], gt_masks: List[Tensor], matched_idxs: List[Tensor]
) -> Tensor:
    """Binary cross-entropy between each foreground RoI's mask logits (its class's map) and
    its ground-truth mask cropped to the RoI and resampled to the logits' size.

    Args:
        mask_logits: ``Tensor[K, M, M]``, the RoIs of all images in order.
        boxes: per image ``Tensor[K_i, 4]`` RoIs; gt_masks: per image ``Tensor[G_i, H, W]``;
        matched_idxs: per image ``Tensor[K_i]``, each RoI's ground-truth index.
    """
    m = mask_logits.shape[-1]
    targets = []
    for b, gm, idx in zip(boxes, gt_masks, matched_idxs):
        # RoIAlign over the stack of ground-truth masks, "batch" index = matched object.
        rois = torch.cat([idx.to(b)[:, None], b], dim=1)
        targets.append(ops.roi_align(gm[:, None].to(b), rois, (m, m), 1.0)[:, 0])
    targets = torch.cat(targets)
    if targets.numel() == 0:  # no foreground RoI: a zero that keeps the graph connected
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(mask_logits, targets)
