"""The Mask R-CNN pipeline, stage by stage: what each stage outputs and how long it takes.

    python -m tools.trace --image IMG [--weights W.pth | --checkpoint RUN/best.pt] [--json]
                          [--save-dir DIR]

One warm-up forward, then a recorded one. --save-dir writes an image per stage: the
resized input, each FPN level's activation, the top proposals, the final masks.
"""

from __future__ import annotations

import argparse
import json
import sys

from models.profiling import format_table, trace
from models.visualize import read_image, save_stage_images

from ._options import add_model_args, autocast, load_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.trace",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--image", required=True)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--save-dir", default=None, help="write an image per stage here")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    add_model_args(p)
    a = p.parse_args(argv)

    image = read_image(a.image).to(a.device)
    model = load_model(a)
    rows, rec, det = trace(model, image, a.warmup, autocast(a))
    if a.json:
        print(json.dumps({"image": a.image, "device": a.device, "rows": rows}, indent=2))
    else:
        print(format_table(rows))
    if a.save_dir:
        resized_hw = rec.outputs["image_sizes"][0]
        det = {k: v.cpu() for k, v in det.items()}
        for path in save_stage_images(
            a.save_dir, image.cpu(), rec, det, resized_hw, model.class_names
        ):
            print(f"wrote {path}", file=sys.stderr if a.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
