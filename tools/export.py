"""Exports the inference model: images in; boxes, labels, scores, masks out.

    python -m tools.export --image IMG --out maskrcnn.pt2 [--weights W.pth] [--check]
    python -m tools.export --format onnx --image IMG --out maskrcnn.onnx [--check]
    python -m tools.export --format aoti --image IMG --out maskrcnn_aoti.pt2 [--check]

Formats: pt2 (``torch.export``), onnx (opset 18, runs in onnxruntime without maskops), aoti
(an AOTInductor package; load it after ``import maskops``); each specialised to the example's
image size. ``--check`` runs the written file on the example image and exits 1 unless its
detections match the eager model's (``--box-tol`` px, ``--score-tol``, masks agreeing on
99.9 % of pixels). Details: models/deploy.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from models.deploy import FORMATS, check_file, onnx_runner, write  # noqa: F401
from models.visualize import read_image

from ._options import add_model_args, load_model


def check(fmt, model, image, path, box_tol=0.25, score_tol=1e-4, reps=3) -> bool:
    """:func:`models.deploy.check_file`, printed; True when the file matches."""
    r = check_file(fmt, model, image, path, box_tol, score_tol, reps)
    print(f"{fmt} file vs eager model: {r.diff.summary()}")
    print(
        f"time (median of {reps}): eager {r.eager_ms:.0f} ms, {fmt} {r.file_ms:.0f} ms "
        f"({r.eager_ms / r.file_ms:.2f}x)"
    )
    return r.ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", required=True, help="an example image (sets the input size)")
    p.add_argument("--out", required=True, help="where to write the file (.pt2 / .onnx)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="pt2",
        help="pt2: torch.export program (default); onnx; aoti: AOTInductor package",
    )
    p.add_argument(
        "--check", action="store_true", help="run the written file and compare with the eager model"
    )
    p.add_argument("--box-tol", type=float, default=0.25, help="--check: px (default 0.25)")
    p.add_argument("--score-tol", type=float, default=1e-4, help="--check: (default 1e-4)")
    add_model_args(p)
    a = p.parse_args(argv)
    if a.format != "pt2" and a.device != "cpu":
        p.error(f"--format {a.format} is exported on the CPU here (--device cpu)")
    image = read_image(a.image).to(a.device)
    model = load_model(a)
    start = time.perf_counter()
    write(a.format, model, image, a.out)
    print(
        f"{a.format}: exported for 3 x {image.shape[1]} x {image.shape[2]} images in "
        f"{time.perf_counter() - start:.1f} s: {a.out}"
    )
    if a.check:
        return 0 if check(a.format, model, image, a.out, a.box_tol, a.score_tol) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
