"""Stage-by-stage equivalence of two Mask R-CNNs with the same weights, judged against the
measured float spread of a reference; the verdict does not depend on one CPU's last bits.

Two correct implementations differ in the last bits (oneDNN picks other kernels on other
CPUs, folded batch norms and channels-last layouts reorder sums), and a random-weight network
amplifies that. So neither final detections nor any tolerance fixed in advance make a
machine-independent test. Instead, every model is run on the same images and its stages are
recorded (:func:`record_stages`):

    batch, backbone stem and residual blocks, features, RPN objectness and deltas,
    proposals, box logits and deltas, detections, mask logits, pasted masks

and compared with a float64 run of the reference (the *truth*). Two kinds of check:

- **Continuous stages** (tensors): the tested model's largest error against the truth must
  stay within ``factor`` times the largest error of the reference's own float32 run (the
  *spread*, measured on the same machine in the same process) plus a tiny floor. Each stage
  is run on the truth's input to it (``forced_by``), so that it is judged on its own error,
  not on what the stages before it passed on. The backbone is judged as a whole (the
  features) and part by part: its stem and each residual block (``layer2.0``...). Why:
  float32 rounding enters at every layer and a random-weight network carries it on, so a
  stage spanning the ~50 layers of a ResNet-50 + FPN gathers all their rounding, while a
  wrong weight enters at one layer. For one output channel of ``layer2.0.conv1`` 1 % off,
  the whole backbone's error (level 1) is 31x the float32 reference's with AVX-512 kernels
  but 11x with AVX2 ones, under factor 16 (an AVX2-only AMD Zen 1 passed it); in its own
  block it is 370x-470x with AVX-512, AVX2 and scalar kernels alike (22x-27x the bound).
  Statistics that average rounding out (RMS, per-channel mean signed error, pooled errors)
  do not separate the two over the whole backbone: rounding carried through a deep network
  is a spatially and per-channel correlated signal too, as the bug's error is (those
  ratios were lower than the max's, 7x with AVX2). So the max stays, taken where errors
  enter.
- **Decisions** (top-k, score thresholds, NMS): the truth's candidates are classified as
  robustly kept, robustly dropped or *fragile*: within the tested model's measured deviation
  of a threshold, of a top-k cutoff, of a tie with a competing box, or of the NMS IoU
  threshold, or depending on another fragile candidate. Each of the tested model's outputs
  must map to one of its own candidates that is kept or fragile in the truth, and every
  robustly kept candidate must be there. A detection present on one side only is therefore
  accepted exactly when it sits at a decision boundary. Pasted masks likewise: a pixel may
  differ from a float64 paste of the model's own probabilities into its own boxes only
  where the probability is at the threshold, or where the mask's grown box has an edge at
  a pixel boundary (which float32 may truncate either way).

Candidates carry keys that survive from stage to stage: an RPN candidate is its anchor, a
detection candidate is (proposal's anchor, class). Later stages compare only what both sides
have (a proposal on one side only is fragile by the RPN check, and so are its detections).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision's own paste, taken before anything (maskops.patch_torchvision) can replace it.
from torchvision.models.detection.roi_heads import expand_boxes as _expand_boxes
from torchvision.models.detection.roi_heads import expand_masks as _expand_masks
from torchvision.models.detection.roi_heads import paste_mask_in_image as _paste_one
from torchvision.models.detection.roi_heads import paste_masks_in_image as _torchvision_paste

from ..rpn import to_float32

DROPPED, KEPT, FRAGILE = 0, 1, 2
BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # the largest decoded log-scale, as in torchvision


@dataclass
class StageRecord:
    """What one forward produced at every stage (see the module docstring). Per image lists
    hold one entry per image; boxes are in resized-image pixels except ``final``."""

    config: Dict[str, float]
    image_sizes: List[Tuple[int, int]]
    batch: Tensor
    features: List[Tensor]
    objectness: Tensor  # [N, A] logits, levels one after another, (y, x, anchor)
    rpn_deltas: Tensor  # [N, A, 4]
    anchors: Tensor  # [A, 4]
    level_counts: List[int]
    proposals: List[Tensor]  # [K_i, 4]
    proposal_scores: List[Tensor]  # [K_i] objectness probabilities
    class_logits: List[Tensor]  # [K_i, C]
    box_regression: List[Tensor]  # [K_i, 4 C]
    detections: List[Dict[str, Tensor]]  # boxes [D_i, 4], scores [D_i], labels [D_i]
    mask_logits: List[Tensor]  # [D_i, M, M], the detection's class
    final: List[Dict[str, Tensor]]  # the model's output (input-image pixels, pasted masks)
    forced: Optional[Dict[str, object]] = None  # stages run on the truth's inputs
    # The backbone body's parts (see _Stages.parts): "stem", then each residual block
    # ("layer1.0", ...), empty where the body has no such parts; and their outputs, kept
    # only in a record made without forced_by (a truth: the inputs that forced runs take).
    body_names: List[str] = field(default_factory=list)
    body: List[Tensor] = field(default_factory=list)

    def to(self, device) -> "StageRecord":
        """A copy with every tensor on ``device`` (records compare on the CPU)."""

        def move(x):
            if isinstance(x, Tensor):
                return x.to(device)
            if isinstance(x, (list, tuple)):
                return type(x)(move(v) for v in x)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return dataclasses.replace(
            self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


# ---------------------------------------------------------------- recording


def _config(rpn, roi_heads) -> Dict[str, float]:
    return dict(
        pre_nms_top_n=rpn._pre_nms_top_n["testing"],
        post_nms_top_n=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh,
        rpn_score_thresh=rpn.score_thresh,
        rpn_min_size=rpn.min_size,
        box_score_thresh=roi_heads.score_thresh,
        box_nms_thresh=roi_heads.nms_thresh,
        detections_per_img=roi_heads.detections_per_img,
    )


class _Stages:
    """Runs one model's stages one at a time, hiding how this project's model and
    torchvision's lay out their outputs."""

    def __init__(self, model) -> None:
        from ..mask_rcnn import MaskRCNN

        self.model, self.ours = model, isinstance(model, MaskRCNN)

    def transform(self, images):
        batch, _ = self.model.transform(images)
        return batch, [tuple(int(v) for v in s) for s in batch.image_sizes]

    def backbone(self, tensors: Tensor) -> Dict[str, Tensor]:
        return self.model.backbone(tensors)

    def parts(self) -> Optional[Tuple[List[nn.Module], List[Tuple[str, nn.Module]]]]:
        """The backbone body's stem (its modules before ``layer1``, which the body applies
        one after another) and its residual blocks ``[("layer1.0", block), ...]``; None for
        a backbone without a ResNet body (``backbone.body.layer1``...)."""
        body = getattr(self.model.backbone, "body", None)
        if not isinstance(body, nn.Module):
            return None
        children = list(body.named_children())
        names = [n for n, _ in children]
        if "layer1" not in names:
            return None
        first = names.index("layer1")
        blocks = []
        for name, layer in children[first:]:
            if not (name.startswith("layer") and isinstance(layer, nn.Sequential) and len(layer)):
                return None
            blocks += [(f"{name}.{i}", block) for i, block in enumerate(layer)]
        return [m for _, m in children[:first]], blocks

    def backbone_recorded(
        self, tensors: Tensor
    ) -> Tuple[Dict[str, Tensor], List[str], List[Tensor]]:
        """The backbone's forward on ``tensors``, and the names and outputs of its body's
        parts (``"stem"``: the input of the first block; then each block), recorded by hooks
        on that forward (empty where :meth:`parts` is None, or where the forward does not
        run each part once)."""
        parts = self.parts()
        if parts is None:
            return self.backbone(tensors), [], []
        blocks = parts[1]
        seen: Dict[str, List[Tensor]] = {}

        def keep(name: str, x: Tensor) -> None:
            # A copy: a fused layer's next block may write its sum over this output.
            seen.setdefault(name, []).append(x.detach().clone())

        handles = [blocks[0][1].register_forward_pre_hook(lambda m, args: keep("stem", args[0]))]
        handles += [
            block.register_forward_hook(lambda m, args, out, name=name: keep(name, out))
            for name, block in blocks
        ]
        try:
            features = self.backbone(tensors)
        finally:
            for h in handles:
                h.remove()
        names = ["stem"] + [name for name, _ in blocks]
        if sorted(seen) != sorted(names) or any(len(v) != 1 for v in seen.values()):
            return features, [], []
        return features, names, [seen[n][0] for n in names]

    def rpn_head(self, levels: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Objectness ``[N, A]`` and deltas ``[N, A, 4]``, per level (y, x, anchor)."""
        logits, deltas = self.model.rpn.head(levels)
        if self.ours:
            return to_float32(torch.cat(logits, 1)), to_float32(torch.cat(deltas, 1))
        n = levels[0].shape[0]
        return (
            torch.cat([o.permute(0, 2, 3, 1).reshape(n, -1) for o in logits], 1),
            torch.cat(
                [
                    d.reshape(n, -1, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
                    for d in deltas
                ],
                1,
            ),
        )

    def box_head(self, features, proposals, sizes) -> Tuple[Tensor, Tensor]:
        heads = self.model.roi_heads
        x = heads.box_roi_pool(features, proposals, sizes)
        logits, regression = heads.box_predictor(heads.box_head(x))
        return to_float32(logits), to_float32(regression)

    def mask_head(self, features, boxes, labels, sizes) -> Tensor:
        """Mask logits ``[D, M, M]`` of each box's class."""
        heads = self.model.roi_heads
        x = heads.mask_head(heads.mask_roi_pool(features, boxes, sizes))
        labels = torch.cat(labels)
        if self.ours:
            return to_float32(heads.mask_predictor(x, labels)[:, 0])
        return to_float32(heads.mask_predictor(x)[torch.arange(len(labels)), labels])

    def like(self, x: Tensor, example: Tensor) -> Tensor:
        """``x`` in the dtype and memory format this model's stage input ``example`` has."""
        fmt = (
            torch.channels_last
            if example.dim() == 4
            and not example.is_contiguous()
            and example.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        return x.to(device=example.device, dtype=example.dtype, memory_format=fmt)


@torch.inference_mode()
def record_stages(
    model, images: List[Tensor], forced_by: Optional[StageRecord] = None
) -> StageRecord:
    """Runs ``model`` (this project's :class:`~models.mask_rcnn.MaskRCNN` or torchvision's
    ``MaskRCNN``, in eval mode) on ``images`` stage by stage, as its forward does, and keeps
    every stage's output. ``final`` is what ``model(images)`` returns.

    With ``forced_by`` (the truth's record), each stage is also run on the truth's input to
    that stage (its batch, features, proposals, detections): the ``forced`` outputs measure
    each stage's own error, not what it inherits from the stages before it.
    """
    if model.training:
        raise ValueError("record_stages needs a model in eval mode")
    from ..mask_rcnn import MaskRCNN

    if isinstance(model, MaskRCNN):
        with model.inference_context():  # what its forward runs
            return _record_stages(model, images, forced_by)
    return _record_stages(model, images, forced_by)


def _record_stages(model, images: List[Tensor], forced_by: Optional[StageRecord]) -> StageRecord:
    run = _Stages(model)
    original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    batch, sizes = run.transform(images)
    tensors = batch.tensors
    features, body_names, body = run.backbone_recorded(tensors)
    levels = list(features.values())
    n = tensors.shape[0]
    rpn, heads = model.rpn, model.roi_heads
    objectness, rpn_deltas = run.rpn_head(levels)
    if run.ours:
        anchors, counts = rpn.anchor_generator(
            tuple(tensors.shape[-2:]),
            [tuple(f.shape[-2:]) for f in levels],
            objectness.dtype,
            objectness.device,
        )
        proposals, proposal_scores, _ = rpn(batch, levels)
    else:
        anchor_list = rpn.anchor_generator(batch, levels)
        anchors = anchor_list[0]
        counts = _level_counts(levels, rpn)
        # torchvision's RPN forward, keeping the scores it drops.
        decoded = rpn.box_coder.decode(rpn_deltas.reshape(-1, 4), anchor_list).view(n, -1, 4)
        proposals, proposal_scores = rpn.filter_proposals(decoded, objectness, sizes, counts)
    class_logits, box_regression = run.box_head(features, proposals, sizes)
    boxes, scores, labels = heads.postprocess_detections(
        class_logits, box_regression, proposals, sizes
    )
    mask_logits = run.mask_head(features, boxes, labels, sizes)
    counts_d = [len(b) for b in boxes]
    detections = [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]
    probs = mask_logits.sigmoid()[:, None].split(counts_d)
    out = [dict(d, masks=p) for d, p in zip(detections, probs)]
    if run.ours:
        final = model.transform.postprocess(out, sizes, original_sizes, model.mask_threshold)
    else:
        final = model.transform.postprocess(out, sizes, original_sizes)
    k_counts = [len(p) for p in proposals]
    rec = StageRecord(
        config=_config(rpn, heads),
        image_sizes=sizes,
        batch=tensors,
        features=levels,
        objectness=objectness,
        rpn_deltas=rpn_deltas,
        anchors=anchors,
        level_counts=list(counts),
        proposals=list(proposals),
        proposal_scores=list(proposal_scores),
        class_logits=list(class_logits.split(k_counts)),
        box_regression=list(box_regression.split(k_counts)),
        detections=detections,
        mask_logits=list(mask_logits.split(counts_d)),
        final=final,
        body_names=body_names,
        body=body if forced_by is None else [],
    )
    if forced_by is not None:
        rec.forced = _forced(run, forced_by, rec, body, features, boxes)
    return rec


def _level_counts(levels: List[Tensor], rpn) -> List[int]:
    per_location = rpn.anchor_generator.num_anchors_per_location()
    return [int(f.shape[-2] * f.shape[-1]) * a for f, a in zip(levels, per_location)]


def _forced(
    run: _Stages,
    truth: StageRecord,
    own: StageRecord,
    own_body: List[Tensor],
    features: Dict[str, Tensor],
    boxes: List[Tensor],
) -> Dict[str, object]:
    """Each stage of ``run``'s model on the truth's input to it, cast to the model's dtype
    and memory format (those of the model's own record ``own`` at that stage; ``own_body``:
    its body's parts' outputs). The body's parts too, each on the truth's input to it: the
    stem on the truth's batch, each block on the truth's output of the part before it."""
    tensors = own.batch
    t_features = {k: run.like(f, features[k]) for k, f in zip(features, truth.features)}
    example = boxes[0] if boxes else truth.proposals[0].float()
    proposals = [p.to(example.dtype) for p in truth.proposals]
    det_boxes = [d["boxes"].to(example.dtype) for d in truth.detections]
    sizes = truth.image_sizes
    logits, regression = run.box_head(t_features, proposals, sizes)
    k_counts = [len(p) for p in proposals]
    objectness, deltas = run.rpn_head(list(t_features.values()))
    parts = run.parts()
    body = []
    if (
        parts is not None
        and own.body_names
        and own.body_names == truth.body_names
        and len(truth.body) == len(truth.body_names)
    ):
        stem, blocks = parts
        x = run.like(truth.batch, tensors)
        for module in stem:
            x = module(x)
        body = [x] + [
            block(run.like(truth.body[j], own_body[j])) for j, (_, block) in enumerate(blocks)
        ]
    return dict(
        body_names=list(own.body_names) if body else [],
        body=body,
        features=list(run.backbone(run.like(truth.batch, tensors)).values()),
        objectness=objectness,
        rpn_deltas=deltas,
        class_logits=list(logits.split(k_counts)),
        box_regression=list(regression.split(k_counts)),
        mask_logits=list(
            run.mask_head(
                t_features, det_boxes, [d["labels"] for d in truth.detections], sizes
            ).split([len(b) for b in det_boxes])
        ),
    )


# ---------------------------------------------------------------- reference box math (float64)


def _decode(deltas: Tensor, boxes: Tensor, weights: Sequence[float]) -> Tensor:
    """Faster R-CNN box decoding in float64: ``deltas [..., 4]`` against ``boxes [..., 4]``."""
    deltas, boxes = deltas.double(), boxes.double()
    wx, wy, ww, wh = weights
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    px, py = dx * w + cx, dy * h + cy
    pw, ph = dw.exp() * w, dh.exp() * h
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], -1)


