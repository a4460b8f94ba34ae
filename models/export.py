"""``torch.export`` of the inference model: images in; boxes, labels, scores, masks out.

    python -m models.export --image IMG --out maskrcnn.pt2 [--weights W.pth] [--check]

The program is specialised to the example's image size (the resize factor is computed from
it in Python): export once per input size. The numbers of proposals and detections are
data-dependent (NMS, score thresholds) and stay symbolic, so one program serves any image
of that size, including one with no detections.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List

import torch
from torch import Tensor

from .cli_common import add_model_args, load_model
from .compare import compare_detections
from .mask_rcnn import MaskRCNN
from .visualize import read_image


def export_model(model: MaskRCNN, images: List[Tensor]) -> torch.export.ExportedProgram:
    """Exports ``model`` (put in eval mode) for lists of images shaped like ``images``.

    ``optimize_for_inference()`` models export too: the fused oneDNN calls step aside while
    tracing, so the program holds plain convolutions with the folded weights.

    Returns:
        The ``ExportedProgram``; ``program.module()(images)`` runs it, ``torch.export.save``
        writes it.
    """
    model.eval()
    with torch.no_grad():
        return torch.export.export(model, (list(images),), strict=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="an example image (sets the input size)")
    p.add_argument("--out", required=True, help="where to save the program (.pt2)")
    p.add_argument("--check", action="store_true",
                   help="run the saved program and compare with the eager model")
    add_model_args(p)
    a = p.parse_args(argv)
    image = read_image(a.image).to(a.device)
    model = load_model(a)
    start = time.perf_counter()
    program = export_model(model, [image])
    torch.export.save(program, a.out)
    print(f"exported for 3 x {image.shape[1]} x {image.shape[2]} images in "
          f"{time.perf_counter() - start:.1f} s: {a.out}")
    if a.check:
        loaded = torch.export.load(a.out).module()
        with torch.inference_mode():
            expected, got = model([image])[0], loaded([image])[0]
        diff = compare_detections(expected, got)
        print(f"saved program vs eager model: {diff.summary()}")
        return 0 if diff.identical() else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
