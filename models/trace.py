"""The Mask R-CNN pipeline, stage by stage: what each stage outputs and how long it takes.

    python -m models.trace --image IMG [--weights W.pth | --checkpoint RUN/best.pt] [--json]
                           [--save-dir DIR]

One warm-up forward, then a recorded one. --save-dir writes an image per stage: the
resized input, each FPN level's activation, the top proposals, the final masks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List

import torch

from . import transform as T
from .cli_common import add_model_args, autocast, load_model
from .visualize import draw_boxes, draw_detections, feature_heatmap, read_image, save_image

LEVEL_NAMES = {"0": "P2", "1": "P3", "2": "P4", "3": "P5", "pool": "P6"}


def _shape(s) -> str:
    return " x ".join(str(int(v)) for v in s)


def trace_rows(rec, batch_shape, detections: List[Dict[str, torch.Tensor]]) -> List[dict]:
    """The table rows from a :class:`StageRecorder` run with ``keep_outputs``."""
    t = {k: v * 1e3 for k, v in rec.times.items()}
    out = rec.outputs
    h = batch_shape[-2]
    # Strides are powers of two; the coarsest map of a size not divisible by 64 rounds up.
    levels = ", ".join(f"{LEVEL_NAMES.get(k, k)} {_shape(f.shape)} "
                       f"(stride {2 ** round(math.log2(h / f.shape[-2]))})"
                       for k, f in out["features"].items())
    proposals, scores = out["proposals"]
    n_prop = " + ".join(str(len(p)) for p in proposals)
    n_det = " + ".join(str(len(d["boxes"])) for d in detections)
    masks = ", ".join(_shape(d["masks"].shape) for d in detections)
    lowres = " + ".join(_shape(m.shape) for m in out["mask_probs"])
    return [
        {"stage": "1 Input image", "output": _shape(batch_shape),
         "ms": t.get("transform", 0.0), "detail": "normalised, resized, padded to /32"},
        {"stage": "2 Backbone CNN (ResNet-FPN)", "output": levels, "ms": t.get("backbone", 0.0)},
        {"stage": "3 Region Proposal Network", "output": f"{n_prop} boxes x 4 + scores",
         "ms": t.get("rpn", 0.0)},
        {"stage": "4 RoI Align",
         "output": f"{_shape(out['box_roi_features'])} (box) and "
                   f"{_shape(out['mask_roi_features'])} (mask)",
         "ms": t.get("roi_align", 0.0)},
        {"stage": "5 Box & classifier head",
         "output": f"{n_det} boxes with class labels and refined coordinates",
         "ms": t.get("box_head", 0.0)},
        {"stage": "6 Mask head", "output": f"{lowres} masks, pasted to full size: {masks}",
         "ms": t.get("mask_head", 0.0) + t.get("paste", 0.0),
         "detail": f"head {t.get('mask_head', 0.0):.1f} ms + paste {t.get('paste', 0.0):.1f} ms"},
    ]


def format_table(rows: List[dict]) -> str:
    w1 = max(len(r["stage"]) for r in rows)
    lines = [f"| {'stage':<{w1}} | output | time |", f"|{'-' * (w1 + 2)}|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']:<{w1}} | {r['output']} | {r['ms']:.1f} ms |")
    total = sum(r["ms"] for r in rows)
    lines.append(f"| {'total':<{w1}} | | {total:.1f} ms |")
    return "\n".join(lines)


def save_stage_images(save_dir: str, image: torch.Tensor, rec, det, batch_size_hw,
                      names=None) -> List[str]:
    """Writes one image per stage into ``save_dir`` (detections labelled with ``names``, COCO's
    by default); returns the paths."""
    os.makedirs(save_dir, exist_ok=True)
    paths = []

    def save(img, name):
        path = os.path.join(save_dir, name)
        save_image(img, path)
        paths.append(path)

    save(draw_detections(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0),
                                 "scores": torch.zeros(0)}), "1_input.png")
    for k, f in rec.outputs["features"].items():
        save(feature_heatmap(f[0]), f"2_features_{LEVEL_NAMES.get(k, k)}.png")
    proposals, scores = rec.outputs["proposals"]
    # Proposals live in the resized image: map the best 100 back to the input image.
    top = T.resize_boxes(proposals[0][:100].cpu(), batch_size_hw, image.shape[-2:])
    save(draw_boxes(image, top), "3_proposals_top100.png")
    save(draw_detections(image, det, score_thresh=0.5, names=names), "6_masks.png")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.trace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--save-dir", default=None, help="write an image per stage here")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    add_model_args(p)
    a = p.parse_args(argv)

    image = read_image(a.image).to(a.device)
    model = load_model(a)
    with torch.inference_mode(), autocast(a):
        for _ in range(a.warmup):
            model([image])
        with model.record_stages(keep_outputs=True) as rec:
            det = model([image])[0]
    batch_shape = rec.outputs["input"]
    rows = trace_rows(rec, batch_shape, [det])
    if a.json:
        print(json.dumps({"image": a.image, "device": a.device, "rows": rows}, indent=2))
    else:
        print(format_table(rows))
    if a.save_dir:
        resized_hw = rec.outputs["image_sizes"][0]
        for path in save_stage_images(a.save_dir, image.cpu(), rec, {k: v.cpu() for k, v in det.items()},
                                      resized_hw, model.class_names):
            print(f"wrote {path}", file=sys.stderr if a.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
