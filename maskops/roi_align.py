"""RoIAlign: bilinear pooling of box regions into fixed-size feature maps.

Same semantics as ``torchvision.ops.roi_align`` (Mask R-CNN, He et al. 2017). The kernels
are in csrc/roi_align/; the coordinate convention is explained once, in roi_align.h.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _validate as V
from ._fx import leaf

BoxesType = Union[Tensor, List[Tensor], Tuple[Tensor, ...]]


@leaf
def roi_align(
    input: Tensor,
    boxes: BoxesType,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Pools each box of ``input`` into an ``output_size`` grid by bilinear sampling.

    Args:
        input: ``Tensor[N, C, H, W]`` features, float16/bfloat16/float32/float64, contiguous
            or channels_last (the output keeps the layout). Half types compute in float32.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of N
            per-image ``Tensor[L, 4]`` rows ``(x1, y1, x2, y2)``; input-image pixels, any
            floating dtype (read in float32, or float64 for float64 input).
        output_size: ``int`` or ``(height, width)`` of the pooled output.
        spatial_scale: feature size / image size (e.g. 1/16 for stride-16 features).
        sampling_ratio: sample points per bin along each axis, at most 1024; ``<= 0``
            picks ``ceil(box size / output size)`` per box (adaptive; capped at 1024).
        aligned: shift boxes by -0.5 feature cells so that sampling is pixel-centred
            (the Detectron2 convention). ``False`` reproduces the original Mask R-CNN.

    Returns:
        ``Tensor[K, C, output_height, output_width]`` in ``input``'s dtype and layout.

    Boxes with a NaN coordinate pool to zeros. On CPU a batch index outside ``[0, N)``
    raises ``ValueError``; on CUDA such a box pools to zeros (checking would wait for the GPU).
    Differentiable with respect to ``input`` (the backward is deterministic on CPU, and on
    CUDA under ``torch.use_deterministic_algorithms(True)``). On CUDA neither the call nor
    its backward ever waits for the GPU. A leaf of ``torch.fx`` tracing.

    Bad arguments raise ``TypeError`` / ``ValueError`` that are also instances of the class
    torchvision raises for the same mistake (e.g. ``AssertionError`` for ``Tensor[K, 4]``
    boxes, ``RuntimeError`` for an integer input).
    """
    # torchvision 0.26 meets both mistakes in its operator (RuntimeError) or indexing
    # (IndexError); 0.29 in Python (AttributeError, RuntimeError).
    V.floating(input, "input", tensor_tv=(AttributeError, RuntimeError))
    V.ndim(input, 4, "input", "[N, C, H, W]", tv=(IndexError, RuntimeError))
    rois = V.boxes_to_rois(boxes, input)
    pooled_h, pooled_w = V.pair(output_size, "output_size")
    spatial_scale = V.positive_float(spatial_scale, "spatial_scale")
    sampling_ratio = V.sampling_ratio(sampling_ratio)
    aligned = V.boolean(aligned, "aligned")
    V.batch_indices(rois, input.size(0))
    return torch.ops.maskops.roi_align(
        input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned
    )


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (same constructor as ``torchvision.ops.RoIAlign``).

    The arguments are checked here, at construction (torchvision checks them at the first
    call); ``torch.fx.symbolic_trace`` records the pooling as one :func:`roi_align` call."""

    def __init__(
        self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False
    ) -> None:
        super().__init__()
        self.output_size = V.pair(output_size, "output_size")
        self.spatial_scale = V.positive_float(spatial_scale, "spatial_scale")
        self.sampling_ratio = V.sampling_ratio(sampling_ratio)
        self.aligned = V.boolean(aligned, "aligned")

    def forward(self, input: Tensor, rois: BoxesType) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, "
            f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
            f"aligned={self.aligned})"
        )


# ---- fake kernels (shapes, dtypes and layouts for torch.compile / export) ----


@torch.library.register_fake("maskops::roi_align")
def _roi_align_fake(
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
):
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
    return torch.empty(
        (rois.size(0), input.size(1), pooled_height, pooled_width),
        dtype=input.dtype,
        device=input.device,
        memory_format=V.memory_format(input),
    )


@torch.library.register_fake("maskops::_roi_align_backward")
def _roi_align_backward_fake(
    grad,
    rois,
    spatial_scale,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    height,
    width,
    sampling_ratio,
    aligned,
):
    return torch.empty(
        (batch_size, channels, height, width),
        dtype=grad.dtype,
        device=grad.device,
        memory_format=V.memory_format(grad),
    )


# ---- autograd ----


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = tuple(input.shape)
    ctx.input_format = V.memory_format(input)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    n, c, h, w = ctx.input_shape
    grad_input = torch.ops.maskops._roi_align_backward(
        grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w, sampling_ratio, aligned
    )
    # The gradient takes the input's layout, whatever layout autograd handed us.
    grad_input = grad_input.contiguous(memory_format=ctx.input_format)
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("maskops::roi_align", _backward, setup_context=_setup_context)


# ---- multi-level (FPN) RoIAlign ----


def _pyramid_levels(spatial_scales, n_levels: int) -> int:
    """Validates per-level scales; returns k_min, the pyramid level of features[0].

    Several levels must be consecutive halvings (scales 2**-k_min, 2**-(k_min+1), ...), the
    FPN layout the level mapping assumes.
    """
    if not isinstance(spatial_scales, (list, tuple)) or len(spatial_scales) != n_levels:
        raise ValueError(
            f"spatial_scales must be a list with one scale per level ({n_levels}), "
            f"got {spatial_scales!r}"
        )
    scales = [V.positive_float(s, f"spatial_scales[{i}]") for i, s in enumerate(spatial_scales)]
    if n_levels == 1:
        return 0
    ks = [-math.log2(s) for s in scales]
    for i, k in enumerate(ks):
        if abs(k - round(k)) > 1e-6 or (i and round(k) != round(ks[i - 1]) + 1):
            raise ValueError(
                "spatial_scales of several levels must be consecutive powers of two "
                f"halving each level (e.g. [1/4, 1/8, 1/16, 1/32]), got {scales}"
            )
    return int(round(ks[0]))


@leaf
def multiscale_roi_align(
    features: List[Tensor],
    boxes: BoxesType,
    output_size: Union[int, Tuple[int, int]],
    spatial_scales: List[float],
    sampling_ratio: int = -1,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign over a feature pyramid: each box is pooled from the level that suits its size.

    A box of area A reads level ``floor(canonical_level + log2(sqrt(A) / canonical_scale) +
    1e-6)``, clamped to the levels given (the FPN paper's rule, as in torchvision's
    ``MultiScaleRoIAlign``, computed in the boxes' dtype); boxes with negative area belong to
    no level and pool to zeros, as in torchvision. All boxes are pooled in one pass.

    Args:
        features: ``L`` tensors ``[N, C, H_l, W_l]`` (1 <= L <= 8), same dtype, device, N and C;
            ``features[i]`` is pyramid level ``k_min + i``.
        boxes: ``Tensor[K, 5]`` ``(batch_index, x1, y1, x2, y2)`` or a list of ``Tensor[L_i, 4]``.
        output_size: ``int`` or ``(height, width)``.
        spatial_scales: one scale per level, consecutive halvings (e.g. ``[1/4, 1/8, 1/16, 1/32]``).
        sampling_ratio, aligned: as in :func:`roi_align` (torchvision's module uses
            ``aligned=False``).
        canonical_scale, canonical_level: the box size that maps to ``canonical_level``.

    Returns:
        ``Tensor[K, C, output_height, output_width]`` in the features' dtype, in the layout of
        ``features[0]``. Differentiable with respect to every level. On CUDA neither the call
        nor its backward ever waits for the GPU (batch indices are not checked there, as in
        :func:`roi_align`). A leaf of ``torch.fx`` tracing.
    """
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError(
            f"features must be a non-empty list of Tensor[N, C, H, W], got {V._describe(features)}"
        )
    if len(features) > 8:
        raise ValueError(f"features may hold at most 8 levels, got {len(features)}")
    ref = V.ndim(
        V.floating(features[0], "features[0]"),
        4,
        "features[0]",
        "[N, C, H, W]",
        tv=(IndexError, RuntimeError),
    )
    for i, f in enumerate(features[1:], 1):
        V.ndim(
            V.floating(f, f"features[{i}]"),
            4,
            f"features[{i}]",
            "[N, C, H, W]",
            tv=(IndexError, RuntimeError),
        )
        if f.dtype != ref.dtype or f.shape[:2] != ref.shape[:2]:
            # torchvision: RuntimeError from its kernel on a dtype mismatch.
            raise V.error(
                ValueError,
                f"features[{i}] must have the dtype, batch size and "
                f"channels of features[0] ({ref.dtype}, {tuple(ref.shape[:2])}), got "
                f"{f.dtype}, {tuple(f.shape[:2])}",
                RuntimeError,
            )
        V.same_device(f, ref, f"features[{i}]", "features[0]")
    rois = V.boxes_to_rois(boxes, ref, multiscale=True)
    pooled_h, pooled_w = V.pair(output_size, "output_size")
    k_min = _pyramid_levels(spatial_scales, len(features))
    sampling_ratio = V.sampling_ratio(sampling_ratio)
    canonical_scale = V.positive_float(canonical_scale, "canonical_scale", tv=None)
    if isinstance(canonical_level, bool) or not isinstance(canonical_level, numbers.Real):
        raise TypeError(f"canonical_level must be a number, got {V._describe(canonical_level)}")
    aligned = V.boolean(aligned, "aligned")
    V.batch_indices(rois, ref.size(0))
    return torch.ops.maskops.multiscale_roi_align(
        list(features),
        rois,
        [float(s) for s in spatial_scales],
        pooled_h,
        pooled_w,
        sampling_ratio,
        aligned,
        canonical_scale,
        float(canonical_level),
        k_min,
    )


