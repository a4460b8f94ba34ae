"""Writes the synthetic shapes dataset (COCO format; see models/data/shapes.py).

python -m tools.shapes --out DIR --train N --val M --size S --seed K
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from models.data.shapes import generate


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.shapes", description=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=400, help="training images")
    p.add_argument("--val", type=int, default=100, help="validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-shapes", type=int, default=1)
    p.add_argument("--max-shapes", type=int, default=3)
    p.add_argument(
        "--empty-every", type=int, default=0, help="every k-th image has no shapes (0: none)"
    )
    a = p.parse_args(argv)
    if a.size < 16:
        p.error("--size must be at least 16")
    if not 0 <= a.min_shapes <= a.max_shapes:
        p.error("need 0 <= --min-shapes <= --max-shapes")
    generate(a.out, a.train, a.val, a.size, a.seed, a.min_shapes, a.max_shapes, a.empty_every)
    print(f"wrote {a.train} train and {a.val} val images of {a.size}x{a.size} to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
