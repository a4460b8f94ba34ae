"""RoIAlign: bilinear pooling of box regions into fixed-size feature maps.

Same semantics as ``torchvision.ops.roi_align`` (Mask R-CNN, He et al. 2017). The kernels
are in csrc/roi_align/; the coordinate convention is explained once, in roi_align.h.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import torch
from torch import Tensor, nn

from . import _validate as V

BoxesType = Union[Tensor, List[Tensor], Tuple[Tensor, ...]]


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
        sampling_ratio: sample points per bin along each axis; ``<= 0`` picks
            ``ceil(box size / output size)`` per box (adaptive; capped at 1024).
        aligned: shift boxes by -0.5 feature cells so that sampling is pixel-centred
            (the Detectron2 convention). ``False`` reproduces the original Mask R-CNN.

    Returns:
        ``Tensor[K, C, output_height, output_width]`` in ``input``'s dtype and layout.

    Boxes with a NaN coordinate pool to zeros. On CPU a batch index outside ``[0, N)``
    raises ``ValueError``; on CUDA such a box pools to zeros (checking would wait for the GPU).
    Differentiable with respect to ``input`` (the backward is deterministic on CPU, and on
    CUDA under ``torch.use_deterministic_algorithms(True)``).
    """
    V.floating(input, "input")
    V.ndim(input, 4, "input", "[N, C, H, W]")
    rois = V.boxes_to_rois(boxes, input)
    pooled_h, pooled_w = V.pair(output_size, "output_size")
    spatial_scale = V.positive_float(spatial_scale, "spatial_scale")
    sampling_ratio = V.integer(sampling_ratio, "sampling_ratio")
    aligned = V.boolean(aligned, "aligned")
    V.batch_indices(rois, input.size(0))
    return torch.ops.maskops.roi_align(input, rois, spatial_scale, pooled_h, pooled_w,
                                       sampling_ratio, aligned)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (same constructor as ``torchvision.ops.RoIAlign``)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False) -> None:
        super().__init__()
        self.output_size = V.pair(output_size, "output_size")
        self.spatial_scale = V.positive_float(spatial_scale, "spatial_scale")
        self.sampling_ratio = V.integer(sampling_ratio, "sampling_ratio")
        self.aligned = V.boolean(aligned, "aligned")

    def forward(self, input: Tensor, rois: BoxesType) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, "
                f"spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned})")


# ---- fake kernels (shapes, dtypes and layouts for torch.compile / export) ----

@torch.library.register_fake("maskops::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio,
                    aligned):
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
    return torch.empty((rois.size(0), input.size(1), pooled_height, pooled_width),
                       dtype=input.dtype, device=input.device,
                       memory_format=V.memory_format(input))


@torch.library.register_fake("maskops::_roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width,
                             batch_size, channels, height, width, sampling_ratio, aligned):
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype,
                       device=grad.device, memory_format=V.memory_format(grad))


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
        grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w, sampling_ratio,
        aligned)
    # The gradient takes the input's layout, whatever layout autograd handed us.
    grad_input = grad_input.contiguous(memory_format=ctx.input_format)
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("maskops::roi_align", _backward, setup_context=_setup_context)