def _clip(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    h, w = size
    return torch.stack(
        [
            boxes[..., 0].clamp(0, w),
            boxes[..., 1].clamp(0, h),
            boxes[..., 2].clamp(0, w),
            boxes[..., 3].clamp(0, h),
        ],
        -1,
    )


def _iou_bounds(box: np.ndarray, others: np.ndarray, tol: float) -> Tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of the IoU of ``box [4]`` with each of ``others [M, 4]`` when
    every coordinate of both may move by up to ``tol`` pixels."""
    iw = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    ih = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    aw, ah = box[2] - box[0], box[3] - box[1]
    bw, bh = others[:, 2] - others[:, 0], others[:, 3] - others[:, 1]
    t2 = 2 * tol
    inter_lo = np.clip(iw - t2, 0, None) * np.clip(ih - t2, 0, None)
    inter_hi = np.clip(np.minimum(iw + t2, np.minimum(aw, bw) + t2), 0, None) * np.clip(
        np.minimum(ih + t2, np.minimum(ah, bh) + t2), 0, None
    )
    area_a_hi, area_b_hi = (aw + t2) * (ah + t2), (bw + t2) * (bh + t2)
    area_a_lo = max(aw - t2, 0.0) * max(ah - t2, 0.0)
    area_b_lo = np.clip(bw - t2, 0, None) * np.clip(bh - t2, 0, None)
    lo = inter_lo / np.maximum(area_a_hi + area_b_hi - inter_lo, 1e-12)
    hi = inter_hi / np.maximum(area_a_lo + area_b_lo - inter_hi, 1e-12)
    return lo, np.minimum(hi, 1.0)


# ---------------------------------------------------------------- decisions with margins


def classify_selection(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    status: Tensor,
    nms_thresh: float,
    top_k: int,
    box_tol: float,
    score_tol: float,
) -> Tensor:
    """Greedy per-group NMS (suppress IoU > ``nms_thresh``) then the best ``top_k``, as
    torchvision's ``batched_nms`` + slicing does, applied with margins.

    Args:
        boxes, scores, groups: the candidates (float64 boxes and scores).
        status: per candidate DROPPED / KEPT (enters NMS) / FRAGILE (may or may not enter),
            from the earlier steps.
        box_tol, score_tol: how far another correct run's boxes and scores may lie from these.

    Returns:
        per candidate DROPPED, KEPT (kept by every run within the tolerances) or FRAGILE.
    """
    b, s = boxes.double().numpy(), scores.double().numpy()
    g, st = groups.numpy(), status.numpy()
    order = np.argsort(-s, kind="stable")
    forced = st == FRAGILE
    while True:
        out, more = _nms_pass(b, s, g, st, forced, order, nms_thresh, top_k, box_tol, score_tol)
        if not more.any():
            return torch.from_numpy(out)
        forced = forced | more


def _nms_pass(boxes, scores, groups, status, forced, order, thr, top_k, box_tol, score_tol):
    out = np.full(status.shape, DROPPED, dtype=np.int8)
    more = np.zeros(forced.shape, dtype=bool)  # candidates found fragile only after the fact
    survivors: Dict[int, List[int]] = {}  # group -> kept or fragile candidates so far
    kept_scores: List[float] = []  # robustly kept, in decreasing order
    for i in order[status[order] != DROPPED].tolist():
        s = scores[i]
        if len(kept_scores) >= top_k and kept_scores[top_k - 1] > s + score_tol:
            break  # top_k robustly kept candidates rank above everything left
        prev = survivors.setdefault(int(groups[i]), [])
        fragile = bool(forced[i])
        if prev:
            idx = np.array(prev)
            lo, hi = _iou_bounds(boxes[i], boxes[idx], box_tol)
            certain_order = scores[idx] > s + score_tol
            robust = out[idx] == KEPT
            if (robust & certain_order & (lo > thr)).any():
                continue  # suppressed whatever the rounding
            maybe = hi > thr
            if maybe.any():
                fragile = True
                # An earlier box that i might precede (near-equal scores), and might
                # suppress, is fragile too.
                more[idx[maybe & ~certain_order & robust]] = True
        out[i] = FRAGILE if fragile else KEPT
        prev.append(i)
        if not fragile:
            kept_scores.append(s)
    more &= ~forced
    # Top-k with margins, over what survived NMS.
    alive = np.nonzero(out != DROPPED)[0]
    if len(alive) > top_k:
        s = scores[alive]
        robust_sorted = np.sort(s[out[alive] == KEPT])
        all_sorted = np.sort(s)
        sure_above = len(robust_sorted) - np.searchsorted(robust_sorted, s + score_tol, "right")
        maybe_above = len(all_sorted) - np.searchsorted(all_sorted, s - score_tol, "left") - 1
        out[alive[maybe_above >= top_k]] = FRAGILE
        out[alive[sure_above >= top_k]] = DROPPED
    return out, more


def _threshold_status(values: Tensor, thresh: float, tol: float) -> Tensor:
    """KEPT above ``thresh`` by more than ``tol``, DROPPED below by more, FRAGILE between
    (whether the op keeps ``> thresh`` or ``>= thresh``: the margin covers both)."""
    st = torch.full(values.shape, KEPT, dtype=torch.int8)
    st[values < thresh - tol] = DROPPED
    st[(values - thresh).abs() <= tol] = FRAGILE
    return st


def _merge(a: Tensor, b: Tensor) -> Tensor:
    """Combines two steps' statuses: dropped by either is dropped, else fragile by either."""
    out = torch.maximum(a, b)
    out[(a == DROPPED) | (b == DROPPED)] = DROPPED
    return out


# ---------------------------------------------------------------- candidates


@dataclass
class Candidates:
    """One decision's candidates of one image: ``keys`` identify them across models."""

    keys: Tensor  # [M] int64
    boxes: Tensor  # [M, 4] float64
    scores: Tensor  # [M] float64
    groups: Tensor  # [M] int64 (level or class)
    extra: Tensor  # [M] float64: the value a pre-selection ranks by (RPN logit)
    _sorted: Optional[Tuple[Tensor, Tensor]] = field(default=None, repr=False)

    def lookup(self, keys: Tensor) -> Tensor:
        """Positions of ``keys`` in ``self.keys`` (-1 where absent)."""
        pos = torch.full((len(keys),), -1, dtype=torch.int64)
        if len(self.keys) == 0 or len(keys) == 0:
            return pos
        if self._sorted is None:
            self._sorted = torch.sort(self.keys)
        sorted_keys, perm = self._sorted
        at = torch.searchsorted(sorted_keys, keys).clamp(max=len(sorted_keys) - 1)
        hit = sorted_keys[at] == keys
        pos[hit] = perm[at[hit]]
        return pos


def rpn_candidates(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    image_size: Tuple[int, int],
    level_counts: Sequence[int],
) -> Candidates:
    """Every anchor of one image as a proposal candidate (key: the anchor's index), from the
    RPN head's ``objectness [A]`` logits and ``deltas [A, 4]``, decoded in float64."""
    logits = objectness.detach().cpu().double()
    boxes = _clip(
        _decode(deltas.detach().cpu(), anchors.detach().cpu(), (1.0, 1.0, 1.0, 1.0)), image_size
    )
    groups = torch.repeat_interleave(
        torch.arange(len(level_counts)), torch.tensor(list(level_counts))
    )
    return Candidates(torch.arange(len(logits)), boxes, logits.sigmoid(), groups, logits)


def classify_rpn(
    cands: Candidates,
    level_counts: Sequence[int],
    config: Dict[str, float],
    box_tol: float,
    score_tol: float,
    logit_tol: float,
) -> Tensor:
    """The RPN's selection with margins (see :func:`classify_selection`): per level the best
    ``pre_nms_top_n`` logits, boxes of at least ``rpn_min_size``, scores of at least
    ``rpn_score_thresh``, NMS per level, the best ``post_nms_top_n``."""
    status = torch.full((len(cands.keys),), KEPT, dtype=torch.int8)
    k, start = int(config["pre_nms_top_n"]), 0
    for count in level_counts:
        if count > k:
            lv = cands.extra[start : start + count]
            cut = float(torch.topk(lv, k).values[-1])
            status[start : start + count] = _threshold_status(lv, cut, logit_tol)
        start += count
    sides = torch.minimum(
        cands.boxes[:, 2] - cands.boxes[:, 0], cands.boxes[:, 3] - cands.boxes[:, 1]
    )
    status = _merge(status, _threshold_status(sides, float(config["rpn_min_size"]), 2 * box_tol))
    status = _merge(
        status, _threshold_status(cands.scores, float(config["rpn_score_thresh"]), score_tol)
    )
    return classify_selection(
        cands.boxes,
        cands.scores,
        cands.groups,
        status,
        float(config["rpn_nms_thresh"]),
        int(config["post_nms_top_n"]),
        box_tol,
        score_tol,
    )


def check_rpn_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    image_size: Tuple[int, int],
    level_counts: Sequence[int],
    config: Dict[str, float],
    boxes: Tensor,
    scores: Tensor,
    box_tol: float = 1e-3,
    score_tol: float = 1e-6,
) -> StageCheck:
    """Whether ``boxes``/``scores`` are proposals that a correct RPN (``config``: the keys of
    :class:`StageRecord`'s) makes from these head outputs of one image when its arithmetic
    (exp, decoding) differs from float64 by up to ``box_tol`` px and ``score_tol``: decisions
    within those margins may go either way, all others must be as in float64."""
    cands = rpn_candidates(objectness, deltas, anchors, image_size, level_counts)
    keys = map_outputs(
        _rpn_pool(cands, level_counts, int(config["pre_nms_top_n"])),
        boxes.detach().cpu(),
        scores.detach().cpu(),
        None,
        box_tol=max(1e-2, 2 * box_tol),
        score_tol=max(1e-5, 2 * score_tol),
    )
    report = Report()
    _check_decision(
        report,
        "rpn: proposals",
        cands,
        keys,
        torch.zeros(0, dtype=torch.int64),
        classify_rpn(cands, level_counts, config, box_tol, score_tol, score_tol),
        box_tol,
        score_tol,
    )
    return report.checks[0]


