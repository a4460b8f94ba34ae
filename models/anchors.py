"""Anchor boxes: the reference boxes the RPN's deltas are relative to."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops


def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float],
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Zero-centred anchors, one per (aspect ratio, size) pair, ratio-major.

    An aspect ratio is height / width; each anchor has area ``size**2``; corners are
    rounded to whole pixels (torchvision's cell anchors). Returns ``Tensor[R * S, 4]``.
    """
    scales = torch.as_tensor(sizes, dtype=dtype)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for every cell of every feature level.

    Args:
        sizes: per level, the anchor sizes (sqrt of area, input pixels), e.g. ``((32,), (64,),
            (128,), (256,), (512,))`` for an FPN's five levels.
        aspect_ratios: per level, the height / width ratios.

    Level ``l`` of a ``Tensor[N, C, H_l, W_l]`` feature map of a ``[N, 3, H, W]`` batch has
    stride ``(H // H_l, W // W_l)`` and ``H_l * W_l * A_l`` anchors. No parameters or buffers
    (nothing in the state_dict).
    """

    def __init__(self, sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes and aspect_ratios need one entry per level, got "
                             f"{len(sizes)} and {len(aspect_ratios)}")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
        self._cell = [base_anchors(s, a) for s, a in zip(self.sizes, self.aspect_ratios)]
        self._cache: Dict[Tuple, List[Tensor]] = {}

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def forward(self, batch_shape: Tuple[int, int], feature_shapes: List[Tuple[int, int]],
                dtype: torch.dtype, device: torch.device) -> List[Tensor]:
        """Per level ``Tensor[H_l * W_l * A_l, 4]`` anchors (the same for every image).

        Args:
            batch_shape: ``(H, W)`` of the padded image batch.
            feature_shapes: ``(H_l, W_l)`` of each level.
        """
        key = (tuple(batch_shape), tuple(feature_shapes), dtype, device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = []
        for cell, (h, w) in zip(self._cell, feature_shapes):
            stride = (batch_shape[0] // h, batch_shape[1] // w)
            out.append(ops.generate_anchors(cell.to(dtype=dtype, device=device), (h, w), stride))
        # Anchors depend on shapes only: reuse them for same-size batches (not while tracing
        # for export/compile, where they become part of the graph).
        if not torch.compiler.is_compiling():
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = out
        return out

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"
