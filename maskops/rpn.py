"""The RPN proposal step as one op: torchvision ``RegionProposalNetwork``'s box decoding and
``filter_proposals`` for a whole batch. Kernels in csrc/rpn/.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _validate as V
from ._fx import leaf


def _anchors(anchors, batch: int, num_anchors: int, ref: Tensor) -> Tensor:
    if isinstance(anchors, (list, tuple)):
        if len(anchors) != batch:
            raise ValueError(
                f"anchors given as a list must have one Tensor[A, 4] per image "
                f"({batch}), got {len(anchors)}"
            )
        for i, a in enumerate(anchors):
            V.floating(a, f"anchors[{i}]")
            if a.dim() != 2 or a.shape != (num_anchors, 4):
                raise ValueError(
                    f"anchors[{i}] must have shape [A, 4] = [{num_anchors}, 4], "
                    f"got {tuple(a.shape)}"
                )
            V.same_device(a, ref, f"anchors[{i}]", "objectness")
        # maskops.AnchorGenerator gives every image the same tensor: no copy needed then.
        if all(a is anchors[0] for a in anchors):
            return anchors[0]
        return torch.stack(list(anchors))
    V.floating(anchors, "anchors")
    if not (anchors.shape == (num_anchors, 4) or anchors.shape == (batch, num_anchors, 4)):
        raise ValueError(
            f"anchors must have shape [A, 4] or [B, A, 4] with A = {num_anchors}, "
            f"B = {batch}, got {tuple(anchors.shape)}"
        )
    V.same_device(anchors, ref, "anchors", "objectness")
    return anchors


@leaf
def rpn_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Union[Tensor, Sequence[Tensor]],
    image_sizes: Sequence[Tuple[int, int]],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float,
    min_size: float,
    num_anchors_per_level: Sequence[int],
) -> Tuple[List[Tensor], List[Tensor]]:
    """Region proposals from RPN outputs, for a batch: torchvision's RPN post-processing.

    Per image, as torchvision's ``RegionProposalNetwork`` (``box_coder.decode`` then
    ``filter_proposals``): the ``pre_nms_top_n`` anchors with the highest logits of each level
    (``torch.topk``), their deltas decoded (weights ``(1, 1, 1, 1)``, ``dw``/``dh`` clamped at
    ``log(1000 / 16)``) and the boxes clipped to the image; boxes with a side
    ``< min_size`` or a score ``sigmoid(logit) < score_thresh`` dropped; NMS per level with IoU
    threshold ``nms_thresh``; the ``post_nms_top_n`` best kept. Only the selected anchors are
    decoded.

    Args:
        objectness: ``Tensor[B, A]`` logits, levels one after another (torchvision's
            ``concat_box_prediction_layers`` order); its ``[B * A, 1]`` output also works.
        deltas: ``Tensor[B, A, 4]`` box deltas ``(dx, dy, dw, dh)``, or ``[B * A, 4]``.
        anchors: ``Tensor[A, 4]`` shared by all images, ``Tensor[B, A, 4]``, or a list of B
            ``Tensor[A, 4]`` (an ``AnchorGenerator``'s output), boxes ``(x1, y1, x2, y2)``.
        image_sizes: ``(height, width)`` of each image (``ImageList.image_sizes``).
        pre_nms_top_n: candidates per level and image.
        post_nms_top_n: proposals kept per image.
        nms_thresh: IoU threshold of the NMS.
        score_thresh: minimum score (torchvision default 0.0).
        min_size: minimum box side (torchvision: 1e-3).
        num_anchors_per_level: how many of the A anchors belong to each level.

    Returns:
        ``(boxes, scores)``: per image ``Tensor[K_b, 4]`` boxes ``(x1, y1, x2, y2)`` in the
        deltas' dtype and ``Tensor[K_b]`` scores (probabilities) in the objectness' dtype, by
        decreasing score. Not differentiable (torchvision detaches these inputs too).

    Matching torchvision: for float32 and float64 inputs on the CPU the proposals are
    torchvision's bit for bit. The sigmoid and exp are torch's own functions (their results
    differ from the C library's in the last bit), the arithmetic is torchvision's operation
    for operation, and the top-k is ``torch.topk``'s: computed directly where it is unique
    and by ``torch.topk`` itself where equal logits make it depend on torch's algorithm.
    One difference remains, in how NMS orders equal scores: maskops orders them by candidate
    position (level, then decreasing logit); torchvision's batched NMS above 1,000 boxes
    sorts them with an unstable sort, and up to 1,000 boxes offsets the boxes by level,
    which can round a coordinate and (rarely) change a decision at the threshold. So with
    distinct scores the outputs are identical; with equal scores they hold the same boxes,
    possibly in another order (and so, where the cut at ``post_nms_top_n`` falls among equal
    scores, another of the equal boxes). The math is in float64 for float64 deltas and in
    float32 otherwise (half-precision inputs compute in float32, where torchvision rounds to
    the half type after every operation).

    On CUDA the top-k is ``torch.topk`` on the GPU, the candidates of the whole batch are
    decoded in one launch and go through one segmented NMS: a segment per image, over only its
    candidates that were not rejected, class-aware by level, so the work grows linearly with
    the batch; the call waits for the GPU once, to read how many boxes each image kept. exp and
    the sigmoid there are the device functions torch's CUDA kernels use.
    """
    V.floating(objectness, "objectness")
    V.floating(deltas, "deltas")
    if not isinstance(image_sizes, (list, tuple)):
        raise TypeError(
            f"image_sizes must be a list of (height, width), got {V._describe(image_sizes)}"
        )
    sizes = [V.image_size(s, f"image_sizes[{i}]") for i, s in enumerate(image_sizes)]
    batch = len(sizes)
    if (
        objectness.dim() == 2
        and objectness.size(1) == 1
        and batch > 0
        and objectness.size(0) % batch == 0
        and objectness.size(0) != batch
    ):
        objectness = objectness.reshape(batch, -1)  # torchvision's [B * A, 1]
    if objectness.dim() != 2 or objectness.size(0) != batch:
        raise ValueError(
            f"objectness must have shape [B, A] (B = {batch} images), got {tuple(objectness.shape)}"
        )
    num_anchors = objectness.size(1)
    if deltas.dim() == 2 and deltas.shape == (batch * num_anchors, 4):
        deltas = deltas.reshape(batch, num_anchors, 4)
    if deltas.shape != (batch, num_anchors, 4):
        raise ValueError(
            f"deltas must have shape [B, A, 4] = [{batch}, {num_anchors}, 4], "
            f"got {tuple(deltas.shape)}"
        )
    V.same_device(deltas, objectness, "deltas", "objectness")
    anchors = _anchors(anchors, batch, num_anchors, objectness)
    if not isinstance(num_anchors_per_level, (list, tuple)):
        raise TypeError(
            f"num_anchors_per_level must be a list of ints, got "
            f"{V._describe(num_anchors_per_level)}"
        )
    levels = [
        V.non_negative_int(int(n) if isinstance(n, Tensor) else n, f"num_anchors_per_level[{i}]")
        for i, n in enumerate(num_anchors_per_level)
    ]
    if sum(levels) != num_anchors:
        raise ValueError(
            f"num_anchors_per_level must add up to the number of anchors "
            f"({num_anchors}), got {levels} (sum {sum(levels)})"
        )
    pre = V.non_negative_int(pre_nms_top_n, "pre_nms_top_n")
    post = V.non_negative_int(post_nms_top_n, "post_nms_top_n")
    nms_thresh = V.number(nms_thresh, "nms_thresh")
    score_thresh = V.number(score_thresh, "score_thresh")
    min_size = V.non_negative_number(min_size, "min_size")
    boxes, scores = torch.ops.maskops.rpn_proposals(
        objectness.detach(),
        deltas.detach(),
        anchors.detach(),
        [x for s in sizes for x in s],
        pre,
        post,
        nms_thresh,
        score_thresh,
        min_size,
        levels,
    )
    return list(boxes), list(scores)


def _rpn_fake(
    objectness,
    deltas,
    anchors,
    image_sizes,
    pre_nms_top_n,
    post_nms_top_n,
    nms_thresh,
    score_thresh,
    min_size,
    num_anchors_per_level,
):
    ctx = torch.library.get_ctx()
    boxes, scores = [], []
    for _ in range(objectness.size(0)):
        k = ctx.new_dynamic_size()
        boxes.append(deltas.new_empty((k, 4)))
        scores.append(objectness.new_empty((k,)))
    return boxes, scores


torch.library.register_fake("maskops::rpn_proposals")(_rpn_fake)
