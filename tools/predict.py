"""Runs Mask R-CNN on one image or many: prints or writes the detections and draws them.

    python -m tools.predict --weights W.pth --image IMG [--out pred.png] [--score-thresh 0.5]
    python -m tools.predict --checkpoint RUN/best.pt --image IMG   (a tools.train run)
    python -m tools.predict --weights W.pth --image DIR|'GLOB'|LIST.txt --results dets.json \\
        [--batch-size 4] [--workers 2] [--draw-dir drawn/] [--coco-annotations ann.json]
    torchrun --nproc-per-node 4 -m tools.predict ... --results dets.json   (one shard per rank)

``--image`` takes one image, a folder (its images, not its subfolders), a glob (quote it;
``**`` recurses) or a list file (``.txt``/``.lst``/``.list``: one path a line, relative
to the list file's folder; blank lines and ``#`` comments are ignored), or several of these.
One image prints its detections as a table; many show a progress bar on stderr and
print images/s at the end.

``--results`` writes COCO's results format (``image_id``, ``category_id``, ``bbox`` ``[x, y,
w, h]``, ``score``, ``segmentation`` as compressed RLE); image ids come from
``--coco-annotations`` (matched by file name) or are 1, 2, ... in sorted path order, listed
then in an images file (``--images-json``, default ``<results>.images.json``) that
``pycocotools.coco.COCO`` loads. Details: models/engine/predictor.py.

An image that cannot be read is named on stderr and skipped. Without --weights the model
has random weights (a warning says so): the pipeline runs end to end, but its detections
mean nothing. Exit status: 0 when at least one image was read, 1 when none was, 2 for inputs
that name nothing.
"""

from __future__ import annotations

import argparse
import sys

from models.engine import distributed as dist_utils
from models.engine.predictor import InputError, PredictOptions, expand_inputs, predict_files

from ._console import ConsoleReport
from ._options import add_config_options, add_model_args, autocast, config_from_options, load_model

__all__ = ["main", "build_parser", "expand_inputs", "InputError"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_options(p, PredictOptions)
    add_model_args(p)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    opts = config_from_options(PredictOptions, a)

    def load(device):
        if a.device != "cpu":
            a.device = str(device)
        return load_model(a, box_score_thresh=opts.box_score_thresh)

    try:
        read = predict_files(
            opts, load, a.device, lambda: autocast(a), ConsoleReport(bars=opts.progress)
        )
        return 0 if read or not dist_utils.is_main_process() else 1
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())