def detection_candidates(rec: StageRecord, i: int, proposal_keys: Tensor) -> Candidates:
    """Every (proposal, foreground class) of image ``i`` (key: anchor * C + class)."""
    logits, regression = rec.class_logits[i].double(), rec.box_regression[i].double()
    k, c = logits.shape
    boxes = _clip(
        _decode(regression.reshape(k, c, 4), rec.proposals[i][:, None, :], (10.0, 10.0, 5.0, 5.0)),
        rec.image_sizes[i],
    )[:, 1:]
    scores = F.softmax(logits, -1)[:, 1:]
    labels = torch.arange(1, c).expand(k, c - 1)
    keys = proposal_keys[:, None] * c + labels
    return Candidates(
        keys.reshape(-1),
        boxes.reshape(-1, 4),
        scores.reshape(-1),
        labels.reshape(-1),
        scores.reshape(-1),
    )


def map_outputs(
    cands: Candidates,
    boxes: Tensor,
    scores: Tensor,
    groups: Optional[Tensor],
    box_tol: float = 1e-2,
    score_tol: float = 1e-5,
) -> Tensor:
    """The key of the candidate each output ``(box, score, group)`` was made from: the
    closest candidate of the same group within ``box_tol`` px and ``score_tol`` (a model's
    own float32 arithmetic on the same raw outputs), else -1."""
    keys = torch.full((len(boxes),), -1, dtype=torch.int64)
    if len(boxes) == 0 or len(cands.keys) == 0:
        return keys
    boxes, scores = boxes.double(), scores.double()
    if groups is None:
        parts = [(torch.arange(len(boxes)), torch.arange(len(cands.keys)))]
    else:
        parts = [
            (torch.where(groups == g)[0], torch.where(cands.groups == g)[0])
            for g in groups.unique().tolist()
        ]
    for outs, pool in parts:
        for lo in range(0, len(outs), 128):
            o = outs[lo : lo + 128]
            berr = (boxes[o, None, :] - cands.boxes[None, pool]).abs_().amax(-1)
            serr = (scores[o, None] - cands.scores[None, pool]).abs_()
            cost = torch.where(
                (berr <= box_tol) & (serr <= score_tol),
                berr + serr,
                torch.full_like(berr, math.inf),
            )
            best = cost.argmin(1)
            found = torch.isfinite(cost.gather(1, best[:, None])[:, 0])
            keys[o[found]] = cands.keys[pool[best[found]]]
    return keys


