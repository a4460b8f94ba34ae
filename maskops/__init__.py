"""maskops: fast, dependable C++/CUDA ops for Mask R-CNN.

>>> import torch, maskops
>>> feats = torch.randn(2, 256, 50, 50)
>>> boxes = torch.tensor([[0, 10.0, 10.0, 200.0, 300.0]])
>>> maskops.roi_align(feats, boxes, 7, spatial_scale=1 / 16, sampling_ratio=2).shape
torch.Size([1, 256, 7, 7])
"""

import torch

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.maskops operators)
except ImportError as e:  # pragma: no cover - only when the extension was not built
    raise ImportError(
        "maskops' compiled extension (maskops._C) is missing or does not match this torch "
        f"({torch.__version__}): rebuild with `pip install --no-build-isolation .` "
        f"or `make build`. Original error: {e}"
    ) from e

from .anchors import AnchorGenerator, clear_anchor_cache, generate_anchors
from .boxes import BoxCoder, clip_boxes, decode_boxes, encode_boxes, remove_small_boxes
from .memory import cpu_cache_for_torch, cpu_cache_info, empty_cache, set_cpu_cache_limit
from .nms import batched_nms, box_area, box_iou, nms
from .paste_masks import masks_to_rle, paste_masks, paste_masks_in_image
from .patch import is_patched, patch_torchvision, torchvision_patched, unpatch_torchvision
from .roi_align import MultiScaleRoIAlign, RoIAlign, multiscale_roi_align, roi_align
from .rpn import rpn_proposals

__version__ = "0.1.0"

__all__ = [
    "roi_align",
    "RoIAlign",
    "multiscale_roi_align",
    "MultiScaleRoIAlign",
    "nms",
    "batched_nms",
    "box_iou",
    "box_area",
    "paste_masks",
    "paste_masks_in_image",
    "masks_to_rle",
    "patch_torchvision",
    "unpatch_torchvision",
    "torchvision_patched",
    "is_patched",
    "generate_anchors",
    "AnchorGenerator",
    "clear_anchor_cache",
    "encode_boxes",
    "decode_boxes",
    "BoxCoder",
    "clip_boxes",
    "remove_small_boxes",
    "rpn_proposals",
    "empty_cache",
    "cpu_cache_info",
    "set_cpu_cache_limit",
    "cpu_cache_for_torch",
    "has_cuda",
    "build_info",
    "__version__",
]


def has_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("maskops::roi_align", "CUDA")


def build_info() -> dict:
    """What this build was made with (torch, CUDA, arch list) and what it runs with now
    (torch, its CUDA, the visible GPUs and their compute capability)."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:  # pragma: no cover
        BUILD_INFO = {}
    info = dict(BUILD_INFO)
    info["has_cuda_kernels"] = has_cuda()
    info["runtime_torch"] = torch.__version__
    info["runtime_cuda"] = torch.version.cuda  # the CUDA this torch was built with
    info["cuda_available"] = torch.cuda.is_available()
    # The visible GPUs and their compute capability ("8.6"), to hold against cuda_arch_list.
    info["gpus"] = (
        [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "capability": "%d.%d" % torch.cuda.get_device_capability(i),
            }
            for i in range(torch.cuda.device_count())
        ]
        if info["cuda_available"]
        else []
    )
    return info


def __getattr__(name: str):
    # Submodules whose dependencies are optional or heavy load on first access (PEP 562), so
    # that `import maskops` stays cheap: `maskops.onnx` imports onnxscript.
    if name == "onnx":
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
