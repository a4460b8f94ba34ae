"""A thin Mask R-CNN on maskops' ops: the model, its data, training engine and evaluation, as a
library (not installed; the command-line tools are in ``tools/``: ``python -m tools.<tool>``)."""

from .build import build_mask_rcnn, build_model, load_weights
from .categories import COCO_CATEGORIES, category_name
from .config import ModelConfig
from .mask_rcnn import STAGES, MaskRCNN

__all__ = [
    "MaskRCNN",
    "ModelConfig",
    "build_model",
    "build_mask_rcnn",
    "load_weights",
    "COCO_CATEGORIES",
    "category_name",
    "STAGES",
]
