"""Anchors for feature pyramids: torchvision's ``AnchorGenerator``, in one kernel launch.

The anchors of every level come from one call of ``torch.ops.maskops.generate_anchors``
(kernels in csrc/anchors/) and equal torchvision's bit for bit, in the same order, so
torchvision detection weights work unchanged. Anchors depend only on the feature sizes,
strides, anchor sizes / ratios, dtype and device, so they are cached (a small LRU cache in
this module).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _validate as V
from ._fx import leaf

# (feature sizes, strides, sizes, ratios, dtype, device, inference mode) -> anchors.
_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_CACHE_SIZE = 16  # image sizes in use at once (multi-scale training uses a handful)


def clear_anchor_cache() -> None:
    """Empties the anchor cache (it holds at most 16 anchor tensors)."""
    _CACHE.clear()


def _numbers(values, name: str) -> Tuple[float, ...]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got {values!r}")
    return tuple(V.positive_float(v, f"{name}[{i}]") for i, v in enumerate(values))


def _per_level_sizes(sizes, levels: Optional[int] = None) -> Tuple[Tuple[float, ...], ...]:
    """torchvision's convention: a flat sequence means one size per level."""
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise ValueError(
            f"sizes must be a non-empty sequence (one sequence of sizes per level), got {sizes!r}"
        )
    if not isinstance(sizes[0], (list, tuple, Tensor)):
        sizes = tuple((s,) for s in sizes)
    out = tuple(_numbers(s, f"sizes[{i}]") for i, s in enumerate(sizes))
    if levels is not None and len(out) != levels:
        raise ValueError(f"sizes must have one entry per feature level ({levels}), got {len(out)}")
    return out


def _per_level_ratios(ratios, levels: int) -> Tuple[Tuple[float, ...], ...]:
    """torchvision's convention: a flat sequence of ratios is used for every level."""
    if not isinstance(ratios, (list, tuple)) or not ratios:
        raise ValueError(f"aspect_ratios must be a non-empty sequence, got {ratios!r}")
    if not isinstance(ratios[0], (list, tuple, Tensor)):
        ratios = (ratios,) * levels
    out = tuple(_numbers(r, f"aspect_ratios[{i}]") for i, r in enumerate(ratios))
    if len(out) != levels:
        raise ValueError(
            f"aspect_ratios must have one entry per feature level ({levels}), got {len(out)}"
        )
    return out


def _pairs(values, name: str, levels: Optional[int], allow_int: bool, positive: bool):
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{name} must be a sequence with one entry per feature level, got {V._describe(values)}"
        )
    if levels is not None and len(values) != levels:
        raise ValueError(
            f"{name} must have one entry per feature level ({levels}), got {len(values)}"
        )
    out = []
    for i, v in enumerate(values):
        if allow_int and not isinstance(v, (list, tuple, torch.Size)):
            v = (v, v)
        if not isinstance(v, (list, tuple, torch.Size)) or len(v) != 2:
            raise ValueError(f"{name}[{i}] must be a pair (height, width), got {v!r}")
        pair = []
        for j, x in enumerate(v):
            if isinstance(x, Tensor) and x.dim() == 0 and not x.is_floating_point():
                x = int(x)
            x = V.integer(x, f"{name}[{i}][{j}]")
            if x < 0 or (positive and x == 0):
                raise ValueError(
                    f"{name}[{i}] must be {'positive' if positive else 'non-negative'}"
                    f", got {tuple(v)}"
                )
            pair.append(x)
        out.append(tuple(pair))
    return tuple(out)


