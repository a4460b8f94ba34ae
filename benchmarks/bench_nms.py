"""maskops.nms / batched_nms vs torchvision, side by side in one process.

    python -m benchmarks.bench_nms [--reps 7] [--markdown] [--device cpu|cuda|all]

Boxes: corners uniform in [0, 800), sides uniform in [1, 101) (a heavy-overlap case uses
corners in [0, 50)). Before timing a case, maskops' output must equal torchvision's exactly;
a case that does not match is reported as MISMATCH and gets no time. Times are medians of
--reps calls after one warm-up call.

batched_nms uses distinct scores: with equal scores in different classes torchvision (above
1000 boxes on the CPU) orders them with an unstable sort, so there is no single order to match.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torchvision
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms as tv_nms

import maskops
from maskops.check.inputs import random_boxes
from maskops.check.machine import cpu_summary
from maskops.check.timing import measure

SIZES = (1000, 5000, 20000)
CLASSES = 80
IOU = 0.5


def make_case(n: int, seed: int, overlap: bool = False):
    g = torch.Generator().manual_seed(seed)
    scale = 50.0 if overlap else 800.0
    boxes = random_boxes(g, n, scale, 1.0, 101.0, margin=0, dtype=torch.float32)
    scores = torch.rand(n, generator=g)
    distinct = torch.randperm(n, generator=g).float() / n
    idxs = torch.randint(0, CLASSES, (n,), generator=g)
    return boxes, scores, distinct, idxs


def cases_table(device: str, reps: int):
    rows = []
    cases = []
    for n in SIZES:
        boxes, scores, distinct, idxs = make_case(n, seed=n)
        cases.append(("nms, random", n, boxes, scores, None))
    boxes, scores, _, _ = make_case(5000, seed=1, overlap=True)
    cases.append(("nms, heavy overlap", 5000, boxes, scores, None))
    for n in SIZES:
        boxes, _, distinct, idxs = make_case(n, seed=n + 1)
        cases.append((f"batched_nms, {CLASSES} classes", n, boxes, distinct, idxs))
    for name, n, boxes, scores, idxs in cases:
        boxes, scores = boxes.to(device), scores.to(device)
        if idxs is None:
            ours = lambda: maskops.nms(boxes, scores, IOU)  # noqa: E731
            theirs = lambda: tv_nms(boxes, scores, IOU)  # noqa: E731
        else:
            idxs = idxs.to(device)
            ours = lambda: maskops.batched_nms(boxes, scores, idxs, IOU)  # noqa: E731
            theirs = lambda: tv_batched_nms(boxes, scores, idxs, IOU)  # noqa: E731
        expected, got = theirs(), ours()
        if not torch.equal(expected.cpu(), got.cpu()):
            rows.append((device, name, n, len(expected), None, None))
            continue
        # torchvision's slow cases get fewer repetitions (a 20,000-box CPU call takes ~1 s).
        r_theirs = max(3, reps // 2) if device == "cpu" and n >= 20000 else reps
        t_theirs = measure(theirs, device, r_theirs).median_ms / 1e3
        t_ours = measure(ours, device, reps).median_ms / 1e3
        rows.append((device, name, n, len(expected), t_theirs, t_ours))
    return rows


def run(device: str = "cpu", quick: bool = False):
    """The suite's entry point (python -m benchmarks): the same cases as rows of the common
    table."""
    from benchmarks.common import Row, measure, nbytes

    out = []
    sizes = (1000,) if quick else SIZES
    reps = 3 if quick else 7
    for n in sizes:
        boxes, scores, distinct, idxs = make_case(n, seed=n)
        boxes, scores, distinct, idxs = (t.to(device) for t in (boxes, scores, distinct, idxs))
        for name, ours, theirs, args in (
            ("nms", maskops.nms, tv_nms, (boxes, scores, IOU)),
            (
                f"batched_nms ({CLASSES} classes)",
                maskops.batched_nms,
                tv_batched_nms,
                (boxes, distinct, idxs, IOU),
            ),
        ):
            kept = theirs(*args)
            if not torch.equal(ours(*args).cpu(), kept.cpu()):
                raise AssertionError(f"{name} at {n} boxes differs from torchvision: not timed")
            slow = device == "cpu" and n >= 20000
            out.append(
                Row(
                    name,
                    device,
                    f"{n:,} boxes, IoU {IOU}",
                    measure(lambda: ours(*args), device, reps),
                    measure(
                        lambda: theirs(*args), device, 2 if slow else reps, warmup=0 if slow else 1
                    ),
                    min_bytes=nbytes(*args[:-1], kept),
                )
            )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    devices = (
        ["cpu"]
        if args.device == "cpu"
        else ["cuda"]
        if args.device == "cuda"
        else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    if "cuda" in devices and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    print(
        f"machine: {cpu_summary()}"
        + (f"; GPU: {torch.cuda.get_device_name()}" if "cuda" in devices else "")
    )
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"maskops {maskops.__version__}; iou_threshold={IOU}; median of {args.reps} calls"
    )
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for d in devices:
        rows += cases_table(d, args.reps)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after")
    bad = 0
    if args.markdown:
        print("\n| device | case | boxes | kept | torchvision (ms) | maskops (ms) | speed-up |")
        print("|---|---|---:|---:|---:|---:|---:|")
    for device, name, n, kept, t_theirs, t_ours in rows:
        if t_ours is None:
            bad += 1
            cells = ("MISMATCH", "-", "-")
        else:
            cells = (f"{t_theirs * 1e3:.2f}", f"{t_ours * 1e3:.3f}", f"{t_theirs / t_ours:.1f}x")
        if args.markdown:
            print(f"| {device} | {name} | {n:,} | {kept:,} | " + " | ".join(cells) + " |")
        else:
            print(
                f"{device:5s} {name:28s} {n:>7,} kept {kept:>7,}  torchvision {cells[0]:>9} ms"
                f"  maskops {cells[1]:>8} ms  {cells[2]:>7}"
            )
    if bad:
        print(
            f"{bad} case(s) did not match torchvision: no speed reported for them", file=sys.stderr
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
