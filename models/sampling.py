"""Training-time assignment of ground truth to anchors/proposals, and mini-batch sampling."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

BELOW_LOW = -1  # IoU below the low threshold: background
BETWEEN = -2  # IoU between the thresholds: ignored


def match(quality: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """Assigns each prediction (column) to its best ground truth (row).

    Args:
        quality: ``Tensor[G, P]`` IoU of each ground-truth box with each prediction (G > 0).
        high: IoU from which a match counts (>=).
        low: IoU under which a prediction is background.
        allow_low_quality: also match every ground truth to the predictions it overlaps
            most (ties included) even under ``high``, so that no object goes unmatched
            (the RPN's rule).

    Returns:
        ``Tensor[P]`` int64: the matched ground-truth index, ``BELOW_LOW`` (-1) or
        ``BETWEEN`` (-2).
    """
    if quality.numel() == 0:
        what = "ground-truth boxes" if quality.shape[0] == 0 else "predictions"
        raise ValueError(f"no {what} to match")
    best, matches = quality.max(dim=0)
    all_matches = matches.clone() if allow_low_quality else None
    matches[best < low] = BELOW_LOW
    matches[(best >= low) & (best < high)] = BETWEEN
    if all_matches is not None:
        best_per_gt = quality.max(dim=1).values
        preds = torch.where(quality == best_per_gt[:, None])[1]
        matches[preds] = all_matches[preds]
    return matches


def sample(
    labels: List[Tensor], batch_size_per_image: int, positive_fraction: float
) -> Tuple[List[Tensor], List[Tensor]]:
    """Draws up to ``batch_size_per_image`` examples per image, at most a
    ``positive_fraction`` of them positive (label >= 1), the rest negative (label 0);
    label -1 is never drawn.

    Returns per image two ``uint8`` masks ``Tensor[P]``: the positives and the negatives
    drawn. Draws with ``torch.randperm`` on torch's RNG (positives, then negatives, image by
    image), like torchvision, so a seeded run picks the same examples.
    """
    pos_masks, neg_masks = [], []
    for lab in labels:
        positive = torch.where(lab >= 1)[0]
        negative = torch.where(lab == 0)[0]
        num_pos = min(positive.numel(), int(batch_size_per_image * positive_fraction))
        num_neg = min(negative.numel(), batch_size_per_image - num_pos)
        pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
        neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
        pos_mask = torch.zeros_like(lab, dtype=torch.uint8)
        neg_mask = torch.zeros_like(lab, dtype=torch.uint8)
        pos_mask[pos] = 1
        neg_mask[neg] = 1
        pos_masks.append(pos_mask)
        neg_masks.append(neg_mask)
    return pos_masks, neg_masks
