"""Peak memory of Mask R-CNN R50-FPN inference: models/ (on maskops) vs stock torchvision.

    python -m benchmarks.bench_memory [--size 800] [--runs 3] [--threads N] [--quick]
                                      [--out DIR]

Each model runs in a fresh subprocess of its own (peak RSS is per process and never goes
down), on the same seeded image with the same weights (torchvision's seeded
``maskrcnn_resnet50_fpn(weights=None)``, saved once and loaded by every child), with the
same number of threads: ``--runs`` inferences under ``torch.inference_mode()``, then the
child's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``). The variants: ours as
``build_mask_rcnn`` gives it (fast inference), the same with maskops' CPU buffer cache
keeping nothing (``MASKOPS_CPU_CACHE_MB=0``), ours with ``fast_inference=False`` (the
modules as built), ours after ``optimize_for_inference()``, and torchvision. Writes
DIR/memory_<machine>.md and .json (DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

OURS = "maskops model"
PLAIN = "maskops model, fast_inference=False"
OPTIMIZED = "maskops model, optimize_for_inference()"
NO_CACHE = "maskops model, MASKOPS_CPU_CACHE_MB=0"
TORCHVISION = "torchvision"
VARIANTS = (OURS, NO_CACHE, PLAIN, OPTIMIZED, TORCHVISION)
# What each variant's process gets in its environment: NO_CACHE is ours as built with
# maskops' CPU buffer cache keeping nothing (the memory that cache holds between calls).
_ENV = {NO_CACHE: {"MASKOPS_CPU_CACHE_MB": "0"}}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _child(variant: str, weights: str, size: int, runs: int, threads: int, seed: int) -> dict:
    """One variant's measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    if variant == TORCHVISION:
        import torchvision

        model = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None
        )
    else:
        from models import build_mask_rcnn

        model = build_mask_rcnn("resnet50", fast_inference=variant != PLAIN)
    state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    model.load_state_dict(state, strict=True)
    del state
    model.eval()
    if variant == OPTIMIZED:
        model.optimize_for_inference()
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    loaded = _peak_mb()
    times, detections = [], []
    with torch.inference_mode():
        for _ in range(runs):
            start = time.perf_counter()
            out = model([image])[0]
            times.append(time.perf_counter() - start)
            detections.append(len(out["boxes"]))
            del out
    return {
        "peak_rss_mb": _peak_mb(),
        "peak_rss_before_inference_mb": loaded,
        "forward_s": times,
        "detections": detections,
    }


def measure(
    size: int = 800, runs: int = 3, threads: Optional[int] = None, seed: int = 0, variants=VARIANTS
) -> dict:
    """Each variant's peak RSS (MB), each measured in a subprocess of its own."""
    import torch
    import torchvision

    threads = threads or torch.get_num_threads()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pth")
        torch.manual_seed(seed)
        tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        torch.save(tv.state_dict(), weights)
        del tv
        for variant in variants:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_memory",
                "--child",
                variant,
                "--weights",
                weights,
                "--size",
                str(size),
                "--runs",
                str(runs),
                "--threads",
                str(threads),
                "--seed",
                str(seed),
            ]
            env = dict(os.environ, **_ENV.get(variant, {}))
            done = subprocess.run(
                cmd, cwd=root, capture_output=True, text=True, check=False, env=env
            )
            if done.returncode != 0:
                raise RuntimeError(f"{variant}: the measuring process failed:\n{done.stderr}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "image": f"1 x 3 x {size} x {size}",
        "runs": runs,
        "threads": threads,
        "results": results,
    }


def report(r: dict) -> str:
    from benchmarks.common import machine

    m = machine()
    tv = r["results"].get(TORCHVISION, {}).get("peak_rss_mb")
    lines = [
        f"# Peak memory of Mask R-CNN R50-FPN inference on {m['cpu']}",
        "",
        f"{r['runs']} inferences of a {r['image']} float32 image, {r['threads']} threads, "
        f"torch {m['torch']}, torchvision {m.get('torchvision')}; each model in a fresh "
        "process of its own, same weights and image; peak resident set "
        "(`ru_maxrss`) of that process.",
        "",
        "| model | peak RSS MB | vs torchvision | RSS before inference MB | detections |",
        "|---|---|---|---|---|",
    ]
    for name, v in r["results"].items():
        ratio = f"{v['peak_rss_mb'] / tv:.3f}x" if tv else ""
        lines.append(
            f"| {name} | {v['peak_rss_mb']:.0f} | {ratio} | "
            f"{v['peak_rss_before_inference_mb']:.0f} | {v['detections'][-1]} |"
        )
    return "\n".join(lines) + "\n"


def run_and_save(quick: bool = False, out: Optional[str] = None, **kw) -> dict:
    """The suite's entry point (``python -m benchmarks``, CPU): measures, prints the table and
    writes DIR/memory_<machine>[-quick].md and .json."""
    from benchmarks.common import device_slug, machine

    if quick:
        kw.setdefault("size", 320)
    r = measure(**kw)
    text = report(r)
    print(text, flush=True)
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    slug = "memory_" + device_slug("cpu") + ("-quick" if quick else "")
    with open(os.path.join(out, slug + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, slug + ".json"), "w") as f:
        json.dump({"machine": machine(), **r}, f, indent=2)
    return r


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=None, help="image side (default 800; quick 320)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(_child(a.child, a.weights, a.size, a.runs, a.threads, a.seed)))
        return 0
    kw = {"runs": a.runs, "threads": a.threads, "seed": a.seed}
    if a.size is not None:
        kw["size"] = a.size
    run_and_save(a.quick, a.out, **kw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
