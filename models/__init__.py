"""A thin Mask R-CNN on maskops' ops (not installed; run as ``python -m models.<cli>``)."""
from .coco import COCO_CATEGORIES, category_name
from .mask_rcnn import STAGES, MaskRCNN, build_mask_rcnn, load_weights

__all__ = ["MaskRCNN", "build_mask_rcnn", "load_weights", "COCO_CATEGORIES", "category_name",
           "STAGES"]
