"""The benchmark suite: every op (and the model, when present), maskops vs torchvision, on
every available device, in one run.

    python -m benchmarks [--quick] [--device cpu|cuda] [--only roi_align,nms,...] [--out DIR]

Prints a table per device, and writes DIR/<device-name>.md and .json (DIR defaults to
benchmarks/results). On CUDA it also measures the copy bandwidth and reports each op's
achieved fraction of it (roofline). On the CPU it also measures the model's peak memory
against torchvision's (benchmarks/bench_memory.py: DIR/memory_<machine>.md and .json).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

import torch

from benchmarks.common import (
    copy_bandwidth_GBps,
    device_slug,
    machine,
    markdown_report,
    roofline_table,
    save_json,
    table,
)

# (name, module); a module that cannot be imported (its op not built yet) is skipped.
SUITE = [
    ("roi_align", "benchmarks.bench_roi_align"),
    ("multiscale_roi_align", "benchmarks.bench_multiscale_roi_align"),
    ("nms", "benchmarks.bench_nms"),
    ("anchors", "benchmarks.bench_anchors"),
    ("paste_masks", "benchmarks.bench_paste_masks"),
    ("gpu_algorithms", "benchmarks.bench_gpu_algorithms"),
    ("model", "benchmarks.bench_model"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (smoke run)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: every available one)")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated subset of: " + ", ".join([n for n, _ in SUITE] + ["memory"]),
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    devices = [a.device] if a.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    only = set(a.only.split(",")) if a.only else None
    failures = 0
    print(machine(), flush=True)
    for device in devices:
        rows = []
        for name, module in SUITE:
            if only and name not in only:
                continue
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                print(f"[skip] {name}: {e}", flush=True)
                continue
            try:
                new = mod.run(device, a.quick)
            except Exception:  # a failed correctness guard or crash: report, keep going
                failures += 1
                print(f"[FAIL] {name} on {device}:", flush=True)
                traceback.print_exc()
                continue
            rows += new
            print(table(new), flush=True)
        extra = ""
        if device.startswith("cuda") and rows:
            extra = "## Roofline\n\n" + roofline_table(rows, copy_bandwidth_GBps(device))
        slug = device_slug(device) + ("-quick" if a.quick else "")
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, slug + ".md"), "w") as f:
            f.write(markdown_report(device, rows, extra))
        save_json(os.path.join(a.out, slug + ".json"), rows)
        print(
            f"\n== {device}: all results ==\n{table(rows)}\n{extra}\nwritten to {a.out}/{slug}.md",
            flush=True,
        )
    if "cpu" in devices and (not only or "memory" in only):
        # Peak memory of the model against torchvision's, each in a fresh process of its own.
        try:
            importlib.import_module("benchmarks.bench_memory").run_and_save(a.quick, a.out)
        except Exception:
            failures += 1
            print("[FAIL] memory on cpu:", flush=True)
            traceback.print_exc()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