def _rpn_pool(cands: Candidates, level_counts: Sequence[int], pre_nms_top_n: int) -> Candidates:
    """The candidates an RPN can have picked: its own best ``pre_nms_top_n`` of each level
    (a few more, for ties at the cut)."""
    k = pre_nms_top_n + 16
    keep, start = [], 0
    for count in level_counts:
        lv = cands.extra[start : start + count]
        keep.append(start + torch.topk(lv, min(k, count)).indices)
        start += count
    idx = torch.cat(keep)
    return Candidates(
        *(getattr(cands, f)[idx] for f in ("keys", "boxes", "scores", "groups", "extra"))
    )


# ---------------------------------------------------------------- the comparison


@dataclass
class StageCheck:
    stage: str
    ok: bool
    detail: str
    error: Optional[float] = None  # a continuous stage's max error, and the bound on it
    bound: Optional[float] = None


@dataclass
class Report:
    """The verdict of :func:`compare_stages`: one :class:`StageCheck` per stage and image."""

    checks: List[StageCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> List[StageCheck]:
        return [c for c in self.checks if not c.ok]

    def add(
        self,
        stage: str,
        ok: bool,
        detail: str,
        error: Optional[float] = None,
        bound: Optional[float] = None,
    ) -> None:
        self.checks.append(StageCheck(stage, bool(ok), detail, error, bound))

    def check(self, stage: str) -> StageCheck:
        """The (first) check of ``stage``."""
        for c in self.checks:
            if c.stage == stage:
                return c
        raise KeyError(stage)

    def brief(self) -> str:
        """One line: how many checks passed, and the detections' verdict."""
        dets = [c.detail for c in self.checks if c.stage.startswith("box head: detections,")]
        return f"{sum(c.ok for c in self.checks)} of {len(self.checks)} stage checks ok" + (
            f"; detections: {dets[0]}" if dets else ""
        )

    def summary(self) -> str:
        return "\n".join(f"{'ok  ' if c.ok else 'FAIL'} {c.stage}: {c.detail}" for c in self.checks)


def _max_err(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    if a.dtype != torch.float64 and b.dtype != torch.float64:
        a = a.double()
    return float(torch.sub(a, b).abs_().max())  # in float64: the other side is promoted


def _continuous(
    report: Report,
    stage: str,
    truth_vs_spread: Tuple[Tensor, Tensor],
    truth_vs_tested: Tuple[Tensor, Tensor],
    factor: float,
    rel_floor: float,
) -> float:
    """Checks ``|tested - truth|_max <= factor * |spread - truth|_max + floor``, the floor
    being ``rel_floor`` times the truth's magnitude. Returns the tested error."""
    e_spread = _max_err(*truth_vs_spread)
    e_tested = _max_err(*truth_vs_tested)
    scale = float(truth_vs_tested[0].abs().max()) if truth_vs_tested[0].numel() else 0.0
    bound = factor * e_spread + rel_floor * scale
    report.add(
        stage,
        e_tested <= bound,
        f"max err {e_tested:.3g} (float32 reference: {e_spread:.3g}, bound {bound:.3g})",
        e_tested,
        bound,
    )
    return e_tested


def _common(a_keys: Tensor, b_keys: Tensor) -> Tuple[Tensor, Tensor]:
    """Positions in ``a`` and ``b`` of the keys both have (keys unique, >= 0)."""
    common, ia, ib = [], {int(k): n for n, k in enumerate(a_keys.tolist())}, []
    for n, k in enumerate(b_keys.tolist()):
        if k >= 0 and k in ia:
            common.append(ia[k])
            ib.append(n)
    return torch.tensor(common, dtype=torch.int64), torch.tensor(ib, dtype=torch.int64)


class _Side:
    """Per-image decision data of one model: its candidates and its outputs' keys."""

    def __init__(self, rec: StageRecord) -> None:
        self.rec = rec
        self.rpn: List[Candidates] = []
        self.proposal_keys: List[Tensor] = []
        self.det: List[Candidates] = []
        self.detection_keys: List[Tensor] = []

    def build(self) -> None:
        rec = self.rec
        for i in range(len(rec.image_sizes)):
            rc = rpn_candidates(
                rec.objectness[i],
                rec.rpn_deltas[i],
                rec.anchors,
                rec.image_sizes[i],
                rec.level_counts,
            )
            self.rpn.append(rc)
            pool = _rpn_pool(rc, rec.level_counts, int(rec.config["pre_nms_top_n"]))
            pk = map_outputs(pool, rec.proposals[i], rec.proposal_scores[i], None)
            self.proposal_keys.append(pk)
            dc = detection_candidates(rec, i, pk.clamp(min=0))
            self.det.append(dc)
            d = rec.detections[i]
            self.detection_keys.append(map_outputs(dc, d["boxes"], d["scores"], d["labels"]))


def _deviation(truth: Candidates, tested: Candidates) -> Tuple[float, float, float]:
    """Largest differences of boxes, scores and ranking values over the candidates both have."""
    it, ie = _common(truth.keys, tested.keys)
    return (
        _max_err(truth.boxes[it], tested.boxes[ie]),
        _max_err(truth.scores[it], tested.scores[ie]),
        _max_err(truth.extra[it], tested.extra[ie]),
    )


def _check_decision(
    report: Report,
    stage: str,
    truth: Candidates,
    tested_keys: Tensor,
    extra_fragile: Tensor,
    status: Tensor,
    box_tol: float,
    score_tol: float,
) -> None:
    """Checks a tested model's selection (the keys of its outputs, -1 for an output made from
    no candidate) against the truth's candidates' ``status``; ``extra_fragile``: keys of
    candidates that only the tested model has, fragile by an earlier step."""
    unmapped = int((tested_keys < 0).sum())
    if len(extra_fragile):
        pos = truth.lookup(extra_fragile)
        pos = pos[pos >= 0]
        status[pos[status[pos] == KEPT]] = FRAGILE
    got = tested_keys[tested_keys >= 0]
    pos = truth.lookup(got)
    missing_in_truth = got[pos < 0]  # the tested model's candidates the truth lacks
    own = pos[pos >= 0]
    wrongly_kept = int((status[own] == DROPPED).sum())
    kept = set(truth.keys[status == KEPT].tolist())
    lost = kept - set(got.tolist())
    duplicates = len(got) - len(set(got.tolist()))
    fragile = int((status == FRAGILE).sum())
    allowed_extra = set(extra_fragile.tolist())
    strangers = [k for k in missing_in_truth.tolist() if k not in allowed_extra]
    ok = not (unmapped or wrongly_kept or lost or duplicates or strangers)
    report.add(
        stage,
        ok,
        f"{len(got)} kept, {len(kept)} robustly kept in the truth, {fragile} fragile "
        f"(margins: boxes {box_tol:.2g} px, scores {score_tol:.2g}); "
        f"not from a candidate: {unmapped}, robustly dropped but kept: {wrongly_kept}, "
        f"robustly kept but lost: {len(lost)}, duplicates: {duplicates}, "
        f"unknown candidates: {len(strangers)}",
    )


def compare_stages(
    truth: StageRecord,
    spread: StageRecord,
    tested: StageRecord,
    factor: float = 16.0,
    rel_floor: float = 1e-6,
    box_floor: float = 2e-3,
    score_floor: float = 1e-6,
    prob_tol: float = 1e-4,
    paste_box_tol: float = 1e-3,
) -> Report:
    """Compares ``tested`` with ``truth`` (the reference in float64) stage by stage, with
    ``spread`` (the reference in float32) as the measure of honest float rounding.

    Args:
        factor: how many times the float32 reference's error a tested stage may have.
            Correct reorderings measured here (folded batch norms, fused channels-last
            convolutions, other CPUs' oneDNN kernels) stay within 4x; a real bug is far
            above: a weight 1 % off in one channel, 400x in its residual block; a
            half-pixel RoIAlign shift, 10^5x in the box head's logits.
        rel_floor: the smallest bound, relative to the truth's magnitude.
        box_floor, score_floor: added to the measured deviations when classifying decisions
            (a model's own float32 decoding of the same raw outputs).
        prob_tol: pasted masks may differ from a float64 paste of the same probabilities
            where those are this close to the threshold.
        paste_box_tol: and may be pasted onto either whole-pixel truncation of a grown box
            whose edge is this close (px) to a pixel boundary (a model's float32 arithmetic
            on the same box: a few 1e-4 px at most for coordinates up to 2000).
    """
    report = Report()
    truth, spread, tested = truth.to("cpu"), spread.to("cpu"), tested.to("cpu")
    n = len(truth.image_sizes)
    if [tuple(s) for s in tested.image_sizes] != [tuple(s) for s in truth.image_sizes]:
        report.add("transform", False, f"image sizes {tested.image_sizes} != {truth.image_sizes}")
        return report
    for rec, name in ((spread, "spread"), (tested, "tested")):
        if rec.forced is None:
            raise ValueError(f"{name} must be recorded with forced_by=truth")
    fs, ft = spread.forced, tested.forced

    def continuous(stage, t, s, g):
        _continuous(report, stage, (t, s), (t, g), factor, rel_floor)

    continuous("transform: batch", truth.batch, spread.batch, tested.batch)
    if truth.body_names and len(truth.body) == len(truth.body_names):
        # Each part of the backbone body on the truth's input to it (module docstring).
        same = True
        for f, name in ((fs, "float32 reference"), (ft, "tested model")):
            if f.get("body_names") != truth.body_names:
                same = False
                report.add(
                    "backbone: parts",
                    False,
                    f"the {name}'s backbone parts "
                    f"{f.get('body_names')} are not the truth's {truth.body_names}",
                )
        if same:
            for j, part in enumerate(truth.body_names):
                continuous(f"backbone: {part}", truth.body[j], fs["body"][j], ft["body"][j])
    for lvl, t in enumerate(truth.features):
        continuous(f"backbone: level {lvl}", t, fs["features"][lvl], ft["features"][lvl])
    continuous("rpn head: objectness", truth.objectness, fs["objectness"], ft["objectness"])
    continuous("rpn head: deltas", truth.rpn_deltas, fs["rpn_deltas"], ft["rpn_deltas"])
    for i in range(n):
        for what in ("class_logits", "box_regression", "mask_logits"):
            stage = "mask head: logits" if what == "mask_logits" else f"box head: {what}"
            continuous(f"{stage}, image {i}", getattr(truth, what)[i], fs[what][i], ft[what][i])

    sides = {
        name: _Side(rec) for name, rec in (("truth", truth), ("spread", spread), ("tested", tested))
    }
    for side in sides.values():
        side.build()
    cfg = truth.config
    for name in ("spread", "tested"):
        side, t = sides[name], sides["truth"]
        tag = "" if name == "tested" else " (float32 reference)"
        for i in range(n):
            rc = t.rpn[i]
            box_dev, score_dev, logit_dev = _deviation(rc, side.rpn[i])
            box_tol, score_tol = box_dev + box_floor, score_dev + score_floor
            status = classify_rpn(
                rc, truth.level_counts, cfg, box_tol, score_tol, logit_dev + score_floor
            )
            _check_decision(
                report,
                f"rpn: proposals{tag}, image {i}",
                rc,
                side.proposal_keys[i],
                torch.zeros(0, dtype=torch.int64),
                status,
                box_tol,
                score_tol,
            )

            # Detection candidates of proposals one model has are fragile by the RPN check.
            only = torch.cat(
                [
                    _only(t.proposal_keys[i], side.proposal_keys[i]),
                    _only(side.proposal_keys[i], t.proposal_keys[i]),
                ]
            )
            c = truth.class_logits[i].shape[-1]
            only_keys = (only[:, None] * c + torch.arange(1, c)).reshape(-1)
            dc = _union(t.det[i], side.det[i], only_keys)

            box_dev, score_dev, _ = _deviation(dc, side.det[i])
            box_tol, score_tol = box_dev + box_floor, score_dev + score_floor
            sides_ = torch.minimum(dc.boxes[:, 2] - dc.boxes[:, 0], dc.boxes[:, 3] - dc.boxes[:, 1])
            status = _merge(
                _threshold_status(dc.scores, float(cfg["box_score_thresh"]), score_tol),
                _threshold_status(sides_, 1e-2, 2 * box_tol),
            )
            status = classify_selection(
                dc.boxes,
                dc.scores,
                dc.groups,
                status,
                float(cfg["box_nms_thresh"]),
                int(cfg["detections_per_img"]),
                box_tol,
                score_tol,
            )
            _check_decision(
                report,
                f"box head: detections{tag}, image {i}",
                dc,
                side.detection_keys[i],
                only_keys,
                status,
                box_tol,
                score_tol,
            )

        if name == "tested":
            for i in range(n):
                _check_paste(report, f"paste: masks, image {i}", tested, i, prob_tol, paste_box_tol)
    return report


def _only(a: Tensor, b: Tensor) -> Tensor:
    """Keys (>= 0) of ``a`` that ``b`` lacks."""
    bs = set(b.tolist())
    return torch.tensor([k for k in a.tolist() if k >= 0 and k not in bs], dtype=torch.int64)


def _union(truth: Candidates, tested: Candidates, only_keys: Tensor) -> Candidates:
    """The truth's candidates plus the tested model's that the truth lacks (those of its
    one-sided proposals)."""
    pos = tested.lookup(only_keys)
    pos = pos[pos >= 0]
    missing = pos[truth.lookup(tested.keys[pos]) < 0]
    if len(missing) == 0:
        return truth
    return Candidates(
        *(
            torch.cat([getattr(truth, f), getattr(tested, f)[missing]])
            for f in ("keys", "boxes", "scores", "groups", "extra")
        )
    )


def _binary(masks: Tensor) -> Tensor:
    return masks if masks.dtype == torch.bool else masks >= 0.5


def _check_paste(
    report: Report, stage: str, rec: StageRecord, i: int, prob_tol: float, box_tol: float
) -> None:
    """The paste of the model's own mask probabilities into its own final boxes, against
    torchvision's paste of the same in float64: thresholded pixels must agree except where
    the float64 probability is within ``prob_tol`` of the threshold. A paste truncates each
    mask's grown box to whole pixels; where a grown box's edge lies within ``box_tol`` px of
    a pixel boundary, float32 and float64 may truncate it differently (and then resample
    the whole mask onto a box a pixel larger or smaller), so such a mask's pixels must agree
    with the float64 paste onto either truncation."""
    det = rec.final[i]
    got = _binary(det["masks"])
    if len(got) == 0:
        report.add(stage, True, "no masks")
        return
    size = tuple(got.shape[-2:])
    probs = rec.mask_logits[i].double().sigmoid()[:, None]
    boxes = det["boxes"].double()
    ref = _torchvision_paste(probs, boxes, size, padding=1)
    differ = got != (ref >= 0.5)
    bad = differ & ((ref - 0.5).abs() > prob_tol)
    padded, scale = _expand_masks(probs, padding=1)
    grown = _expand_boxes(boxes, scale)
    either_way = 0
    for d in torch.where(bad.flatten(1).any(1))[0].tolist():
        # The boxes that truncating the grown box, each edge moved by up to box_tol, gives.
        options = [
            sorted({int((v - box_tol).trunc()), int((v + box_tol).trunc())}) for v in grown[d]
        ]
        if all(len(o) == 1 for o in options):
            continue
        either_way += 1
        for box in itertools.product(*options):  # the mask as a whole fits one of them
            alt = _paste_one(padded[d, 0], torch.tensor(box), *size)
            off = (got[d, 0] != (alt >= 0.5)) & ((alt - 0.5).abs() > prob_tol)
            if off.sum() < bad[d, 0].sum():
                bad[d, 0] = off
    n_bad = int(bad.sum())
    report.add(
        stage,
        n_bad == 0,
        f"{len(got)} masks, {int(differ.sum())} pixels differ from the "
        f"float64 paste, {n_bad} of them farther than {prob_tol:g} from the threshold"
        + (
            f" (in {either_way} masks whose grown box may truncate either way, judged "
            f"against both pastes)"
            if either_way
            else ""
        ),
    )