@leaf
def generate_anchors(
    feature_sizes: Sequence[Tuple[int, int]],
    strides: Sequence,
    sizes: Sequence,
    aspect_ratios: Sequence = (0.5, 1.0, 2.0),
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
    cache: bool = True,
) -> Tensor:
    """The anchors of every feature level, concatenated: torchvision's ``AnchorGenerator``.

    For level ``l`` with feature size ``(H, W)``, stride ``(sh, sw)``, sizes ``s_j`` and aspect
    ratios (height / width) ``r_i``, the cell anchors are
    ``round((-w, -h, w, h) / 2)`` with ``h = sqrt(r_i) * s_j``, ``w = s_j / sqrt(r_i)`` (ratio
    major, size minor, computed in float32 whatever ``dtype`` is, rounding half to even), and
    the anchors are every cell anchor shifted by ``(x * sw, y * sh, x * sw, y * sh)`` for
    every feature cell, row by row: exactly torchvision's values and order.

    Args:
        feature_sizes: ``(H, W)`` of each level (e.g. ``f.shape[-2:]`` for each feature map).
        strides: per level, an int or a pair ``(stride_h, stride_w)`` in image pixels.
            torchvision uses ``image_size // feature_size`` per axis.
        sizes: per level, a sequence of anchor sizes (the side of the ratio-1 anchor); a flat
            sequence means one size per level, as in torchvision.
        aspect_ratios: per level, a sequence of ratios; a flat sequence is used for every
            level.
        dtype: floating dtype of the anchors.
        device: device of the anchors (default: the CPU).
        cache: return the cached anchors for these arguments when there are some (and cache
            the result otherwise). The cache keeps the 16 most recently used anchor tensors.

    Returns:
        ``Tensor[sum over levels of H * W * len(sizes) * len(ratios), 4]`` boxes
        ``(x1, y1, x2, y2)``. A cached tensor is shared between callers: do not modify it in
        place (clone it first, or pass ``cache=False``).

    On CUDA the call never waits for the GPU: on a cache miss the sizes and ratios (and, in
    the kernel, the level table) are copied from pinned memory without waiting. Sizes or
    ratios given as CUDA tensors are read on the host first, which does wait.
    """
    feature_sizes = _pairs(feature_sizes, "feature_sizes", None, allow_int=False, positive=False)
    levels = len(feature_sizes)
    strides = _pairs(strides, "strides", levels, allow_int=True, positive=False)
    sizes = _per_level_sizes(sizes, levels)
    ratios = _per_level_ratios(aspect_ratios, levels)
    if not isinstance(dtype, torch.dtype) or dtype not in V.FLOAT_DTYPES:
        raise TypeError(
            f"dtype must be a floating dtype (float16, bfloat16, float32 or float64), got {dtype!r}"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    # No cache while compiling: the anchors become part of the traced graph instead.
    use_cache = V.boolean(cache, "cache") and not torch.compiler.is_compiling()
    if use_cache:
        # Inference-mode tensors cannot be used by autograd code later: cached apart.
        key = (
            feature_sizes,
            strides,
            sizes,
            ratios,
            dtype,
            device,
            torch.is_inference_mode_enabled(),
        )
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    values = [s for level in sizes for s in level] + [r for level in ratios for r in level]
    if device.type == "cuda" and not torch.compiler.is_compiling():
        # One copy from pinned memory that the host does not wait for (a tensor made from host
        # data on the device directly is a copy from pageable memory, which blocks the host).
        table = torch.tensor(values, dtype=torch.float32).pin_memory().to(device, non_blocking=True)
    else:
        table = torch.tensor(values, dtype=torch.float32, device=device)
    n_sizes = sum(len(level) for level in sizes)
    flat_sizes, flat_ratios = table[:n_sizes], table[n_sizes:]
    anchors = torch.ops.maskops.generate_anchors(
        flat_sizes,
        flat_ratios,
        [len(s) for s in sizes],
        [len(r) for r in ratios],
        [x for hw in feature_sizes for x in hw],
        [x for st in strides for x in st],
        dtype,
    )
    if use_cache:
        _CACHE[key] = anchors
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return anchors


class AnchorGenerator(nn.Module):
    """Drop-in for ``torchvision.models.detection.anchor_utils.AnchorGenerator``.

    Same constructor, attributes (``sizes``, ``aspect_ratios``, ``cell_anchors``) and methods
    (``num_anchors_per_location``, ``generate_anchors``, ``grid_anchors``, ``forward``), and
    the same anchors bit for bit, from one kernel launch for all levels, cached per image
    size, feature sizes, dtype and device.

    Args:
        sizes: per feature map, a sequence of anchor sizes (a flat sequence: one per map).
        aspect_ratios: per feature map, a sequence of aspect ratios (height / width); a flat
            sequence is used for every map.
    """

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)):
        super().__init__()
        if not isinstance(sizes, (list, tuple)) or not sizes:
            # torchvision indexes sizes[0]: IndexError.
            raise V.error(
                ValueError, f"sizes must be a non-empty sequence, got {sizes!r}", IndexError
            )
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios, (list, tuple)) or not aspect_ratios:
            raise ValueError(f"aspect_ratios must be a non-empty sequence, got {aspect_ratios!r}")
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(aspect_ratios) != len(sizes):
            raise ValueError(
                f"sizes and aspect_ratios must have one entry per feature map, got "
                f"{len(sizes)} and {len(aspect_ratios)}"
            )
        # Checked here so that a bad value fails at construction, not at the first forward.
        _per_level_sizes(sizes)
        _per_level_ratios(aspect_ratios, len(sizes))
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [self.generate_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]

    def generate_anchors(
        self,
        scales,
        aspect_ratios,
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        """The zero-centred cell anchors ``Tensor[len(ratios) * len(scales), 4]`` of one level."""
        return generate_anchors(
            [(1, 1)], [0], [scales], [aspect_ratios], dtype=dtype, device=device, cache=False
        )

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        """Moves ``cell_anchors`` (torchvision's method). To a GPU, the host does not wait:
        each is copied from pinned memory."""
        device = torch.device(device)
        moved = []
        for a in self.cell_anchors:
            a = a.to(dtype=dtype)
            if device.type == "cuda" and a.device.type == "cpu":
                a = a.pin_memory().to(device, non_blocking=True)
            moved.append(a.to(device))
        self.cell_anchors = moved

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes, strides) -> List[Tensor]:
        """Per level, the anchors of a ``(H, W)`` grid with stride ``(sh, sw)`` (ints or 0-d
        tensors), in the dtype and on the device of ``cell_anchors``."""
        grid_sizes = _pairs(
            [tuple(g) for g in grid_sizes],
            "grid_sizes",
            len(self.sizes),
            allow_int=False,
            positive=False,
        )
        anchors = generate_anchors(
            grid_sizes,
            strides,
            self.sizes,
            self.aspect_ratios,
            dtype=self.cell_anchors[0].dtype,
            device=self.cell_anchors[0].device,
        )
        counts = [h * w * n for (h, w), n in zip(grid_sizes, self.num_anchors_per_location())]
        return list(anchors.split(counts))

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        """Anchors for each image of ``image_list`` (an ``ImageList``).

        Returns:
            One ``Tensor[A, 4]`` per image, ``(x1, y1, x2, y2)`` in the dtype and on the device
            of ``feature_maps[0]``; the anchors of all levels, concatenated. Every image gets
            the same (cached) tensor: do not modify it in place. Never waits for the GPU
            (see :func:`generate_anchors`).
        """
        if not isinstance(feature_maps, (list, tuple)) or not feature_maps:
            raise V.error(
                ValueError,
                "feature_maps must be a non-empty list of Tensor[N, C, H, W]",
                AssertionError,
            )
        if len(feature_maps) != len(self.sizes):
            # torchvision: AssertionError (its check of grid sizes against cell anchors).
            raise V.error(
                ValueError,
                f"feature_maps must have one map per anchor level "
                f"({len(self.sizes)} sizes / aspect ratios), got {len(feature_maps)}",
                AssertionError,
            )
        for i, f in enumerate(feature_maps):
            V.tensor(f, f"feature_maps[{i}]")
            if f.dim() < 2:
                raise V.error(
                    ValueError,
                    f"feature_maps[{i}] must be a [N, C, H, W] tensor, got shape {tuple(f.shape)}",
                    IndexError,
                )
        image_size = image_list.tensors.shape[-2:]
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        for i, (h, w) in enumerate(grid_sizes):
            if h == 0 or w == 0:
                raise V.error(
                    ValueError,
                    f"feature_maps[{i}] has an empty grid {(h, w)}: its "
                    "stride (image size // feature size) is undefined",
                    ZeroDivisionError,
                )
        strides = [(image_size[0] // h, image_size[1] // w) for h, w in grid_sizes]
        V.floating(feature_maps[0], "feature_maps[0]")  # its dtype is the anchors' dtype
        dtype = feature_maps[0].dtype
        anchors = generate_anchors(
            grid_sizes,
            strides,
            self.sizes,
            self.aspect_ratios,
            dtype=dtype,
            device=feature_maps[0].device,
        )
        return [anchors for _ in range(len(image_list.image_sizes))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sizes={self.sizes}, aspect_ratios={self.aspect_ratios})"


@torch.library.register_fake("maskops::generate_anchors")
def _generate_anchors_fake(
    sizes, aspect_ratios, sizes_per_level, ratios_per_level, grid_sizes, strides, dtype
):
    total = 0
    for l, (s, r) in enumerate(zip(sizes_per_level, ratios_per_level)):
        total = total + grid_sizes[2 * l] * grid_sizes[2 * l + 1] * s * r
    return sizes.new_empty((total, 4), dtype=dtype)
