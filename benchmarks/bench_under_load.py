"""How much each op slows down when another process keeps one core busy, maskops against
torchvision, in the same run.

    python -m benchmarks.bench_under_load [--quick] [--reps N] [--json PATH]

Each op is timed quiet, then while a separate process spins on one core (a plain Python busy
loop: the situation of a shared machine), interleaved with torchvision's call so both see the
same load. The slow-down is busy median / quiet median; a library holds up under load when
its slow-down is no larger than its peer's. The ratio to torchvision is given for both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

import torch
import torchvision

import maskops
from benchmarks.bench_multiscale_roi_align import workload as fpn_workload
from benchmarks.common import machine, measure_interleaved, on_one_thread
from maskops.check.inputs import random_boxes

_SPIN = "import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass\n"


@contextlib.contextmanager
def one_core_busy(seconds: float = 600.0):
    """A separate process spinning on one core for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=seconds)])
    try:
        time.sleep(0.3)  # let it start spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _interleaved(fns, reps: int):
    """Median ms of each function, calls interleaved so that all see the same conditions."""
    return [t.median_ms for t in measure_interleaved(fns, "cpu", reps)]


def cases(quick: bool):
    feats, boxes, shapes = fpn_workload(
        "cpu", rois=300 if quick else 1000, channels=64 if quick else 256
    )
    ours7 = maskops.MultiScaleRoIAlign(list(feats), 7, 2)
    theirs7 = torchvision.ops.MultiScaleRoIAlign(list(feats), 7, 2)
    yield (
        "MultiScaleRoIAlign 7x7",
        lambda: ours7(feats, boxes, shapes),
        lambda: theirs7(feats, boxes, shapes),
    )
    g = torch.Generator().manual_seed(1)
    n = 100 if quick else 1000
    pb = random_boxes(g, n, 700, 4, 204, margin=0, dtype=torch.float32)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    yield (
        "paste_masks (to bool)",
        lambda: maskops.paste_masks(masks, pb, (800, 800)),
        lambda: paste_masks_in_image(masks, pb, (800, 800)) > 0.5,
    )
    scores = torch.rand(n * 4, generator=g)
    nb = torch.cat([pb, pb + 3]).repeat(2, 1)
    yield (
        "nms",
        lambda: maskops.nms(nb, scores, 0.7),
        lambda: torchvision.ops.nms(nb, scores, 0.7),
    )
    # What any op using every core loses, against the same work on one thread: the floor
    # for a parallel op. With N cores, N op threads and the spinner share them fairly, so the
    # op gets N * N / (N + 1) cores instead of N: a slow-down of (N + 1) / N at best (1.5x on
    # 2 cores), while a one-thread op still finds a free core (1.0x at best).
    threads = torch.get_num_threads()
    if threads > 1:
        m = 512 if quick else 1024
        a, b2 = torch.randn(m, m, generator=g), torch.randn(m, m, generator=g)
        mm = lambda: torch.mm(a, b2)  # noqa: E731
        pool = lambda: ours7(feats, boxes, shapes)  # noqa: E731
        yield (
            f"reference: torch.mm {m}x{m}, {threads} threads vs 1 thread",
            mm,
            lambda: on_one_thread(mm),
        )
        yield (
            f"reference: maskops MultiScaleRoIAlign 7x7, {threads} threads vs 1 thread",
            pool,
            lambda: on_one_thread(pool),
        )


def run(quick: bool = False, reps: int = 15) -> dict:
    rows = []
    with torch.no_grad():
        for name, ours, theirs in cases(quick):
            quiet = _interleaved([ours, theirs], reps)
            with one_core_busy():
                busy = _interleaved([ours, theirs], reps)
            rows.append(
                {
                    "op": name,
                    "quiet_ms": quiet,
                    "busy_ms": busy,
                    "slowdown": [b / q for b, q in zip(busy, quiet)],
                    "speedup_quiet": quiet[1] / quiet[0],
                    "speedup_busy": busy[1] / busy[0],
                }
            )
    return {"machine": machine(), "reps": reps, "rows": rows}


def report(r: dict) -> str:
    lines = [
        f"Machine: {r['machine']['cpu']}, {r['machine']['cpu_threads']} threads; medians of "
        f"{r['reps']} interleaved calls; busy = another process spinning on one core. The peer "
        "is torchvision; in the reference rows, the same call on one thread.",
        "",
        "| op | quiet ms | busy ms | slow-down | peer quiet ms | busy ms | "
        "slow-down | speed-up quiet | speed-up busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        (oq, tq), (ob, tb) = row["quiet_ms"], row["busy_ms"]
        so, st = row["slowdown"]
        lines.append(
            f"| {row['op']} | {oq:.2f} | {ob:.2f} | {so:.2f}x | {tq:.2f} | {tb:.2f} | "
            f"{st:.2f}x | {row['speedup_quiet']:.1f}x | {row['speedup_busy']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = run(a.quick, a.reps)
    print(report(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
