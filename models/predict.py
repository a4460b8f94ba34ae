"""Runs Mask R-CNN on one image: prints the detections and draws them.

    python -m models.predict --weights W.pth --image IMG [--out pred.png] [--score-thresh 0.5]
    python -m models.predict --checkpoint RUN/best.pt --image IMG   (a models.train run)

Without --weights the model has random weights (a warning says so): the pipeline runs end
to end, but its detections mean nothing.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .cli_common import add_model_args, autocast, load_model
from .visualize import draw_detections, read_image, save_image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="input image (PNG or JPEG)")
    p.add_argument("--out", default=None, help="where to write the image with detections")
    p.add_argument("--score-thresh", type=float, default=0.5,
                   help="detections printed and drawn (the model keeps those over 0.05)")
    add_model_args(p)
    a = p.parse_args(argv)

    image = read_image(a.image)
    model = load_model(a)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(a):
        det = model([image.to(a.device)])[0]
    elapsed = time.perf_counter() - start

    sel = det["scores"] >= a.score_thresh
    print(f"{a.image}: {image.shape[2]}x{image.shape[1]}, {int(sel.sum())} detections with "
          f"score >= {a.score_thresh} ({len(det['scores'])} in all) in {elapsed * 1e3:.0f} ms")
    print(f"{'class':<16} {'score':>6}   box (x1, y1, x2, y2)")
    for box, label, score in zip(det["boxes"][sel].tolist(), det["labels"][sel].tolist(),
                                 det["scores"][sel].tolist()):
        coords = ", ".join(f"{v:7.1f}" for v in box)
        name = model.class_names[label] if 0 <= label < len(model.class_names) else f"class {label}"
        print(f"{name:<16} {score:6.3f}   ({coords})")
    if a.out:
        save_image(draw_detections(image, det, a.score_thresh, names=model.class_names), a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
