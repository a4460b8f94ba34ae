"""Evaluation: COCO box and mask AP (``coco_eval``), the agreement of two detectors' outputs
(``agreement``), and the evaluation of a saved model on a dataset split (``run``)."""

from .agreement import DetectionDiff, compare_detections
from .coco_eval import (
    STAT_NAMES,
    EvalResult,
    coco_evaluate,
    detections_to_coco,
    evaluate,
    nan_to_zero,
    predict,
)

__all__ = [
    "EvalResult",
    "coco_evaluate",
    "detections_to_coco",
    "evaluate",
    "predict",
    "STAT_NAMES",
    "nan_to_zero",
    "compare_detections",
    "DetectionDiff",
]
