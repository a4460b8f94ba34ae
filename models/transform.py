"""Image preparation before the backbone, and mapping of results back to the input images."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageBatch:
    """Images resized and padded into one tensor.

    Attributes:
        tensors: ``Tensor[N, 3, H, W]``, ``H`` and ``W`` multiples of ``size_divisible``.
        image_sizes: ``(height, width)`` of each resized image before padding.
    """

    def __init__(self, tensors: Tensor, image_sizes: List[Tuple[int, int]]) -> None:
        self.tensors = tensors
        self.image_sizes = image_sizes

    def __repr__(self) -> str:
        return f"ImageBatch(tensors={tuple(self.tensors.shape)}, image_sizes={self.image_sizes})"


def resize_boxes(boxes: Tensor, old_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """Scales ``Tensor[N, 4]`` boxes from an image of ``old_size`` (h, w) to ``new_size``."""
    # The ratios are float32 quotients, as torchvision computes them, so that boxes match
    # torchvision's to the last bit.
    ratio_h = torch.tensor(
        float(new_size[0]), dtype=torch.float32, device=boxes.device
    ) / torch.tensor(float(old_size[0]), dtype=torch.float32, device=boxes.device)
    ratio_w = torch.tensor(
        float(new_size[1]), dtype=torch.float32, device=boxes.device
    ) / torch.tensor(float(old_size[1]), dtype=torch.float32, device=boxes.device)
    scale = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))
    return boxes * scale


class ImageTransform(nn.Module):
    """Normalises, resizes and batches images; maps detections back to the input images.

    Each image is resized so that its short side is ``min_size`` unless its long side would
    then exceed ``max_size`` (then the long side is ``max_size``), bilinearly, keeping the
    aspect ratio. Images are then zero-padded to a common size, a multiple of
    ``size_divisible``, bottom and right.

    Args:
        min_size: short-side target; with several values, training picks one at random per
            image (multi-scale training) and inference uses the last.
        max_size: cap on the long side.
        image_mean, image_std: per-channel normalisation of the ``[0, 1]`` input.
        size_divisible: the padded size's divisor (32: the coarsest backbone stride).
        channels_last: batch into a channels-last tensor (what a channels-last backbone reads).
        dtype: the batch's dtype (default: the images'); images are normalised and resized
            in their own precision first.
    """

    def __init__(
        self,
        min_size=800,
        max_size: int = 1333,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
        channels_last: bool = False,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        self.max_size = max_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.size_divisible = size_divisible
        self.channels_last = channels_last
        self.dtype = dtype

    def forward(
        self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Tuple[ImageBatch, Optional[List[Dict[str, Tensor]]]]:
        """Prepares a batch.

        Args:
            images: ``N`` float ``Tensor[3, H_i, W_i]`` in ``[0, 1]``; sizes may differ.
            targets: training only: per image ``boxes: Tensor[K, 4]`` (input pixels),
                ``labels: Tensor[K]``, ``masks: Tensor[K, H_i, W_i]`` (uint8/bool).

        Returns:
            The :class:`ImageBatch` and the targets rescaled to it (new dicts; the caller's
            are not modified).
        """
        resized = []
        new_targets = [] if targets is not None else None
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError(
                    f"images[{i}] must be a [C, H, W] tensor, got shape {tuple(image.shape)}"
                )
            if not image.is_floating_point():
                raise TypeError(
                    f"images[{i}] must be a floating tensor in [0, 1], got {image.dtype}"
                )
            image = self.normalize(image)
            target = dict(targets[i]) if targets is not None else None
            image, target = self.resize(image, target)
            resized.append(image)
            if new_targets is not None:
                new_targets.append(target)
        image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in resized]
        return ImageBatch(self.batch(resized), image_sizes), new_targets

    def normalize(self, image: Tensor) -> Tensor:
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def _pick_min_size(self) -> int:
        if not self.training:
            return self.min_size[-1]
        # One uniform draw from torch's RNG (not Python's), the same draw torchvision makes,
        # so that a seeded run samples the same scales and proposals as torchvision.
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(
        self, image: Tensor, target: Optional[Dict[str, Tensor]] = None
    ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        """Resizes one ``Tensor[C, H, W]`` image (and its target's boxes and masks)."""
        h, w = image.shape[-2:]
        min_size = self._pick_min_size()
        scale = min(min_size / min(h, w), self.max_size / max(h, w))
        # recompute_scale_factor: the output size is floor(side * scale), and the sampling
        # grid follows that size, as in torchvision.
        image = F.interpolate(
            image[None],
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        if target is None:
            return image, None
        target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
        if "masks" in target:
            masks = target["masks"][:, None].float()
            masks = F.interpolate(masks, scale_factor=scale, recompute_scale_factor=True)
            target["masks"] = masks[:, 0].byte()
        return image, target

    def batch(self, images: List[Tensor]) -> Tensor:
        """Zero-pads images into one ``Tensor[N, C, H, W]`` (``H, W`` multiples of
        ``size_divisible``)."""
        d = self.size_divisible
        c = images[0].shape[0]
        h = int(math.ceil(max(im.shape[1] for im in images) / d) * d)
        w = int(math.ceil(max(im.shape[2] for im in images) / d) * d)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        dtype = self.dtype or images[0].dtype
        if len(images) == 1 and images[0].shape[1:] == (h, w):  # nothing to pad
            return images[0][None].to(dtype).contiguous(memory_format=fmt)
        out = torch.empty(
            (len(images), c, h, w), dtype=dtype, device=images[0].device, memory_format=fmt
        ).zero_()
        for i, im in enumerate(images):
            out[i, :, : im.shape[1], : im.shape[2]].copy_(im)
        return out

    def postprocess(
        self,
        detections: List[Dict[str, Tensor]],
        image_sizes: List[Tuple[int, int]],
        original_sizes: List[Tuple[int, int]],
        mask_threshold: Optional[float] = 0.5,
    ) -> List[Dict[str, Tensor]]:
        """Maps detections from the resized images back to the input images.

        Boxes are rescaled; ``masks`` (``Tensor[K, 1, 28, 28]`` probabilities) are pasted
        into full-size ``Tensor[K, 1, H, W]`` masks: ``bool`` (``probability >=
        mask_threshold``), or probabilities with ``mask_threshold=None``.
        """
        for det, size, orig in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, orig)
            if "masks" in det:
                det["masks"] = ops.paste_masks(
                    det["masks"], det["boxes"], orig, threshold=mask_threshold
                )
        return detections

    def extra_repr(self) -> str:
        return (
            f"min_size={self.min_size}, max_size={self.max_size}, "
            f"mean={self.image_mean}, std={self.image_std}, "
            f"size_divisible={self.size_divisible}, channels_last={self.channels_last}, "
            f"dtype={self.dtype}"
        )
