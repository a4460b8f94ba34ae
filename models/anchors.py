"""Anchor boxes: the reference boxes the RPN's deltas are relative to."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops


class AnchorGenerator(nn.Module):
    """Anchors for every cell of every feature level.

    Args:
        sizes: per level, the anchor sizes (sqrt of area, input pixels), e.g. ``((32,), (64,),
            (128,), (256,), (512,))`` for an FPN's five levels.
        aspect_ratios: per level, the height / width ratios.

    Level ``l`` of a ``Tensor[N, C, H_l, W_l]`` feature map of a ``[N, 3, H, W]`` batch has
    stride ``(H // H_l, W // W_l)`` and ``H_l * W_l * A_l`` anchors, ``A_l`` = sizes x ratios.
    Corners are rounded to whole pixels, as in torchvision. No parameters or buffers (nothing
    in the state_dict), and no cache of its own: ``maskops.generate_anchors`` keeps the
    anchors of recent shapes (not while tracing for export/compile, where they become part of
    the graph).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
    ) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"sizes and aspect_ratios need one entry per level, got "
                f"{len(sizes)} and {len(aspect_ratios)}"
            )
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def forward(
        self,
        batch_shape: Tuple[int, int],
        feature_shapes: List[Tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tuple[Tensor, List[int]]:
        """The anchors (the same for every image) and how many belong to each level.

        Args:
            batch_shape: ``(H, W)`` of the padded image batch.
            feature_shapes: ``(H_l, W_l)`` of each level.

        Returns:
            ``Tensor[A, 4]``, the levels one after another, and ``[H_l * W_l * A_l, ...]``.
        """
        counts = [h * w * a for (h, w), a in zip(feature_shapes, self.num_anchors_per_location())]
        strides = [(batch_shape[0] // h, batch_shape[1] // w) for h, w in feature_shapes]
        anchors = ops.generate_anchors(
            feature_shapes, strides, self.sizes, self.aspect_ratios, dtype, device
        )
        return anchors, counts

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"
