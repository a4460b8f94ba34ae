"""COCO box and mask AP of a model's detections, with pycocotools' ``COCOeval``.

Masks are scored as COCO run-length encodings: probabilities are pasted into the image and
thresholded at 0.5 by ``maskops.paste_masks`` (the model already returns them that way by
default) and encoded by ``maskops.masks_to_rle``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

import maskops

from ..engine import distributed as dist_utils
from ..engine.report import Report

# COCOeval.stats order.
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
IOU_TYPES = ("bbox", "segm")


@dataclass
class EvalResult:
    """COCO metrics of one evaluation.

    Attributes:
        stats: ``{"bbox": {"AP": ..., "AP50": ...}, "segm": {...}}``, fractions in [0, 1].
            A metric with no ground truth to score against (COCOeval's -1) is ``nan``.
        per_class: ``{"bbox": {category name: AP}, "segm": {...}}``.
        summary: COCOeval's printed summary.
        num_images, num_detections: what was scored.
        seconds: wall-clock time of the evaluation (prediction included).
    """

    stats: Dict[str, Dict[str, float]] = field(default_factory=dict)
    per_class: Dict[str, Dict[str, float]] = field(default_factory=dict)
    summary: str = ""
    num_images: int = 0
    num_detections: int = 0
    seconds: float = 0.0

    def get(self, iou_type: str, name: str = "AP") -> float:
        return self.stats.get(iou_type, {}).get(name, float("nan"))

    def per_class_table(self) -> str:
        """A markdown table: one row per category, box and mask AP (percent)."""
        names = list(next(iter(self.per_class.values()), {}).keys())
        lines = ["| category | box AP | mask AP |", "|---|---:|---:|"]
        for n in names:
            b = self.per_class.get("bbox", {}).get(n, float("nan"))
            s = self.per_class.get("segm", {}).get(n, float("nan"))
            lines.append(f"| {n} | {100 * b:.1f} | {100 * s:.1f} |")
        return "\n".join(lines)


def detections_to_coco(
    detections: Sequence[Dict[str, Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int],
    mask_threshold: float = 0.5,
) -> Dict[str, List[dict]]:
    """Converts a model's detections to COCO result lists.

    Args:
        detections: per image ``{"boxes": Tensor[D, 4] (x1, y1, x2, y2), "scores",
            "labels", "masks"}``; masks are ``Tensor[D, 1, H, W]`` (bool, or probabilities
            thresholded here at ``mask_threshold``) or ``Tensor[D, 1, M, M]`` probabilities
            (then pasted into the image, whose size is read from ``"image_size"``).
        image_ids: the COCO image id of each entry.
        label_to_category_id: maps the model's labels to the dataset's category ids.

    Returns:
        ``{"bbox": [...], "segm": [...]}`` in COCO's results format (boxes ``[x, y, w, h]``,
        masks compressed RLE with ``str`` counts).
    """
    out: Dict[str, List[dict]] = {"bbox": [], "segm": []}
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        scores = det["scores"].detach().float().cpu().tolist()
        cats = [int(label_to_category_id[int(l)]) for l in det["labels"].cpu().tolist()]
        xywh = boxes.clone()
        xywh[:, 2:] -= xywh[:, :2]
        for b, s, c in zip(xywh.tolist(), scores, cats):
            out["bbox"].append({"image_id": int(image_id), "category_id": c, "bbox": b, "score": s})
        masks = det.get("masks")
        if masks is None:
            continue
        if masks.dtype != torch.bool:
            if "image_size" in det and tuple(masks.shape[-2:]) != tuple(det["image_size"]):
                masks = maskops.paste_masks(
                    masks, det["boxes"], tuple(det["image_size"]), threshold=mask_threshold
                )
            else:
                masks = masks >= mask_threshold
        for rle, s, c in zip(maskops.masks_to_rle(masks.cpu()), scores, cats):
            out["segm"].append(
                {
                    "image_id": int(image_id),
                    "category_id": c,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "score": s,
                }
            )
    return out


def _empty_results(coco_gt: COCO) -> COCO:
    # loadRes() cannot take an empty list; an empty result set scores 0 everywhere.
    res = COCO()
    res.dataset = {
        "images": copy.deepcopy(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate(
    coco_gt: COCO,
    results: Dict[str, List[dict]],
    image_ids: Sequence[int],
    iou_types: Sequence[str] = IOU_TYPES,
) -> EvalResult:
    """Runs COCOeval for each IoU type over ``image_ids``.

    Args:
        coco_gt: the ground truth (e.g. :attr:`CocoDataset.coco`).
        results: ``{"bbox": [...], "segm": [...]}`` as :func:`detections_to_coco` returns.
        image_ids: the images scored (images without results count as missed objects).
    """
    res = EvalResult(num_images=len(image_ids), num_detections=len(results.get("bbox", [])))
    cats = coco_gt.loadCats(coco_gt.getCatIds())
    summaries = []
    for iou_type in iou_types:
        dets = results.get(iou_type, [])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets)) if dets else _empty_results(coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = sorted(int(i) for i in image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        summaries.append(
            f"{iou_type}:\n"
            + "\n".join(l for l in buf.getvalue().splitlines() if l.startswith(" Average"))
        )
        res.stats[iou_type] = {
            n: (float(v) if v >= 0 else float("nan")) for n, v in zip(STAT_NAMES, ev.stats)
        }
        # precision: [IoU thresholds, recall points, categories, area ranges, max dets].
        precision = ev.eval["precision"]
        per_class = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            name = next((c["name"] for c in cats if c["id"] == cat_id), str(cat_id))
            per_class[name] = float(p.mean()) if p.size else float("nan")
        res.per_class[iou_type] = per_class
    res.summary = "\n".join(summaries)
    return res


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    autocast_dtype: Optional[torch.dtype] = None,
    report: Optional[Report] = None,
) -> Dict[str, List]:
    """Runs ``model`` (eval mode) over ``loader`` (a progress bar on ``report``, if given).

    Returns:
        ``{"bbox": [...], "segm": [...], "image_ids": [...]}`` for the images of this process.
    """
    model.eval()
    dataset = loader.dataset
    label_map = getattr(dataset, "label_to_category_id", None)
    out = {"bbox": [], "segm": [], "image_ids": []}
    bar = report.progress(len(loader), "eval") if report is not None else None
    for images, targets in loader:
        images = [im.to(device, non_blocking=True) for im in images]
        ctx = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype
            else contextlib.nullcontext()
        )
        with ctx:
            dets = model(images)
        ids = [int(t["image_id"]) for t in targets]
        r = detections_to_coco(dets, ids, label_map if label_map is not None else _Identity())
        out["bbox"] += r["bbox"]
        out["segm"] += r["segm"]
        out["image_ids"] += ids
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out


def evaluate(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    autocast_dtype: Optional[torch.dtype] = None,
    report: Optional[Report] = None,
) -> EvalResult:
    """Box and mask AP of ``model`` on ``loader``'s dataset (a :class:`CocoDataset`).

    Under ``torch.distributed`` each rank predicts its shard of the loader; the results are
    gathered and scored on rank 0, and every rank returns rank 0's result.
    """
    start = time.perf_counter()
    local = predict(model, loader, device, autocast_dtype, report)
    parts = dist_utils.gather_objects(local)
    result = None
    if dist_utils.is_main_process():
        merged = {"bbox": [], "segm": [], "image_ids": []}
        for p in parts:
            for k in merged:
                merged[k] += p[k]
        image_ids = sorted(set(merged["image_ids"]))
        result = coco_evaluate(loader.dataset.coco, merged, image_ids)
    result = dist_utils.broadcast_object(result)
    result.seconds = time.perf_counter() - start
    return result


class _Identity:
    """Labels that are category ids already."""

    def __getitem__(self, label: int) -> int:
        return label


def nan_to_zero(x: float) -> float:
    return 0.0 if x != x else x


__all__ = [
    "EvalResult",
    "coco_evaluate",
    "detections_to_coco",
    "evaluate",
    "predict",
    "STAT_NAMES",
    "nan_to_zero",
]
