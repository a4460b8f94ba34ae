"""Comparing two detectors' outputs on the same image (e.g. this model and torchvision's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import Tensor


@dataclass
class DetectionDiff:
    """How two detection lists differ.

    Attributes:
        pairs: ``(i, j)``: reference detection ``i`` matched to detection ``j``.
        unmatched_ref, unmatched_got: indices left without a partner.
        max_box_err: largest coordinate difference (px) over matched pairs.
        max_score_err: largest score difference over matched pairs.
        mask_agreement: fraction of pixels where matched masks agree (both thresholded).
        in_order: whether every pair is ``(i, i)`` (same ranking, not only the same set).
        cutoff_score: the reference's lowest kept score.
    """

    pairs: List[Tuple[int, int]] = field(default_factory=list)
    unmatched_ref: List[int] = field(default_factory=list)
    unmatched_got: List[int] = field(default_factory=list)
    max_box_err: float = 0.0
    max_score_err: float = 0.0
    mask_agreement: float = 1.0
    in_order: bool = True
    cutoff_score: float = 0.0
    score_tol: float = 1e-4
    unmatched_ref_info: List[Tuple[float, float]] = field(default_factory=list, repr=False)
    unmatched_got_info: List[Tuple[float, float]] = field(default_factory=list, repr=False)

    def identical(self, allow_slivers: int = 0, sliver_px: float = 1.0) -> bool:
        """Same detections: everything matched, except

        - detections tied (within ``score_tol``) with the last one kept, which either detector
          may keep, and
        - with ``allow_slivers``, up to that many unmatched "slivers" on each side: boxes with
          a side under ``sliver_px`` pixels. Random weights produce clusters of near-duplicate
          slivers whose ranking, and so NMS outcome, float rounding can flip.
        """

        def explained(info, slivers_left):
            for score, side in info:
                if abs(score - self.cutoff_score) <= self.score_tol:
                    continue
                if side < sliver_px and slivers_left > 0:
                    slivers_left -= 1
                    continue
                return False
            return True

        return (
            len(self.unmatched_got) == len(self.unmatched_ref)
            and explained(self.unmatched_ref_info, allow_slivers)
            and explained(self.unmatched_got_info, allow_slivers)
        )

    def summary(self) -> str:
        def fmt(info):
            return "[" + ", ".join(f"score {s:.4f} side {d:.2f} px" for s, d in info) + "]"

        unmatched = (
            f"unmatched {fmt(self.unmatched_ref_info)} / {fmt(self.unmatched_got_info)}"
            if self.unmatched_ref or self.unmatched_got
            else "0 unmatched"
        )
        return (
            f"{len(self.pairs)} matched{' in order' if self.in_order else ''}, {unmatched}, "
            f"max box err {self.max_box_err:.2e} px, max score err {self.max_score_err:.2e}, "
            f"masks agree on {100 * self.mask_agreement:.4f}% of pixels"
        )


def compare_detections(
    ref: Dict[str, Tensor],
    got: Dict[str, Tensor],
    box_tol: float = 1e-2,
    score_tol: float = 1e-4,
    mask_threshold: float = 0.5,
) -> DetectionDiff:
    """Matches ``got``'s detections to ``ref``'s: same label, score within ``score_tol``,
    every coordinate within ``box_tol`` pixels.

    Reference detections are taken best first; each takes the closest unmatched candidate.
    Near-equal scores may be ranked differently by two correct detectors (float rounding
    decides), so the match is by content, not position; :attr:`DetectionDiff.in_order` says
    whether the ranking was the same too.

    Args:
        ref, got: ``{"boxes": Tensor[D, 4], "labels": Tensor[D], "scores": Tensor[D]}``, and
            optionally ``"masks": Tensor[D, 1, H, W]`` (float probabilities or bool).
    """
    rb, gb = ref["boxes"].float().cpu(), got["boxes"].float().cpu()
    rl, gl = ref["labels"].cpu(), got["labels"].cpu()
    rs, gs = ref["scores"].float().cpu(), got["scores"].float().cpu()
    diff = DetectionDiff(score_tol=score_tol, cutoff_score=float(rs.min()) if len(rs) else 0.0)
    if len(rb) and len(gb):
        box_err = (rb[:, None, :] - gb[None, :, :]).abs().amax(-1)  # [R, G]
        score_err = (rs[:, None] - gs[None, :]).abs()
        ok = (rl[:, None] == gl[None, :]) & (score_err <= score_tol) & (box_err <= box_tol)
        cost = torch.where(ok, box_err, torch.full_like(box_err, float("inf")))
        taken = torch.zeros(len(gb), dtype=torch.bool)
        for i in range(len(rb)):
            c = cost[i].masked_fill(taken, float("inf"))
            j = int(c.argmin())
            if torch.isinf(c[j]):
                diff.unmatched_ref.append(i)
                continue
            taken[j] = True
            diff.pairs.append((i, j))
            diff.max_box_err = max(diff.max_box_err, float(box_err[i, j]))
            diff.max_score_err = max(diff.max_score_err, float(score_err[i, j]))
        diff.unmatched_got = [j for j in range(len(gb)) if not taken[j]]
    else:
        diff.unmatched_ref, diff.unmatched_got = list(range(len(rb))), list(range(len(gb)))
    diff.in_order = all(i == j for i, j in diff.pairs)

    def info(boxes, scores, idx):  # (score, shortest side) of each unmatched detection
        return [(float(scores[k]), float(torch.min(boxes[k, 2:] - boxes[k, :2]))) for k in idx]

    diff.unmatched_ref_info = info(rb, rs, diff.unmatched_ref)
    diff.unmatched_got_info = info(gb, gs, diff.unmatched_got)

    if "masks" in ref and "masks" in got and diff.pairs:
        i = torch.tensor([p[0] for p in diff.pairs])
        j = torch.tensor([p[1] for p in diff.pairs])
        rm, gm = ref["masks"].cpu()[i], got["masks"].cpu()[j]
        rm = rm if rm.dtype == torch.bool else rm >= mask_threshold
        gm = gm if gm.dtype == torch.bool else gm >= mask_threshold
        diff.mask_agreement = float((rm == gm).float().mean())
    return diff