@leaf
def _select_features(x: Dict[str, Tensor], featmap_names: List[str]) -> List[Tensor]:
    """The maps of ``x`` named in ``featmap_names``, in ``x``'s order (a leaf of fx tracing)."""
    if not isinstance(x, dict):
        # torchvision calls x.items(): AttributeError.
        raise V.error(
            TypeError, f"x must be a dict of feature maps, got {V._describe(x)}", AttributeError
        )
    features = [v for k, v in x.items() if k in featmap_names]
    if not features:
        # torchvision indexes the empty list: IndexError.
        raise V.error(
            ValueError,
            f"x has none of the feature maps {featmap_names}; keys: {list(x.keys())}",
            IndexError,
        )
    return features


@leaf
def _infer_scales(features: List[Tensor], image_shapes: List[Tuple[int, int]]) -> List[float]:
    """Per level, the scale feature size / image size (a leaf of fx tracing: it reads sizes)."""
    if not image_shapes:
        raise ValueError("image_shapes must list the (height, width) of every image")
    original = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
    return [_infer_scale(f, original) for f in features]


def _infer_scale(feature: Tensor, original_size: Tuple[int, int]) -> float:
    # The nearest power of two to feature size / image size, as torchvision rounds it (its
    # float32 log2 and this float64 one round alike: a ratio never sits halfway between
    # powers of two). Plain Python math so that under torch.compile(dynamic=True) the sizes
    # stay symbolic and the scale becomes a guard rather than a data-dependent value.
    approx = feature.shape[-2] / original_size[0]
    return 2.0 ** round(math.log2(approx))


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign`` (same constructor and ``forward``).

    Args:
        featmap_names: the keys of the feature dict to pool from (in the dict's order).
        output_size: ``int`` or ``(height, width)``.
        sampling_ratio: as in :func:`roi_align`.
        canonical_scale, canonical_level: see :func:`multiscale_roi_align`.
        aligned: maskops extra; ``False`` (torchvision's behaviour) by default.

    Under ``torch.fx.symbolic_trace`` the forward is three leaves, as in torchvision: the
    choice of feature maps, the scale inference (from the feature and image sizes) and the
    pooling; the traced graph infers the scales on every call, as the module does.
    """

    def __init__(
        self,
        featmap_names: List[str],
        output_size,
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(featmap_names, str):
            featmap_names = [featmap_names]
        self.featmap_names = list(featmap_names)
        self.output_size = V.pair(output_size, "output_size")
        self.sampling_ratio = V.sampling_ratio(sampling_ratio)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = V.boolean(aligned, "aligned")
        self.scales: Optional[List[float]] = None

    def forward(
        self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]
    ) -> Tensor:
        """Pools ``boxes`` (per image ``Tensor[L_i, 4]``) from ``x``; ``image_shapes`` are the
        (height, width) of the images the boxes refer to (before batching/padding)."""
        features = _select_features(x, self.featmap_names)
        scales = _infer_scales(features, image_shapes)
        if not isinstance(scales, torch.fx.Proxy):  # (while fx traces, a Proxy: not kept)
            self.scales = scales
        return multiscale_roi_align(
            features,
            boxes,
            self.output_size,
            scales,
            self.sampling_ratio,
            self.canonical_scale,
            self.canonical_level,
            self.aligned,
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})"
        )


@torch.library.register_fake("maskops::multiscale_roi_align")
def _multiscale_fake(
    features,
    rois,
    spatial_scales,
    pooled_height,
    pooled_width,
    sampling_ratio,
    aligned,
    canonical_scale,
    canonical_level,
    k_min,
):
    ref = features[0]
    return torch.empty(
        (rois.size(0), ref.size(1), pooled_height, pooled_width),
        dtype=ref.dtype,
        device=ref.device,
        memory_format=V.memory_format(ref),
    )


@torch.library.register_fake("maskops::_multiscale_roi_align_backward")
def _multiscale_backward_fake(
    grad,
    rois,
    spatial_scales,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    heights,
    widths,
    sampling_ratio,
    aligned,
    canonical_scale,
    canonical_level,
    k_min,
):
    fmt = V.memory_format(grad)
    return [
        torch.empty(
            (batch_size, channels, h, w), dtype=grad.dtype, device=grad.device, memory_format=fmt
        )
        for h, w in zip(heights, widths)
    ]


def _multiscale_setup_context(ctx, inputs, output):
    (
        features,
        rois,
        spatial_scales,
        pooled_height,
        pooled_width,
        sampling_ratio,
        aligned,
        canonical_scale,
        canonical_level,
        k_min,
    ) = inputs
    ctx.save_for_backward(rois)
    ctx.sizes = (
        features[0].shape[0],
        features[0].shape[1],
        [f.shape[2] for f in features],
        [f.shape[3] for f in features],
    )
    ctx.formats = [V.memory_format(f) for f in features]
    ctx.params = (
        spatial_scales,
        pooled_height,
        pooled_width,
        sampling_ratio,
        aligned,
        canonical_scale,
        canonical_level,
        k_min,
    )


def _multiscale_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    (
        spatial_scales,
        pooled_height,
        pooled_width,
        sampling_ratio,
        aligned,
        canonical_scale,
        canonical_level,
        k_min,
    ) = ctx.params
    n, c, heights, widths = ctx.sizes
    grads = torch.ops.maskops._multiscale_roi_align_backward(
        grad,
        rois,
        spatial_scales,
        pooled_height,
        pooled_width,
        n,
        c,
        heights,
        widths,
        sampling_ratio,
        aligned,
        canonical_scale,
        canonical_level,
        k_min,
    )
    grads = [g.contiguous(memory_format=f) for g, f in zip(grads, ctx.formats)]
    return grads, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "maskops::multiscale_roi_align", _multiscale_backward, setup_context=_multiscale_setup_context
)
