"""The end-to-end demo: data, training, evaluation, a prediction and the pipeline trace.

    python -m tools.demo [--out demo_out] [--epochs N] [--quick]

Writes the synthetic shapes dataset, trains a small ResNet-18-FPN Mask R-CNN on the CPU from
scratch (printing the per-epoch table), evaluates the best checkpoint, draws the detections
on a validation image (``OUT/prediction.png``) and prints the pipeline trace of that image
(see models/engine/demo.py). ``--quick`` runs a much shorter version (a smoke test of the
whole chain, meaningless AP).
"""

from __future__ import annotations

import os
import sys

# libgomp's default busy-waiting makes every torch thread spin while it waits for the
# others; on a small machine shared with other work that costs up to 10x. Passive waiting
# has to be chosen before the OpenMP runtime loads, hence the re-exec.
if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, "-m", "tools.demo", *sys.argv[1:]])

import argparse  # noqa: E402
from typing import List, Optional  # noqa: E402

from models.engine.demo import run_demo  # noqa: E402

from ._console import ConsoleReport  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    a = p.parse_args(argv)
    run_demo(a.out, a.epochs, a.quick, ConsoleReport())
    return 0


if __name__ == "__main__":
    sys.exit(main())
